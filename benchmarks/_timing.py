"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this directory is on sys.path):
timing, and the JSON each writes under runs/bench."""

from __future__ import annotations

import json
import time
from pathlib import Path


def timed(fn, n: int) -> float:
    """Seconds per call of `fn` over `n` calls, after one warm-up call (compilation excluded)."""
    import jax

    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def write_json(name: str, obj) -> Path:
    """Write `obj` to runs/bench/NAME (the directory created) and say so."""
    out = Path("runs/bench") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=1))
    print(f"wrote {out}")
    return out
