"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this directory is on sys.path)."""

from __future__ import annotations

import time


def timed(fn, n: int) -> float:
    """Seconds per call of `fn` over `n` calls, after one warm-up call (compilation excluded)."""
    import jax

    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
