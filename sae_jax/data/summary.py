"""`sae-jax info STORE`: a store's identity, layout and statistics in a few lines. Reads the
manifest only (no jax): a store from `harvest`, from `StoreWriter` (any hook names, no model)
or from a SAELens cache."""

from __future__ import annotations

import numpy as np

from sae_jax.data import store as st


def _model_line(m: dict) -> str:
    model = m.get("model") or {}
    name = model.get("name", "external")
    cfg = model.get("config") or {}
    parts = [model["architecture"]] if model.get("architecture") else []
    if cfg.get("n_layers"):
        parts.append(f"{cfg['n_layers']} layers")
    if cfg.get("d_model"):
        parts.append(f"d_model {cfg['d_model']}")
    return f"model      {name}" + (f" ({', '.join(parts)})" if parts else " (no model the zoo runs: written from arrays)")


def store_summary(store: st.Store) -> str:
    m = store.manifest
    contexts = m.get("contexts", m["shards"][-1]["contexts"][1] if m["shards"] and "contexts" in m["shards"][-1] else None)
    tokens = f"tokens     {store.n_rows:,} rows"
    if contexts is not None and m.get("ctx_len"):
        tokens += f" from {contexts:,} contexts of {m['ctx_len']}"
    lines = [
        f"store      {store.root}",
        _model_line(m),
        f"source     {m.get('source', 'external')}",
        f"status     {'complete' if m.get('complete') else 'INCOMPLETE (harvest still running or killed)'}",
        tokens,
    ]
    if "exclude_special" in m:
        outliers = m.get("rows_outliers", sum(s.get("rows_outliers", 0) for s in store.shards))
        lines.append(
            f"left out   special tokens: {'yes' if m['exclude_special'] else 'no'}; "
            f"{outliers:,} outlier rows (squared norm > {m.get('outlier_ratio', 0):g}x median); "
            f"{sum(s.get('rows_dropped', 0) for s in store.shards):,} shard-tail rows (records are full)"
        )
    lines.append(f"layout     {len(store.shards)} shards, {store.n_records:,} records of {m['rows_per_record']} rows, dtype {m['dtype']}")
    total = sum(f["bytes"] for s in store.shards for f in s["files"].values())
    lines.append(f"size       {total / 2**20:,.1f} MiB on disk")
    lines.append("hooks")
    for name, meta in m["hooks"].items():
        ms = meta.get("mean_sq_norm")
        mean_norm = float(np.linalg.norm(meta["mean"])) if meta.get("mean") else float("nan")
        lines.append(
            f"  {name:<28} width {meta['width']:>5}  mean sq norm {ms if ms is not None else float('nan'):>10.3f}  |mean| {mean_norm:>8.3f}"
        )
    if "forward" in m:
        f, r = m["forward"], m.get("last_run", {})
        lines.append(f"forward    one compiled executable for [{f['batch']}, {f['ctx_len']}] tokens")
        if r.get("loop_s"):
            lines.append(
                f"last run   {r['tokens']:,} tokens in {r['loop_s']:.1f} s ({r['tokens'] / r['loop_s']:,.0f} tok/s; compile {r['compile_s']:.1f} s)"
            )
    return "\n".join(lines)
