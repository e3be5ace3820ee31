"""Dictionaries trained elsewhere, opened as a `Run` so that `sae-jax eval` and `sae-jax atlas`
compare them with sae_jax's on the same rows and text.

    sae-jax eval  PATH --store STORE     # PATH: a SAELens or a sparsify folder
    sae-jax atlas PATH --store STORE

- SAELens (>= 6): `cfg.json` + `sae_weights.safetensors`; architectures `topk`, `jumprelu` and
  `standard` (ReLU); `hook_name` (or `metadata.hook_name`) names the store hook.
  `apply_b_dec_to_input: false` is folded into b_enc (b_enc + b_dec W_enc) and TopK's
  `rescale_acts_by_decoder_norm` into W_enc, b_enc and W_dec, so every dictionary has sae_jax's
  form pre = (x - b_dec) W_enc + b_enc, x_hat = act(pre) W_dec + b_dec. Activation normalisation other than `none` is refused (the
  scale SAELens would apply is not in the folder).
- sparsify: `cfg.json` + `sae.safetensors` (TopK; encoder.weight [w, d_in]); a folder holds one
  such dictionary or one per hookpoint (sub-folders named like `layers.6`). The hookpoint is the
  Hugging Face module whose output the store hook is (`sae_jax.model.hf_modules`), or the store's
  hook of that very name (stores of any activations); an `sae_jax.json` beside it (what
  `sae-jax export` writes) names the hook directly.

A foreign dictionary did not train on the store, so the store's last shard stands for held-out
rows (as `train.holdout_shards=1` leaves it), and its input scale is 1: its parameters are already
in raw units (`Run.folded` returns them as they are). Transcoders are refused (eval and atlas take
SAEs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sae_jax.runs import Member, Run, RunError

SAELENS = ("cfg.json", "sae_weights.safetensors")
SPARSIFY = ("cfg.json", "sae.safetensors")


def kind(path) -> str | None:
    """'saelens', 'sparsify' or None (not a folder of foreign dictionaries). A folder is one
    dictionary, or holds them one or two levels down: what `sae-jax export --out DIR` writes (one
    folder per member; sparsify's hookpoint folders inside)."""
    p = Path(path).expanduser()
    if (p / "bank.json").exists():
        return None
    if _dictionaries(p, SAELENS):
        return "saelens"
    if _dictionaries(p, SPARSIFY):
        return "sparsify"
    return None


def _dictionaries(p: Path, files: tuple[str, ...], depth: int = 2) -> list[Path]:
    """`p` if it holds `files`, else the folders up to `depth` levels below it that do, in name order."""
    if all((p / f).is_file() for f in files):
        return [p]
    return [d for sub in _subdirs(p) for d in _dictionaries(sub, files, depth - 1)] if depth > 0 else []


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir()) if p.is_dir() else []


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # a truncated or foreign file: name it
        raise RunError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None


