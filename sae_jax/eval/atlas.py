"""`sae-jax atlas RUN`: for every latent, its top activating contexts and random samples across
its activation quantiles, from one streaming pass over text, in bounded memory.

Memory is O(d_sae x (top + samples) x window), whatever the amount of text: each batch's firings
are merged into two per-latent tables, the `top` largest activations and `samples` activations of
uniform random priority (a bottom-k sample, which is a uniform sample of the latent's firings).
Only firings that beat a latent's current last entry are merged, and only the latents they touch.

Output, in `RUN/atlas/` (or `--out`):
- `<member>.jsonl`: one JSON object per latent, sorted by latent id:
    latent, count (firings), frequency (firings / positions read), max_activation, mean_activation,
    top: [example], quantiles: [{"range": [q_lo, q_hi], "examples": [example]}] (the random
    sample split into quartiles of its own activations; empty for latents that never fired),
    head_attribution (attn_z members: ||W_dec row restricted to each head's slice||, per head).
  An example: {"activation", "context" (index in the text stream), "position" (in the context),
  "index" (of the activating token in `tokens`), "tokens" (decoded strings of the window),
  "token_ids", "activations" (this latent's activation at each window token)}.
- `<member>.meta.json`: settings, model, text, token counts; `index.html`: a self-contained page
  to browse the latents (search by id, contexts highlighted by activation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.eval.errors import EvalError
from sae_jax.eval.inputs import heldout_rows, heldout_start, load_run_model, missing_model, splice_mask, text_contexts
from sae_jax.model.hooks import parse_hook
from sae_jax.sae import folded

LEFT, RIGHT = 24, 8  # window around the activating token
WINDOW = LEFT + 1 + RIGHT


class LatentTable:
    """Per latent, the `n` entries with the largest keys seen so far (descending), with payloads."""

    def __init__(self, width: int, n: int):
        self.n = n
        self.key = np.full((width, n), -np.inf, np.float32)
        self.act = np.zeros((width, n), np.float32)
        self.where = np.full((width, n, 2), -1, np.int32)  # (context, position)
        self.tokens = np.zeros((width, n, WINDOW), np.int32)
        self.window = np.zeros((width, n, WINDOW), np.float16)

    def threshold(self, latents: np.ndarray) -> np.ndarray:
        return self.key[latents, -1]

    def merge(self, lat, key, act, where, tokens, window) -> None:
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
        pick(self.tokens, tokens)
        pick(self.window, window)
        pick(self.key, key)


def latent_encoder(lm, hook, k: int, outlier_ratio: float, kind: str = "topk"):
    from flax import nnx

    graphdef, state = nnx.split(lm.model)
    special = lm.special_ids

    @jax.jit
    def run(state, p, tokens):
        _, acts = nnx.merge(graphdef, state)(tokens, (hook,), logits=False)
        a = acts[hook.name]
        keep = splice_mask(tokens, a, special, outlier_ratio)
        v, i = folded.encode(p, a.reshape(-1, a.shape[-1]), k, kind)
        v = jnp.where(keep.reshape(-1, 1), v, 0.0)
        return v.reshape(*tokens.shape, k), i.reshape(*tokens.shape, k), keep

    return lambda p, tokens: run(state, p, tokens)


def _windows(tok, v, i, ctx_idx, pos, lat):
    """Token windows [C, W] (-1 outside the context) and the latent's activations over them."""
    t = tok.shape[1]
    q = pos[:, None] + np.arange(-LEFT, RIGHT + 1)[None, :]
    ok = (q >= 0) & (q < t)
    qc = np.clip(q, 0, t - 1)
    ids = np.where(ok, tok[ctx_idx[:, None], qc], -1)
    hit = i[ctx_idx[:, None], qc] == lat[:, None, None]  # [C, W, k]
    acts = np.where(ok, np.sum(np.where(hit, v[ctx_idx[:, None], qc], 0.0), -1), 0.0)
    return ids.astype(np.int32), acts.astype(np.float16)


class Scan(NamedTuple):
    """What one streaming pass over a member collects (`scan_member`)."""

    tops: LatentTable
    samples: LatentTable
    counts: np.ndarray  # [width] firings
    sums: np.ndarray  # [width] sum of activations
    positions: int  # positions read
    hist: Histograms


