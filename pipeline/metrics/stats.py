"""Confidence intervals and paired comparisons over samples and method seeds.

Every model is sampled from the same N initial noises and labels, and a method with S method seeds
(``<family>.seeds``) has S sample sets. The report's statistic of a row is the mean over its seeds of
a per-seed metric (FID from the seed's N features; the mean of a per-sample paired metric). Its
uncertainty comes from a two-level bootstrap (:class:`Bootstrap`), each replicate b:

1. draws N sample indices with replacement — *the same indices for every row* (sample i is the same
   noise and label in every model, so the comparison is paired over samples);
2. draws S seed positions with replacement — the same positions for every row with S seeds (seed k of
   two variants shares the calibration draw and the training order, so the comparison is paired over
   seeds too);

and recomputes the statistic. A row's interval is the percentile interval of its replicates shifted by
the bootstrap bias estimate (mean of the replicates − the point estimate): FID is biased upward at
finite N and a resample with duplicates has fewer distinct images, so the raw percentile interval of
FID would sit above the point estimate. The difference of two rows gets the same treatment from the
paired replicates; a claimed ordering *holds* when the whole interval is on its side, *does not hold*
when it is on the other side, and is *not separable at this N* otherwise.

FID here is computed from the features in float64 exactly as torchmetrics does (unbiased covariances,
Tr √(Σ_r Σ_g) through the eigenvalues of Σ_r^½ Σ_g Σ_r^½); a test checks it against torchmetrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

VERDICTS = ("holds", "does not hold", "not separable at this N")


def gaussian_stats(features: np.ndarray, weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of [N, D] features; ``weights`` = integer multiplicities (a bootstrap
    resample), so the result equals the statistics of the resampled rows."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"gaussian_stats: expected [N >= 2, D] features, got shape {x.shape}")
    if weights is None:
        mu = x.mean(0)
        xc = x - mu
        return mu, xc.T @ xc / (x.shape[0] - 1)
    w = np.asarray(weights, dtype=np.float64)
    n = w.sum()
    mu = (w[:, None] * x).sum(0) / n
    xc = x - mu
    return mu, (xc * w[:, None]).T @ xc / (n - 1)


def sqrt_psd(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


@dataclass
class Reference:
    """Reference statistics with Σ_r^½ precomputed (every FID against them costs one eigvalsh)."""

    mu: np.ndarray
    cov: np.ndarray

    def __post_init__(self):
        self.root = sqrt_psd(self.cov)
        self.trace = float(np.trace(self.cov))

    @classmethod
    def from_features(cls, features: np.ndarray) -> "Reference":
        return cls(*gaussian_stats(features))

    def fid(self, mu: np.ndarray, cov: np.ndarray) -> float:
        m = self.root @ cov @ self.root
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        return float(((mu - self.mu) ** 2).sum() + self.trace + np.trace(cov) - 2 * tr_sqrt)

    def fid_of(self, features: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
        return self.fid(*gaussian_stats(features, weights))


def fid_between(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets."""
    return Reference.from_features(b).fid_of(a)


class Bootstrap:
    """Shared resampling plan: ``replicates`` draws of N sample indices (as multiplicities) and of seed
    positions, the same for every row (see the module docstring)."""

    def __init__(self, n_samples: int, replicates: int = 1000, seed: int = 0, max_seeds: int = 16):
        if replicates < 10:
            raise ValueError(f"replicates: need at least 10 bootstrap replicates, got {replicates}")
        rng = np.random.default_rng(seed)
        self.n, self.replicates = int(n_samples), int(replicates)
        idx = rng.integers(0, self.n, size=(self.replicates, self.n))
        self.weights = np.stack([np.bincount(r, minlength=self.n) for r in idx])
        self.seed_u = rng.random((self.replicates, max_seeds))  # seed draws: floor(u * S)

    def seed_positions(self, b: int, n_seeds: int) -> np.ndarray:
        if n_seeds > self.seed_u.shape[1]:
            raise ValueError(f"at most {self.seed_u.shape[1]} method seeds per row, got {n_seeds}")
        return np.floor(self.seed_u[b, :n_seeds] * n_seeds).astype(int)

    def replicate_fid(self, reference: Reference, features_by_seed: Sequence[np.ndarray]) -> np.ndarray:
        """Replicates of mean-over-seeds FID. Each seed's FID is computed once per replicate."""
        s = len(features_by_seed)
        out = np.empty(self.replicates)
        for b in range(self.replicates):
            w = self.weights[b]
            pos = self.seed_positions(b, s)
            per = {k: reference.fid_of(features_by_seed[k], w) for k in set(pos.tolist())}
            out[b] = np.mean([per[k] for k in pos])
        return out

    def replicate_mean(self, values_by_seed: Sequence[np.ndarray]) -> np.ndarray:
        """Replicates of the mean over seeds of the (weighted) mean of a per-sample metric."""
        v = np.stack([np.asarray(x, dtype=np.float64) for x in values_by_seed])  # [S, N]
        per_seed = (self.weights @ v.T) / self.n  # [B, S]
        out = np.empty(self.replicates)
        for b in range(self.replicates):
            out[b] = per_seed[b, self.seed_positions(b, v.shape[0])].mean()
        return out


def interval(point: float, replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected percentile interval: the replicates' percentile interval shifted by their bias."""
    reps = np.asarray(replicates, dtype=np.float64)
    bias = reps.mean() - point
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo - bias), float(hi - bias)


def verdict(lo: float, hi: float, lower_is_better: bool) -> str:
    """Verdict of the claim "better < worse" (lower is better) from the interval of better − worse."""
    if lower_is_better:
        lo, hi = -hi, -lo
    # now the interval of the improvement (positive = the claim's direction)
    if lo > 0:
        return VERDICTS[0]
    if hi < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def replicate_stat(boot: Bootstrap, metric: str, reference: Optional[Reference],
                   per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """Replicates of a row's statistic: FID from features, else the mean of a per-sample metric."""
    if metric == "fid":
        if reference is None:
            raise ValueError("FID replicates need the reference statistics")
        return boot.replicate_fid(reference, per_seed)
    return boot.replicate_mean(per_seed)


def point_stat(metric: str, reference: Optional[Reference], per_seed: Sequence[np.ndarray]) -> float:
    if metric == "fid":
        return float(np.mean([reference.fid_of(f) for f in per_seed]))
    return float(np.mean([np.mean(v) for v in per_seed]))

