"""Synthetic activations from known sparse features in superposition (ground truth for tests).

`n_features` random unit vectors in `d` dimensions; each token activates each feature i
independently with probability p_i (a power law over features, so frequencies vary by ~30x),
with magnitudes drawn from |N(1, 0.25)|-ish (uniform on [0.5, 1.5]). x = sum_i a_i f_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseFeatures:
    features: np.ndarray  # [n_features, d] unit rows
    probs: np.ndarray  # [n_features]

    @classmethod
    def make(cls, n_features: int, d: int, mean_active: float, seed: int = 0, exponent: float = 0.5) -> SparseFeatures:
        rng = np.random.default_rng(seed)
        f = rng.normal(size=(n_features, d))
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        w = (np.arange(n_features) + 1.0) ** -exponent
        probs = np.minimum(w / w.sum() * mean_active, 1.0)
        return cls(f.astype(np.float32), probs)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        active = rng.random((n, len(self.probs))) < self.probs
        mags = rng.uniform(0.5, 1.5, size=active.shape)
        return ((active * mags) @ self.features).astype(np.float32)

    def mean_max_cosine(self, w_dec: np.ndarray) -> float:
        """For each true feature, the best cosine with any decoder row; averaged."""
        w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
        return float((self.features @ w.T).max(axis=1).mean())