def scan_member(p, k, encode, ctx: np.ndarray, batch_size: int, top: int, samples: int, seed: int = 0, progress=None, sink=None):
    """One streaming pass; returns (top table, sample table, counts, sums, positions read).
    `sink(tokens, context, position, latent, activation)` also receives each batch's firings."""
    width = p["W_enc"].shape[1]
    tops, samp = LatentTable(width, top), LatentTable(width, samples)
    counts, sums = np.zeros(width, np.int64), np.zeros(width, np.float64)
    rng = np.random.default_rng(seed)
    pj = {key: jnp.asarray(a) for key, a in p.items()}
    positions = 0
    hist = Histograms(width)
    for s in range(0, len(ctx), batch_size):
        tok = ctx[s : s + batch_size]
        m = len(tok)
        padded = np.concatenate([tok, np.repeat(tok[-1:], batch_size - m, 0)]) if m < batch_size else tok
        v, i, keep = (np.asarray(a)[:m] for a in encode(pj, jnp.asarray(padded)))
        positions += int(keep.sum())
        c_idx, pos, slot = np.nonzero(v > 0)
        lat, val = i[c_idx, pos, slot], v[c_idx, pos, slot]
        if sink is not None:
            sink(tok, c_idx, pos, lat, val)
        np.add.at(counts, lat, 1)
        np.add.at(sums, lat, val)
        hist.add(lat, val)
        for table, key in ((tops, val), (samp, rng.random(len(val), dtype=np.float32))):
            better = key > table.threshold(lat)
            if better.any():
                cb, pb, lb = c_idx[better], pos[better], lat[better]
                ids, win = _windows(tok, v, i, cb, pb, lb)
                where = np.stack([cb + s, pb], -1).astype(np.int32)
                table.merge(lb, key[better], val[better], where, ids, win)
        if progress:
            progress(m)
    return Scan(tops, samp, counts, sums, positions, hist)


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


def _delphi_cache(root, mem, run, ctx, split, text, batch_size: int, n_splits: int):
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
    return DelphiCache(Path(root) / mem.name, hookpoint, mem.width, n_splits, int(ctx.shape[1]), config)


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
    }


def _logit_field(effects, decode):
    ti, tv, bi, bv = effects

    def field(lat: int) -> dict:
        return {
            "promoted": [[decode(int(t)), round(float(v), 4)] for t, v in zip(ti[lat], tv[lat], strict=True)],
            "suppressed": [[decode(int(t)), round(float(v), 4)] for t, v in zip(bi[lat], bv[lat], strict=True)],
        }

    return field


def write_records(path: Path, width: int, scan, decode, extra: dict, ids_map=None) -> Path:
    """`<member>.jsonl` from a `scan_member` result: one record per latent (the schema above);
    `extra[key](latent)` adds a field; `ids_map` maps the scanned ids to the `token_ids` written."""
    tops, samp, counts, sums, positions, hist = scan
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for lat in range(width):
            rec = {
                "latent": lat,
                "count": int(counts[lat]),
                "frequency": float(counts[lat] / max(positions, 1)),
                "max_activation": float(tops.act[lat, 0]) if counts[lat] else 0.0,
                "mean_activation": float(sums[lat] / counts[lat]) if counts[lat] else 0.0,
                "top": _examples(tops, lat, decode, ids_map),
                "quantiles": _quantiles(_examples(samp, lat, decode, ids_map)),
                "histogram": hist.counts[lat].tolist(),
                **{key: fn(lat) for key, fn in extra.items()},
            }
            f.write(json.dumps(rec) + "\n")
    tmp.rename(path)
    return path


def _examples(table: LatentTable, lat: int, decode, ids_map=None) -> list[dict]:
    out = []
    for j in np.nonzero(np.isfinite(table.key[lat]))[0]:
        ids = table.tokens[lat, j]
        valid = ids >= 0
        first = int(np.argmax(valid))
        ids_v = ids[valid]
        out.append(
            {
                "activation": float(table.act[lat, j]),
                "context": int(table.where[lat, j, 0]),
                "position": int(table.where[lat, j, 1]),
                "index": LEFT - first,
                "tokens": [decode(int(t)) for t in ids_v],
                "token_ids": (ids_v if ids_map is None else ids_map(ids_v)).tolist(),
                "activations": [round(float(a), 4) for a in table.window[lat, j][valid]],
            }
        )
    return out


def _quantiles(examples: list[dict], bins: int = 4) -> list[dict]:
    ex = sorted(examples, key=lambda e: e["activation"])
    if not ex:
        return []
    edges = np.linspace(0, len(ex), bins + 1).round().astype(int)
    return [{"range": [b / bins, (b + 1) / bins], "examples": ex[edges[b] : edges[b + 1]]} for b in range(bins)]


