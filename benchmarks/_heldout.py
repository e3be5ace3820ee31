"""Held-out metrics of a trained dictionary, one definition for every trainer in benchmarks/peers.py.

numpy only: imported by the sae_jax worker (.venv) and by the PyTorch peers' worker (.peer-venv),
each passing its own library's reconstruction of the same rows.
"""

from __future__ import annotations

import numpy as np


class Accumulator:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (the mean over all rows),
    L0 = mean active latents per row, dead = latents active on no row. Fed chunk by chunk."""

    def __init__(self, width: int):
        self.fired = np.zeros(width, bool)
        self.err = 0.0
        self.sum = None
        self.sq = 0.0
        self.n = 0
        self.l0 = 0.0

    def add(self, x: np.ndarray, x_hat: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
        x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
        self.err += float(((x - x_hat) ** 2).sum())
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.sq += float((x**2).sum())
        self.n += len(x)
        active = np.asarray(values) > 0
        self.l0 += float(active.sum())
        self.fired[np.asarray(indices)[active]] = True

    def result(self) -> dict:
        total = self.sq - float((self.sum**2).sum()) / self.n  # sum ||x - mean||^2
        return {
            "fvu": self.err / total,
            "l0": self.l0 / self.n,
            "dead_frac": float(1.0 - self.fired.mean()),
            "eval_rows": self.n,
        }


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM (Linux). Not ru_maxrss, which a process started
    by fork + exec inherits from its parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def schedule(step: int, steps: int, warmup: int, decay_frac: float) -> float:
    """The learning-rate factor every trainer here uses: linear warmup over `warmup` steps, constant,
    linear decay to 0 over the last `decay_frac` of the steps (sae_jax's default schedule;
    SAELens's `constant` scheduler with warm-up and decay steps is the same shape)."""
    decay_start = int(steps * (1 - decay_frac))
    if step < warmup:
        return step / max(warmup, 1)
    if step < decay_start:
        return 1.0
    return max(0.0, 1.0 - (step - decay_start) / max(steps - decay_start, 1))