def _cfg(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def _need(arrays: dict, names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RunError(f"{path}: missing tensors {', '.join(missing)} (has {', '.join(sorted(arrays))})")


def _saelens(folder: Path, store) -> list[tuple[Member, dict]]:
    cfg = _cfg(folder / "cfg.json")
    arch = cfg.get("architecture", "standard")
    inference = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}.get(arch)
    if inference is None:
        raise RunError(f"{folder / 'cfg.json'}: SAELens architecture {arch!r} is not one eval and atlas take (topk, jumprelu, standard)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise RunError(
            f"{folder / 'cfg.json'}: normalize_activations={cfg['normalize_activations']!r}; the scale it applies is not in the folder"
        )
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not hook or hook not in store.hooks:
        raise RunError(f"{folder / 'cfg.json'}: hook_name {hook!r} is not a hook of {store.root} (it has: {', '.join(store.hooks)})")
    a = _tensors(folder / "sae_weights.safetensors")
    _need(a, ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if inference == "jumprelu" else ()), folder / "sae_weights.safetensors")
    p = {n: a[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if not cfg.get("apply_b_dec_to_input", True):
        p["b_enc"] = p["b_enc"] + p["b_dec"] @ p["W_enc"]  # pre = x W + b = (x - b_dec) W + (b + b_dec W)
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens (TopK, its default since v6): pre x ||W_dec_i|| ranks the latents and acts / ||W_dec_i||
        # decode; the same map with the norms folded into the encoder and out of the decoder
        if inference != "topk":
            raise RunError(f"{folder / 'cfg.json'}: rescale_acts_by_decoder_norm with architecture {arch!r} (SAELens applies it to topk)")
        n = np.linalg.norm(p["W_dec"], axis=1)
        p["W_enc"], p["b_enc"], p["W_dec"] = p["W_enc"] * n, p["b_enc"] * n, p["W_dec"] / np.maximum(n, 1e-12)[:, None]
    if inference == "jumprelu":
        p["threshold"] = a["threshold"]
    k = int(cfg.get("k") or 0)
    mem = Member(f"{hook}.saelens.{arch}.w{p['W_dec'].shape[0]}" + (f".k{k}" if k else ""), hook, p["W_dec"].shape[0], k, 1.0, inference)
    return [(mem, p)]


def _sparsify_hook(folder: Path, hookpoint: str, store) -> str:
    side = folder.parent / "sae_jax.json"
    if side.is_file() and _cfg(side).get("hookpoint") == hookpoint:
        return _cfg(side)["hook_name"]
    if hookpoint in store.hooks:
        return hookpoint
    from sae_jax.model.hf_modules import output_module
    from sae_jax.model.hooks import transformer_hook
    from sae_jax.model.loading import FAMILIES

    arch = (store.manifest.get("model") or {}).get("architecture")
    for h in store.hooks:
        parsed = transformer_hook(h)
        if parsed is not None and output_module(parsed, FAMILIES.get(arch, "llama")) == hookpoint:
            return h
    raise RunError(f"{folder}: hookpoint {hookpoint!r} is the output of no hook of {store.root} (it has: {', '.join(store.hooks)})")


def _sparsify(folder: Path, store) -> list[tuple[Member, dict]]:
    cfg = _cfg(folder / "cfg.json")
    if cfg.get("transcode"):
        raise RunError(f"{folder}: a sparsify transcoder; eval and atlas take SAEs")
    a = _tensors(folder / "sae.safetensors")
    _need(a, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder / "sae.safetensors")
    p = {"W_enc": np.ascontiguousarray(a["encoder.weight"].T), "b_enc": a["encoder.bias"], "W_dec": a["W_dec"], "b_dec": a["b_dec"]}
    if cfg.get("normalize_decoder", True):  # sparsify renormalises the rows before every forward
        p["W_dec"] = p["W_dec"] / np.maximum(np.linalg.norm(p["W_dec"], axis=1, keepdims=True), 1e-12)
    hook = _sparsify_hook(folder, folder.name, store)
    k = int(cfg["k"])
    return [(Member(f"{hook}.sparsify.w{p['W_dec'].shape[0]}.k{k}", hook, p["W_dec"].shape[0], k, 1.0, "topk"), p)]


def open_foreign(path, store) -> Run:
    """The SAELens or sparsify dictionaries under `path` as a Run on `store` (an open Store)."""
    root = Path(path).expanduser()
    what = kind(root)
    if what is None:
        raise RunError(
            f"{root}: neither a sae-jax run (bank.json) nor a SAELens ({' + '.join(SAELENS)}) or sparsify ({' + '.join(SPARSIFY)}) folder"
        )
    reader = _saelens if what == "saelens" else _sparsify
    found = [f for d in _dictionaries(root, SAELENS if what == "saelens" else SPARSIFY) for f in reader(d, store)]
    seen: dict[str, int] = {}
    for i, (mem, p) in enumerate(found):  # two dictionaries alike (hook, width, k): told apart by their folders' order
        seen[mem.name] = seen.get(mem.name, 0) + 1
        if seen[mem.name] > 1:
            found[i] = (dataclasses.replace(mem, name=f"{mem.name}.{seen[mem.name]}"), p)
    d_in = {p["W_enc"].shape[0] for _, p in found}
    if len(d_in) != 1:
        raise RunError(f"{root}: dictionaries of different input widths {sorted(d_in)}; give one folder at a time")
    (d,) = d_in
    for mem, p in found:
        if p["W_dec"].shape != (mem.width, d) or p["W_enc"].shape != (d, mem.width) or store.width(mem.hook) != d:
            raise RunError(
                f"{root}: {mem.name}: W_enc {p['W_enc'].shape}, W_dec {p['W_dec'].shape} do not fit hook {mem.hook!r} "
                f"of width {store.width(mem.hook)} in {store.root}"
            )
    width = max(mem.width for mem, _ in found)

    def stack(name):
        out = []
        for _, p in found:
            a = p.get(name, np.zeros(width, np.float32))  # only thresholds can be absent
            if name == "W_enc":
                a = np.pad(a, [(0, 0), (0, width - a.shape[1])])
            elif name == "W_dec":
                a = np.pad(a, [(0, width - a.shape[0]), (0, 0)])
            elif name != "b_dec":
                a = np.pad(a, [(0, width - a.shape[0])])
            out.append(a)
        return np.stack(out)

    params = {n: stack(n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    thresholds = stack("threshold") if any("threshold" in p for _, p in found) else None
    members = [mem for mem, _ in found]
    m = store.manifest
    n_train = store.n_records - store.shards[-1]["records"]
    meta = {
        "architecture": members[0].architecture,
        "kind": what,
        "d_in": d,
        "d_out": d,
        "width": width,
        "transcoder": False,
        "members": [vars(mem) for mem in members],
        "store": {
            "root": str(Path(store.root).absolute()),
            **{k: m[k] for k in ("model", "tokenizer", "source", "ctx_len", "bos_prepended", "exclude_special", "outlier_ratio", "dtype")},
            "train_records": [0, n_train],
        },
    }
    return Run(root, meta, {}, 0, 0, members, params, thresholds)


def open_dictionaries(path, step=None, store=None) -> tuple[Run, str | None]:
    """A sae-jax run directory (`open_run`) or a SAELens / sparsify folder on `store` (a path;
    required for those). Returns (run, store path to read rows from, or None for the run's own)."""
    from sae_jax.data.store import open_store
    from sae_jax.runs import open_run

    if kind(path) is None:
        return open_run(path, step), store
    if store is None:
        raise RunError(f"{path}: a {kind(path)} folder; give --store STORE (a store of its hook's activations) to read rows and text from")
    if step is not None:
        raise RunError(f"{path}: --step applies to sae-jax runs; a {kind(path)} folder holds one dictionary per hook")
    st = open_store(store)
    return open_foreign(path, st), str(st.root)
