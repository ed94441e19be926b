"""Drift statistics: how far a batch's values are from a reference's. Training captures the
reference when it registers a model; inference compares each run's inputs and predictions with
it, so the statistics and the reference's layout are a contract between the two stages.

Pure functions on numpy arrays (scipy for the Jensen-Shannon and Wasserstein distances):
- `psi` (population stability index) and `jensen_shannon` compare two binned distributions, such
  as label shares or a histogram on the reference's bins;
- `normed_wasserstein` compares two samples of one numeric statistic (brightness, length in tokens,
  duration), in units of the reference's standard deviation;
- `mmd_test` compares two samples of vectors (penultimate-layer embeddings) with a Gaussian-kernel
  maximum mean discrepancy and a permutation test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-4  # the share given to an empty bin, so a bin seen on one side only costs, not explodes


def reference_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Bin edges at the reference's quantiles (equal-mass bins), open at both ends so any later
    value falls in a bin."""
    inner = np.unique(np.quantile(np.asarray(values, np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    return np.concatenate([[-np.inf], inner, [np.inf]])


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each bin's share of `values` (bins from `reference_edges`)."""
    counts, _ = np.histogram(np.asarray(values, np.float64), edges)
    return counts / max(counts.sum(), 1)


def _smoothed(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, None)
    return p / p.sum()


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two binned distributions: sum (q - p) ln(q / p). Under 0.1
    is usually read as stable, over 0.2 as a shift."""
    p, q = _smoothed(reference), _smoothed(current)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two binned distributions."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(_smoothed(reference), _smoothed(current), base=2))


def normed_wasserstein(reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance of two samples over the reference's standard deviation (a
    shift of one standard deviation is 1.0); a constant reference is measured in its own units."""
    from scipy.stats import wasserstein_distance

    reference, current = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    spread = float(reference.std())
    return float(wasserstein_distance(reference, current)) / (spread if spread > 0 else 1.0)


@dataclass(frozen=True)
class MmdResult:
    mmd2: float  # the unbiased squared MMD estimate
    p_value: float  # the share of label permutations with an estimate at least as large
    bandwidth: float


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _mmd2(kernel: np.ndarray, n: int) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix whose first `n` rows are one sample."""
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = kernel.shape[0] - n
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def mmd_test(reference: np.ndarray, current: np.ndarray, permutations: int = 200, seed: int = 0) -> MmdResult:
    """Gaussian-kernel MMD between two samples of vectors (the bandwidth is the median pairwise
    distance of the pooled sample) and its permutation p-value."""
    x, y = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"mmd_test needs at least 2 vectors on each side (has {len(x)} and {len(y)})")
    pooled = np.concatenate([x, y])
    distances = _sq_distances(pooled, pooled)
    off_diagonal = distances[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.sqrt(np.median(off_diagonal))) or 1.0
    kernel = np.exp(-distances / (2 * bandwidth**2))
    observed = _mmd2(kernel, len(x))
    rng = np.random.default_rng(seed)
    # Every permutation at once: column j marks which pooled vectors form the first sample.
    first = np.zeros((len(pooled), permutations))
    for j in range(permutations):
        first[rng.permutation(len(pooled))[: len(x)], j] = 1.0
    at_least = int((_mmd2_split(kernel, first, len(x)) >= observed - 1e-12).sum())
    return MmdResult(observed, (at_least + 1) / (permutations + 1), bandwidth)


def _mmd2_split(kernel: np.ndarray, first: np.ndarray, n: int) -> np.ndarray:
    """`_mmd2` for each split of the pooled sample that a column of 0/1 marks (1: the first
    sample of size `n`), by kernel sums instead of reordering the matrix per split."""
    m = kernel.shape[0] - n
    second = 1.0 - first
    k_first, k_second = kernel @ first, kernel @ second
    diagonal = np.diag(kernel)
    xx = (first * k_first).sum(0) - diagonal @ first
    yy = (second * k_second).sum(0) - diagonal @ second
    xy = (first * k_second).sum(0)
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)
