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


@dataclass(frozen=True)
class WorldSpec:
    """A harder ground truth for benchmarks/recovery.py: `n_features` unit directions in `d_in`
    dimensions with base rates p_i proportional to (i + 1)^-skew (mean `mean_active` features per
    row); each feature has its own scale (lognormal, sigma `mag_sigma`) and each firing a
    lognormal factor (sigma `mag_sigma` / 2), so magnitudes are heavy-tailed; a share `corr` of
    the firings comes from co-occurring groups of `group` random features (a group event fires
    each member with probability 1/2), so a grouped feature fires at p_i (1 - corr) + corr x its
    group's mean p (`FeatureWorld.marginal`); isotropic Gaussian noise of total norm `noise` x the
    rms row norm. Firings are Poisson-sampled per chunk (a feature may fire twice in a row: the
    magnitudes add)."""

    d_in: int = 256
    n_features: int = 2048
    mean_active: float = 8.0
    skew: float = 1.0
    mag_sigma: float = 0.5
    corr: float = 0.3
    group: int = 4
    noise: float = 0.05

    def __post_init__(self):
        if self.d_in < 1 or self.n_features < 1 or self.mean_active <= 0 or self.group < 1:
            raise ValueError(f"WorldSpec: d_in, n_features, mean_active and group must be positive: {self}")
        if not 0.0 <= self.corr < 1.0:
            raise ValueError(f"WorldSpec.corr={self.corr}: a share in [0, 1)")


class FeatureWorld:
    """Sample rows of a `WorldSpec` (seeded; `sample(n, rng)` is chunk-wise reproducible)."""

    def __init__(self, spec: WorldSpec, seed: int = 0):
        self.spec = spec
        rng = np.random.default_rng([seed, 1])
        f = rng.normal(size=(spec.n_features, spec.d_in))
        self.features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        w = (np.arange(spec.n_features) + 1.0) ** -spec.skew
        self.probs = w / w.sum() * spec.mean_active  # marginal firing probability per row
        self.scales = np.exp(rng.normal(0.0, spec.mag_sigma, spec.n_features))
        perm = rng.permutation(spec.n_features)
        self.groups = perm[: spec.n_features - spec.n_features % spec.group].reshape(-1, spec.group)
        # a group event fires each member with probability 1/2: event rate = 2 x corr x mean member prob
        self.group_rate = 2.0 * spec.corr * self.probs[self.groups].mean(1) if len(self.groups) else np.zeros(0)
        self.solo = self.probs.copy()
        self.solo[self.groups.ravel()] *= 1.0 - spec.corr
        self.noise_std = 0.0
        if spec.noise > 0:
            x = self._clean(4096, np.random.default_rng([seed, 2]))
            self.noise_std = spec.noise * float(np.sqrt((x**2).sum(1).mean() / spec.d_in))

    @property
    def marginal(self) -> np.ndarray:
        """Each feature's expected firings per row: solo rate plus half its group's event rate."""
        m = self.solo.copy()
        if len(self.groups):
            m[self.groups] += self.group_rate[:, None] / 2
        return m

    def firings(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(row, feature) pairs of one chunk of `n` rows (Poisson sampling: a pair may repeat)."""
        m = rng.poisson(self.solo.sum() * n)
        rows = [rng.integers(0, n, m)]
        feats = [rng.choice(len(self.solo), m, p=self.solo / self.solo.sum())]
        if len(self.groups) and self.group_rate.sum() > 0:
            e = rng.poisson(self.group_rate.sum() * n)
            g = rng.choice(len(self.groups), e, p=self.group_rate / self.group_rate.sum())
            on = rng.random((e, self.spec.group)) < 0.5
            rows.append(np.repeat(rng.integers(0, n, e), self.spec.group)[on.ravel()])
            feats.append(self.groups[g].ravel()[on.ravel()])
        return np.concatenate(rows), np.concatenate(feats)

    def _clean(self, n: int, rng: np.random.Generator) -> np.ndarray:
        from scipy import sparse

        rows, feats = self.firings(n, rng)
        mags = self.scales[feats] * np.exp(rng.normal(0.0, self.spec.mag_sigma / 2, len(feats)))
        a = sparse.csr_matrix((mags, (rows, feats)), shape=(n, self.spec.n_features))
        return np.asarray(a @ self.features, np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = self._clean(n, rng)
        if self.noise_std > 0:
            x += rng.normal(0.0, self.noise_std, x.shape).astype(np.float32)
        return x

    def recovery(self, w_dec: np.ndarray, threshold: float = 0.9) -> dict:
        """Per true feature the best cosine with any decoder row: its mean, and the share above
        `threshold` (overall and for the most frequent tenth of the features)."""
        w = np.asarray(w_dec, np.float32)
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        best = np.concatenate([(self.features[i : i + 1024] @ w.T).max(1) for i in range(0, len(self.features), 1024)])
        top = best[: max(1, len(best) // 10)]  # features are sorted by frequency
        return {
            "mean_max_cos": float(best.mean()),
            "recovered": float((best > threshold).mean()),
            "recovered_frequent": float((top > threshold).mean()),
        }
