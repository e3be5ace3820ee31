"""`sae-jax atlas RUN`: for every latent, its top activating contexts and random samples across
its activation quantiles, from one streaming pass over text, in bounded memory.

Memory is O(d_sae x (top + samples) x window), whatever the amount of text: the text is read as
a stream, a context kept only while some table entry lies in it (`KeptText`), and each batch's
firings are merged into two per-latent tables, the `top` largest activations and `samples`
activations of uniform random priority (a bottom-k sample: a uniform sample of the latent's firings).
Only firings that beat a latent's current last entry are merged, and only the latents they touch.
A table entry is the firing's place (context, position), its activation, and the latent's
activations over the window as bytes (levels of the window's own maximum).

Output, in `RUN/atlas/` (or `--out`): `index.html` (a page to browse the latents), per member
`<member>.meta.json` (settings, model, text, counts) and the data files of `eval/atlas_files.py`
(the format; `read_atlas` reads it back in Python). Each example is written once, as its place,
activation and window of quantised activations; the text of the contexts once for all latents.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.eval.atlas_files import LEVELS, SHARD, TextSpans, examples, f32, js_file, swap_in, write_vocab
from sae_jax.eval.errors import EvalError
from sae_jax.eval.inputs import heldout_rows, heldout_start, load_run_model, missing_model, splice_mask, text_context_stream
from sae_jax.model.hooks import parse_hook
from sae_jax.sae import folded

BEFORE, AFTER = 24, 8  # default window around the activating token
INDEX_LATENTS = 500  # most frequent latents listed in the page's index


class LatentTable:
    """Per latent, the `n` entries with the largest keys seen so far (descending), with payloads:
    activation, (context, position), the latent's activations over the window `q` as levels of
    `scale` (the window's maximum) / 255."""

    def __init__(self, width: int, n: int, window: int):
        self.n = n
        self.key = np.full((width, n), -np.inf, np.float32)
        self.act = np.zeros((width, n), np.float32)
        self.where = np.full((width, n, 2), -1, np.int32)
        self.q = np.zeros((width, n, window), np.uint8)
        self.scale = np.zeros((width, n), np.float32)

    def threshold(self, latents: np.ndarray) -> np.ndarray:
        return self.key[latents, -1]

    def merge(self, lat, key, act, where, q, scale) -> None:
        """Merge candidates (arrays over candidates) into the rows of the latents they touch."""
        if len(lat) == 0:
            return
        rows, inv = np.unique(lat, return_inverse=True)
        n_old = len(rows) * self.n
        all_lat = np.concatenate([np.repeat(np.arange(len(rows)), self.n), inv])
        all_key = np.concatenate([self.key[rows].reshape(-1), key])
        order = np.lexsort((-all_key, all_lat))
        grp = all_lat[order]
        start = np.searchsorted(grp, np.arange(len(rows)))
        rank = np.arange(len(order)) - start[grp]
        sel = order[rank < self.n]
        dst_r, dst_c = all_lat[sel], rank[rank < self.n]

        def pick(old, new):
            both = np.concatenate([old[rows].reshape((n_old,) + old.shape[2:]), new])
            out = old[rows].copy()
            out[dst_r, dst_c] = both[sel]
            old[rows] = out

        pick(self.act, act)
        pick(self.where, where)
        pick(self.q, q)
        pick(self.scale, scale)
        pick(self.key, key)


def latent_encoder(lm, hook, k: int, outlier_ratio: float, kind: str = "topk"):
    """`encode(p, tokens) -> (values, indices, keep)` of one dictionary at `hook`."""
    enc = bank_encoder(lm, [hook], [k], outlier_ratio, [kind])
    return lambda p, tokens: enc([p], tokens)[0]


def bank_encoder(lm, hooks, ks, outlier_ratio: float, kinds):
    """`encode(params list, tokens) -> [(values, indices, keep)]`: every dictionary of the list
    (at its hook, with its k and inference kind) from one forward pass of the model."""
    from flax import nnx

    graphdef, state = nnx.split(lm.model)
    special = lm.special_ids
    names = tuple(dict.fromkeys(h.name for h in hooks))
    unique = tuple({h.name: h for h in hooks}[n] for n in names)

    @jax.jit
    def run(state, ps, tokens):
        _, acts = nnx.merge(graphdef, state)(tokens, unique, logits=False)
        out = []
        for p, hook, k, kind in zip(ps, hooks, ks, kinds, strict=True):
            a = acts[hook.name]
            keep = splice_mask(tokens, a, special, outlier_ratio)
            v, i = folded.encode(p, a.reshape(-1, a.shape[-1]), k, kind)
            v = jnp.where(keep.reshape(-1, 1), v, 0.0)
            out.append((v.reshape(*tokens.shape, k), i.reshape(*tokens.shape, k), keep))
        return out

    return lambda ps, tokens: run(state, list(ps), tokens)


class Firings:
    """A batch's firings, sorted by (context, position, latent) for lookups."""

    def __init__(self, c_idx, pos, lat, val, t: int, width: int):
        self.t, self.width = t, width
        key = (c_idx.astype(np.int64) * t + pos) * width + lat
        order = np.argsort(key, kind="stable")
        self.key, self.val = key[order], val[order]

    def at(self, c_idx, q, lat) -> np.ndarray:
        """The activation of `lat` at (context, position q) (0 where it did not fire)."""
        want = (c_idx.astype(np.int64) * self.t + q) * self.width + lat
        j = np.minimum(np.searchsorted(self.key, want), max(len(self.key) - 1, 0))
        return np.where(self.key[j] == want, self.val[j], 0.0) if len(self.key) else np.zeros(want.shape, np.float32)


def _windows(firings: Firings, ctx_idx, pos, lat, before: int, after: int):
    """The latent's activations over the window around each firing (0 outside the context), as
    uint8 levels [C, W] of their maximum [C] (the window's largest activation: the firing's own or
    more)."""
    q = pos[:, None] + np.arange(-before, after + 1)[None, :]
    ok = (q >= 0) & (q < firings.t)
    acts = np.where(ok, firings.at(ctx_idx[:, None], np.clip(q, 0, firings.t - 1), lat[:, None]), 0.0)
    scale = np.max(acts, -1)
    levels = np.rint(acts * (LEVELS / np.maximum(scale, 1e-30))[:, None])
    return np.clip(levels, 0, LEVELS).astype(np.uint8), scale.astype(np.float32)


class Scan(NamedTuple):
    """What one streaming pass over a member collects (`Scanner`)."""

    tops: LatentTable
    samples: LatentTable
    counts: np.ndarray  # [width] firings
    sums: np.ndarray  # [width] sum of activations
    positions: int  # positions read
    hist: Histograms


class Scanner:
    """One member's tables, fed a batch of its encodings at a time. `window`: (tokens before,
    after) the firing kept; `sink(tokens, context, position, latent, activation)` also receives
    each batch's firings."""

    def __init__(self, width: int, top: int, samples: int, seed: int = 0, window=(BEFORE, AFTER), sink=None):
        self.before, self.after = window
        w = self.before + 1 + self.after
        self.tops, self.samp = LatentTable(width, top, w), LatentTable(width, samples, w)
        self.counts, self.sums = np.zeros(width, np.int64), np.zeros(width, np.float64)
        self.rng = np.random.default_rng(seed)
        self.positions = 0
        self.hist = Histograms(width)
        self.sink = sink

    def add(self, tok: np.ndarray, v: np.ndarray, i: np.ndarray, keep: np.ndarray, first: int) -> None:
        """A batch: contexts `tok` [C, T] (numbered from `first`), values and indices [C, T, k]."""
        self.positions += int(keep.sum())
        c_idx, pos, slot = np.nonzero(v > 0)
        lat, val = i[c_idx, pos, slot], v[c_idx, pos, slot]
        if self.sink is not None:
            self.sink(tok, c_idx, pos, lat, val)
        np.add.at(self.counts, lat, 1)
        np.add.at(self.sums, lat, val)
        self.hist.add(lat, val)
        firings = Firings(c_idx, pos, lat, val, v.shape[1], len(self.counts))
        for table, key in ((self.tops, val), (self.samp, self.rng.random(len(val), dtype=np.float32))):
            better = key > table.threshold(lat)
            if better.any():
                cb, pb, lb = c_idx[better], pos[better], lat[better]
                q, scale = _windows(firings, cb, pb, lb, self.before, self.after)
                where = np.stack([cb + first, pb], -1).astype(np.int32)
                table.merge(lb, key[better], val[better], where, q, scale)

    def result(self) -> Scan:
        return Scan(self.tops, self.samp, self.counts, self.sums, self.positions, self.hist)


def batches(ctx, batch_size: int):
    """(first context's number, contexts [C, T], the batch padded to `batch_size` by repeating its
    last) from an array of contexts or an iterator of them."""
    it = iter(ctx)
    s = 0
    while tok := list(itertools.islice(it, batch_size)):
        tok = np.stack(tok)
        m = len(tok)
        yield s, tok, (np.concatenate([tok, np.repeat(tok[-1:], batch_size - m, 0)]) if m < batch_size else tok)
        s += m


class KeptText:
    """The contexts read, kept while some table entry lies in them: memory bounded by the examples
    kept (and the last `prune_every` batches), not by the text read."""

    def __init__(self, prune_every: int = 64):
        self.text: dict[int, np.ndarray] = {}
        self.prune_every, self.batches, self.read = prune_every, 0, 0

    def add(self, first: int, tok: np.ndarray, scanners) -> None:
        self.text.update((first + j, t) for j, t in enumerate(tok))
        self.read += len(tok)
        self.batches += 1
        if self.batches % self.prune_every == 0:
            self.prune(scanners)

    def prune(self, scanners) -> None:
        used = [t.where[..., 0][np.isfinite(t.key)] for sc in scanners for t in (sc.tops, sc.samp)]
        keep = set(np.unique(np.concatenate(used)).tolist()) if used else set()
        self.text = {c: t for c, t in self.text.items() if c in keep}

    def tokens(self, c: int, a: int, b: int) -> list[int]:
        return self.text[c][a:b].tolist()


def scan_member(
    p, k, encode, ctx: np.ndarray, batch_size: int, top: int, samples: int, seed: int = 0, progress=None, sink=None, window=(BEFORE, AFTER)
) -> Scan:
    """One streaming pass of one dictionary (`encode(p, tokens)`) over `ctx`."""
    scan = Scanner(p["W_enc"].shape[1], top, samples, seed, window, sink)
    pj = {key: jnp.asarray(a) for key, a in p.items()}
    for s, tok, padded in batches(ctx, batch_size):
        v, i, keep = (np.asarray(a)[: len(tok)] for a in encode(pj, jnp.asarray(padded)))
        scan.add(tok, v, i, keep, s)
        if progress:
            progress(len(tok))
    return scan.result()


class Histograms:
    """Per latent, counts of its activations in `BINS` log-spaced bins shared by the member: edges
    from 1/100 to 100 times the median of the first batch's activations (below and above: the
    end bins). Memory: width x BINS int32."""

    BINS = 24

    def __init__(self, width: int):
        self.counts = np.zeros((width, self.BINS), np.int32)
        self.edges: np.ndarray | None = None

    def add(self, lat: np.ndarray, val: np.ndarray) -> None:
        if len(val) == 0:
            return
        if self.edges is None:
            mid = float(np.median(val))
            self.edges = mid * np.geomspace(1e-2, 1e2, self.BINS + 1)
        b = np.clip(np.searchsorted(self.edges, val, side="right") - 1, 0, self.BINS - 1)
        np.add.at(self.counts, (lat, b), 1)


def logit_effects(lm, hook, w_dec: np.ndarray, n: int = 10, chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each latent's direct effect on the logits: its decoder row (through the layer's output
    projection for `attn_z`) scaled by the final norm's weight and multiplied by the unembedding,
    as dashboards show it. Returns (top ids, top values, bottom ids, bottom values), each [w, n]."""
    model = lm.model
    norm = model.final_norm
    w = norm.weight[...].astype(jnp.float32)
    scale = 1.0 + w if norm.kind == "rms_gemma" else w
    unembed = (model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...]).astype(jnp.float32)
    proj = None
    if hook.point == "attn_z":
        proj = model.blocks[hook.layer].wo[...].astype(jnp.float32)  # z [heads x head_dim] -> residual

    @jax.jit
    def run(rows):
        d = rows if proj is None else rows @ proj
        logits = (d * scale) @ unembed
        tv, ti = jax.lax.top_k(logits, n)
        bv, bi = jax.lax.top_k(-logits, n)
        return ti, tv, bi, -bv

    outs = [run(jnp.asarray(w_dec[i : i + chunk], jnp.float32)) for i in range(0, len(w_dec), chunk)]
    return tuple(np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(4))


def _delphi_cache(root, mem, run, ctx_len: int, split, text, batch_size: int, n_splits: int):
    from sae_jax.eval.delphi import DelphiCache
    from sae_jax.model.hf_modules import hf_module

    arch = (run.store_meta.get("model") or {}).get("architecture")
    hookpoint = hf_module(mem.hook, arch or "LlamaForCausalLM") or mem.hook  # as the sparsify export names it
    src = run.store_meta.get("source") or {}
    config = {
        "dataset_repo": text or src.get("name") or src.get("path") or src.get("source", ""),
        "dataset_split": split,
        "dataset_name": src.get("config") or "",
        "dataset_column": src.get("column") or "text",
        "batch_size": batch_size,
        "model_name": (run.store_meta.get("model") or {}).get("name", ""),
        "sae_jax": {"member": mem.name, "hook": mem.hook, "run": str(run.root.absolute()), "step": run.step},
    }
    return DelphiCache(Path(root) / mem.name, hookpoint, mem.width, n_splits, ctx_len, config)


def member_meta(run, mem, scan: Scan, top: int, samples: int, seconds: float, **fields) -> dict:
    """`<member>.meta.json`: the fields every atlas has, then `fields` (text or rows, ...)."""
    return {
        "member": mem.name,
        "hook": mem.hook,
        "width": mem.width,
        "k": mem.k,
        "run": str(run.root.absolute()),
        "step": run.step,
        **fields,
        "positions_read": scan.positions,
        "top": top,
        "samples": samples,
        "seconds": round(seconds, 2),
        "fired": int(np.sum(scan.counts > 0)),
        "histogram_edges": [] if scan.hist.edges is None else [float(e) for e in scan.hist.edges],
        "activations": f"uint8 levels of max_activation / {LEVELS}",
    }


def _logit_field(effects, decode):
    ti, tv, bi, bv = effects

    def field(lat: int) -> dict:
        return {
            "promoted": [[decode(int(t)), round(float(v), 4)] for t, v in zip(ti[lat], tv[lat], strict=True)],
            "suppressed": [[decode(int(t)), round(float(v), 4)] for t, v in zip(bi[lat], bv[lat], strict=True)],
        }

    return field


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


class AtlasWriter:
    """Writes the atlas of `eval/atlas_files.py` into `out`, a member at a time: the data files go
    to a hidden folder that replaces `out/data` only once the page's index is complete."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out / ".data.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.spans = TextSpans()
        self.members: list[dict] = []
        self.metas: dict[str, dict] = {}

    def add(self, name: str, scan: Scan, meta: dict, extra: dict, window, ctx_len: int, **index) -> dict:
        """Write one member's records; `extra[key](latent)` adds a field to each record."""
        tops, samp, counts, sums, positions, hist = scan
        before, after = window
        width = len(counts)
        j = len(self.members)
        folder = self.tmp / str(j)
        folder.mkdir()
        max_act = np.where(counts > 0, tops.act[:, 0], 0.0)
        freq = counts / max(positions, 1)
        mean = sums / np.maximum(counts, 1)
        for s in range(0, width, SHARD):
            rows = slice(s, min(s + SHARD, width))
            top_ex = examples(tops, rows, max_act[rows], before)
            samp_ex = examples(samp, rows, max_act[rows], before, ascending=True)
            records = []
            for r, lat in enumerate(range(rows.start, rows.stop)):
                records.append(
                    {
                        "latent": lat,
                        "count": int(counts[lat]),
                        "frequency": _sig(freq[lat]),
                        "max_activation": f32(max_act[lat]),
                        "mean_activation": _sig(mean[lat]),
                        "histogram": hist.counts[lat].tolist(),
                        **{key: fn(lat) for key, fn in extra.items()},
                        "top": top_ex[r],
                        "samples": samp_ex[r],
                    }
                )
            js_file(folder / f"{s // SHARD}.js", "atlasShard", (j, s // SHARD), records)
        for table in (tops, samp):
            self.spans.add(table.where, np.isfinite(table.key), before, after, ctx_len)
        meta = self.metas[name] = {**meta, "window": [before, after]}
        nz = np.nonzero(counts)[0]
        frequent = nz[np.argsort(-counts[nz], kind="stable")][:INDEX_LATENTS]
        self.members.append(
            {
                "name": name,
                "width": width,
                "fired": int(len(nz)),
                "frequent": [[int(lat), int(counts[lat])] for lat in frequent],
                "histogram_edges": meta["histogram_edges"],
                "window": [before, after],
                **index,
            }
        )
        return meta

    def finish(self, tokens_of, ctx_len: int, decode) -> Path:
        """The text of every example's window once, the tokens used, then the page."""
        from sae_jax.eval.html import write_page

        per_file, used = self.spans.write(self.tmp, tokens_of, ctx_len)
        write_vocab(self.tmp, used, decode)
        swap_in(self.tmp, self.out / "data")
        for name, meta in self.metas.items():
            path = self.out / f"{name}.meta.json"
            path.with_suffix(".tmp").write_text(json.dumps(meta, indent=1))
            path.with_suffix(".tmp").rename(path)
            (self.out / f"{name}.jsonl").unlink(missing_ok=True)  # an older atlas's copy of the examples
        return write_page(self.out, {"shard": SHARD, "text_per_file": per_file, "members": self.members})


def head_attribution(w_dec: np.ndarray, n_heads: int) -> np.ndarray:
    """[w, n_heads]: the norm of each decoder row restricted to each head's slice of hook_z."""
    w, d = w_dec.shape
    return np.linalg.norm(w_dec.reshape(w, n_heads, d // n_heads), axis=-1)


def parse_window(window) -> tuple[int, int]:
    """(before, after) from "24,8" or a pair; tokens kept on each side of an activating token."""
    try:
        parts = [int(x) for x in (window.split(",") if isinstance(window, str) else window)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or min(parts) < 0:
        raise EvalError(f"--window {window!r}: two counts of tokens BEFORE,AFTER the activating token, each >= 0 (e.g. 24,8)")
    return parts[0], parts[1]


def build_atlas(
    run_dir,
    *,
    step=None,
    member=None,
    contexts=512,
    top=20,
    samples=20,
    split="heldout",
    text=None,
    model_path=None,
    batch_size=8,
    out=None,
    store=None,
    delphi=None,
    delphi_splits=5,
    rows=65536,
    window=(BEFORE, AFTER),
    log=None,
):
    """Write the atlas of the run's members; yields one summary line per member, then the page.
    Every member's dictionary reads the same forward pass of the model (one per batch).
    `delphi`: also a latent cache per member in delphi's layout under this directory (eval/delphi.py)."""
    from sae_jax.foreign import open_dictionaries

    if contexts < 1 or top < 1 or samples < 1 or batch_size < 1:
        raise EvalError("--contexts, --top, --samples and --batch-size must be positive")
    window = parse_window(window)
    run, store_path = open_dictionaries(run_dir, step, store)  # a sae-jax run, or a SAELens / sparsify folder on `store`
    run.refuse_transcoders("atlas")
    names = [m.name for m in run.members]
    if member is not None and member not in names:
        raise EvalError(f"{run.root}: no bank member {member!r} (members: {', '.join(names)})")
    chosen = [m for m, mem in enumerate(run.members) if member is None or mem.name == member]
    out = Path(out or run.root / "atlas")
    out.mkdir(parents=True, exist_ok=True)
    if missing_model(run.store_meta, model_path):  # activations from anywhere: the held-out store rows
        if delphi:
            raise EvalError(f"--delphi: {missing_model(run.store_meta)}; delphi's cache is of text")
        yield from rows_atlas(run, store_path, chosen, rows, top, samples, out)
        return
    lm = load_run_model(run.store_meta, model_path)
    stream = text_context_stream(run.store_meta, lm, contexts, split, text)
    ctx_len = int(run.store_meta["ctx_len"])
    vocab = {}

    def decode(t: int) -> str:
        if t not in vocab:
            vocab[t] = lm.tokenizer.decode([t], skip_special_tokens=False)
        return vocab[t]

    t0 = time.perf_counter()
    mems = [run.members[m] for m in chosen]
    hooks = [parse_hook(mem.hook, lm.cfg.n_layers) for mem in mems]
    params = [run.folded(m) for m in chosen]
    ks = [run.eval_k(m) for m in chosen]
    enc = bank_encoder(lm, hooks, ks, float(run.store_meta["outlier_ratio"] or 0), [mem.inference for mem in mems])
    caches = [_delphi_cache(delphi, mem, run, ctx_len, split, text, batch_size, delphi_splits) if delphi else None for mem in mems]
    scanners = [
        Scanner(mem.width, top, samples, seed=m, window=window, sink=cache and cache.add)
        for m, mem, cache in zip(chosen, mems, caches, strict=True)
    ]
    pj = [{key: jnp.asarray(a) for key, a in p.items()} for p in params]
    kept = KeptText()
    for s, tok, padded in batches(stream, batch_size):
        for scan, (v, i, keep) in zip(scanners, enc(pj, jnp.asarray(padded)), strict=True):
            scan.add(tok, *(np.asarray(a)[: len(tok)] for a in (v, i, keep)), s)
        kept.add(s, tok, scanners)
    kept.prune(scanners)
    secs = time.perf_counter() - t0
    tok_s = kept.read * ctx_len / secs
    writer = AtlasWriter(out)
    for mem, hook, p, scanner, cache in zip(mems, hooks, params, scanners, caches, strict=True):
        if cache is not None:
            to_str = getattr(lm.tokenizer, "to_str", None)
            yield f"{cache.close(to_str() if to_str else None)}: delphi latent cache ({int(cache.counts.sum()):,} activations)"
        scan = scanner.result()
        heads = head_attribution(p["W_dec"], lm.cfg.n_heads) if hook.point == "attn_z" else None
        extra = {"logits": _logit_field(logit_effects(lm, hook, p["W_dec"]), decode)}
        if heads is not None:
            extra["head_attribution"] = lambda lat, heads=heads: [round(float(h), 5) for h in heads[lat]]
        meta = member_meta(
            run,
            mem,
            scan,
            top,
            samples,
            secs,
            model=run.store_meta["model"]["name"],
            text={"split": split, "text": text, "contexts": kept.read, "ctx_len": ctx_len},
            n_heads=lm.cfg.n_heads if heads is not None else None,
            tokens_per_s=round(tok_s, 1),
        )
        writer.add(mem.name, scan, meta, extra, window, ctx_len, kind="text")
        yield f"{out / mem.name}: {mem.width} latents, {meta['fired']} fired on {scan.positions:,} positions ({tok_s:,.0f} tok/s, all members)"
    page = writer.finish(kept.tokens, ctx_len, decode)
    yield f"{page}: open in a browser"


def rows_atlas(run, store_path, chosen: list[int], rows: int, top: int, samples: int, out: Path):
    """The atlas of a store that names no model (activations written with `StoreWriter`): the
    scan over the store's held-out rows instead of text, each row a context of one position. An
    example's `context` is the held-out row's number (store row = the first held-out row + it), its
    token the token id the writer gave that row (-1: none given), labelled "row N · token T" by the
    page and `read_atlas`. No logit effects (no model)."""
    from sae_jax.data.store import open_store

    st = open_store(store_path or run.store_meta["root"])
    writer = AtlasWriter(out)
    tok = None
    for m in chosen:
        mem = run.members[m]
        t0 = time.perf_counter()
        x, where = heldout_rows(run, st, mem.hook, rows)
        tok = heldout_rows(run, st, mem.hook, rows, part="tokens")[0].astype(np.int64)[:, 0]
        first_row = int(heldout_start(run, st)[0]) * st.rows_per_record
        p, k = run.folded(m), run.eval_k(m)

        @jax.jit
        def enc(pj, xj, ids, k=k, kind=mem.inference):
            v, i = folded.encode(pj, xj[ids[:, 0]], k, kind)
            return v[:, None], i[:, None], jnp.ones(ids.shape, bool)

        xj = jnp.asarray(x)
        ids = np.arange(len(x), dtype=np.int32)[:, None]
        scan = scan_member(p, k, lambda pj, t, xj=xj, enc=enc: enc(pj, xj, t), ids, 1024, top, samples, seed=m, window=(0, 0))
        rows_read = {"from": where, "count": int(len(x)), "first_row": first_row}
        meta = member_meta(run, mem, scan, top, samples, time.perf_counter() - t0, model=None, rows=rows_read)
        writer.add(mem.name, scan, meta, {}, (0, 0), 1, kind="rows", first_row=first_row)
        yield f"{out / mem.name}: {mem.width} latents, {meta['fired']} fired on {len(x):,} held-out store rows (no model: rows, not text)"
    yield f"{writer.finish(lambda c, a, b: [int(tok[c])], 1, str)}: open in a browser"