def head_attribution(w_dec: np.ndarray, n_heads: int) -> np.ndarray:
    """[w, n_heads]: the norm of each decoder row restricted to each head's slice of hook_z."""
    w, d = w_dec.shape
    return np.linalg.norm(w_dec.reshape(w, n_heads, d // n_heads), axis=-1)


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
    log=None,
):
    """Write the atlas of the run's members; yields one summary line per member, then the page.
    `delphi`: also a latent cache per member in delphi's layout under this directory (eval/delphi.py)."""
    from sae_jax.eval.html import write_page
    from sae_jax.foreign import open_dictionaries

    if contexts < 1 or top < 1 or samples < 1 or batch_size < 1:
        raise EvalError("--contexts, --top, --samples and --batch-size must be positive")
    run, store_path = open_dictionaries(run_dir, step, store)  # a sae-jax run, or a SAELens / sparsify folder on `store`
    run.refuse_transcoders("atlas")
    names = [m.name for m in run.members]
    if member is not None and member not in names:
        raise EvalError(f"{run.root}: no bank member {member!r} (members: {', '.join(names)})")
    out = Path(out or run.root / "atlas")
    out.mkdir(parents=True, exist_ok=True)
    if missing_model(run.store_meta, model_path):  # activations from anywhere: the held-out store rows
        if delphi:
            raise EvalError(f"--delphi: {missing_model(run.store_meta)}; delphi's cache is of text")
        yield from rows_atlas(run, store_path, member, rows, top, samples, out)
        return
    lm = load_run_model(run.store_meta, model_path)
    ctx = text_contexts(run.store_meta, lm, contexts, split, text)
    vocab = {}

    def decode(t: int) -> str:
        if t not in vocab:
            vocab[t] = lm.tokenizer.decode([t], skip_special_tokens=False)
        return vocab[t]

    written = []
    for m, mem in enumerate(run.members):
        if member is not None and mem.name != member:
            continue
        hook = parse_hook(mem.hook, lm.cfg.n_layers)
        p = run.folded(m)
        t0 = time.perf_counter()
        k = run.eval_k(m)
        enc = latent_encoder(lm, hook, k, float(run.store_meta["outlier_ratio"] or 0), mem.inference)
        cache = _delphi_cache(delphi, mem, run, ctx, split, text, batch_size, delphi_splits) if delphi else None
        scan = scan_member(p, k, enc, ctx, batch_size, top, samples, seed=m, sink=cache and cache.add)
        if cache is not None:
            to_str = getattr(lm.tokenizer, "to_str", None)
            yield f"{cache.close(to_str() if to_str else None)}: delphi latent cache ({int(cache.counts.sum()):,} activations)"
        secs = time.perf_counter() - t0
        heads = head_attribution(p["W_dec"], lm.cfg.n_heads) if hook.point == "attn_z" else None
        effects = logit_effects(lm, hook, p["W_dec"])
        extra = {"logits": _logit_field(effects, decode)}
        if heads is not None:
            extra["head_attribution"] = lambda lat, heads=heads: [round(float(h), 5) for h in heads[lat]]
        path = write_records(out / f"{mem.name}.jsonl", mem.width, scan, decode, extra)
        tok_s = len(ctx) * ctx.shape[1] / secs
        meta = member_meta(
            run,
            mem,
            scan,
            top,
            samples,
            secs,
            model=run.store_meta["model"]["name"],
            text={"split": split, "text": text, "contexts": int(len(ctx)), "ctx_len": int(ctx.shape[1])},
            window=[LEFT, RIGHT],
            n_heads=lm.cfg.n_heads if heads is not None else None,
            tokens_per_s=round(tok_s, 1),
        )
        (out / f"{mem.name}.meta.json").write_text(json.dumps(meta, indent=1))
        written.append(mem.name)
        yield f"{path}: {mem.width} latents, {meta['fired']} fired on {scan.positions:,} positions ({tok_s:,.0f} tok/s)"
    page = write_page(out, written)
    yield f"{page}: open in a browser"


def rows_atlas(run, store_path, member, rows: int, top: int, samples: int, out: Path):
    """The atlas of a store that names no model (activations written with `StoreWriter`): the
    scan of `scan_member` over the store's held-out rows instead of text, each row a context of
    one position. An example's `context` is the held-out row's number (store row = the first
    held-out row + it), `token_ids` the token id the writer gave that row (-1: none given),
    `tokens` a label of both. No logit effects (no model)."""
    from sae_jax.data.store import open_store

    st = open_store(store_path or run.store_meta["root"])
    written = []
    for m, mem in enumerate(run.members):
        if member is not None and mem.name != member:
            continue
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
        scan = scan_member(p, k, lambda pj, t, xj=xj, enc=enc: enc(pj, xj, t), ids, 1024, top, samples, seed=m)

        def label(r: int, tok=tok, first_row=first_row) -> str:
            return f"row {first_row + r}" + (f" · token {tok[r]}" if tok[r] >= 0 else "")

        path = write_records(out / f"{mem.name}.jsonl", mem.width, scan, label, {}, ids_map=lambda r, tok=tok: tok[r])
        rows_read = {"from": where, "count": int(len(x)), "first_row": first_row}
        meta = member_meta(run, mem, scan, top, samples, time.perf_counter() - t0, model=None, rows=rows_read)
        (out / f"{mem.name}.meta.json").write_text(json.dumps(meta, indent=1))
        written.append(mem.name)
        yield f"{path}: {mem.width} latents, {meta['fired']} fired on {len(x):,} held-out store rows (no model: rows, not text)"
    from sae_jax.eval.html import write_page

    yield f"{write_page(out, written)}: open in a browser"
