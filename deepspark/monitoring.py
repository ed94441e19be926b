"""Drift monitoring's contract between training and inference: the reference a model is
registered with, how a run's values are binned against it, and the verdict per statistic.

Training captures a `Reference` from the model's test split when it logs the model (the file
`REFERENCE_FILE` among the model's artifacts): every input statistic its modality defines
(`Modality.input_statistics`: image brightness and contrast, text length and out-of-vocabulary
rate, audio duration and loudness), the top-1 probability, the predicted labels' shares and a
sample of penultimate-layer embeddings. Inference bins each scored row on executors with
`bin_rows` (the reference's equal-mass bins), counts the bins in Spark and calls `compare` on the
driver. Pure functions: no Spark, no TensorFlow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from deepspark import drift

REFERENCE_FILE = "drift_reference.json"
PROBABILITY = "top1_probability"  # the top-1 probability, binned like an input statistic
LABELS = "predicted_label"  # the predicted labels' shares
EMBEDDING = "embedding"  # the penultimate layer's vectors, compared by MMD
HASH_SPACE = 16**8  # a row is in the embedding sample when its content hash's first 8 hex digits fall below a cut


@dataclass(frozen=True)
class Thresholds:
    """When a statistic counts as drifted. PSI over 0.2 is the usual reading of a shift; a
    Jensen-Shannon distance of 0.2 is about the same size of change in label shares; MMD's
    permutation p-value under `mmd_p_value` rejects "same distribution". With fewer than
    `min_rows` scored rows nothing is judged (the noise of a small histogram would alarm)."""

    psi: float = 0.2
    jensen_shannon: float = 0.2
    mmd_p_value: float = 0.01
    min_rows: int = 100


@dataclass(frozen=True)
class Reference:
    """What the model saw on its test split. `edges[name]` are a statistic's inner bin edges
    (the outer bins are open) and `shares[name]` its rows' share per bin; the predicted labels'
    shares are by label index."""

    rows: int
    edges: dict[str, list[float]]
    shares: dict[str, list[float]]
    label_shares: list[float]
    embedding: list[list[float]] | None = None
    statistics_of: str = ""  # the modality whose `input_statistics` made the input statistics

    @property
    def statistics(self) -> list[str]:
        """Binned statistics in a fixed order: the modality's, then the top-1 probability."""
        return list(self.edges)

    @classmethod
    def capture(cls, statistics: Mapping[str, np.ndarray], probabilities: np.ndarray,
                embeddings: np.ndarray | None, modality: str, bins: int = 10, sample: int = 256,
                seed: int = 0) -> "Reference":
        """From per-row input statistics, the class probabilities and (optionally) the
        embeddings of the same rows."""
        probabilities = np.asarray(probabilities, np.float64)
        values = {**{k: np.asarray(v, np.float64) for k, v in statistics.items()},
                  PROBABILITY: probabilities.max(axis=1)}
        edges = {name: _edges(v, bins) for name, v in values.items()}
        shares = {name: (bin_counts(bin_rows(v, edges[name]), len(edges[name]) + 1) / max(len(v), 1)).tolist()
                  for name, v in values.items()}
        labels = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1]) / max(len(probabilities), 1)
        kept = None
        if embeddings is not None and len(embeddings) >= 2:
            pick = np.random.default_rng(seed).permutation(len(embeddings))[:sample]
            kept = np.round(np.asarray(embeddings, np.float64)[np.sort(pick)], 6).tolist()
        return cls(len(probabilities), edges, shares, labels.tolist(), kept, modality)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Reference":
        return cls(**json.loads(text))


def _edges(values: np.ndarray, bins: int) -> list[float]:
    """Equal-mass inner edges, and around every value holding at least half a bin's share of the
    reference (a statistic that is often exactly 0, such as the out-of-vocabulary rate) a bin of
    its own: otherwise its ties fill one open bin and a move away from it goes unseen."""
    finite = values[np.isfinite(values)]  # a NaN or infinite value goes to an outer bin, not into the edges
    if not finite.size:
        return []
    inner = set(drift.reference_edges(finite, bins)[1:-1].tolist())
    found, counts = np.unique(finite, return_counts=True)
    for atom in found[counts >= len(values) / (2 * bins)]:
        inner.update((float(atom), float(np.nextafter(atom, np.inf))))
    return sorted(float(e) for e in inner)


def bin_rows(values: np.ndarray, inner_edges: Sequence[float]) -> np.ndarray:
    """Each value's bin on the reference's edges: bin i holds edge[i-1] <= v < edge[i], as
    numpy's histogram has it (NaN goes to the last bin)."""
    return np.searchsorted(np.asarray(inner_edges, np.float64), np.asarray(values, np.float64), side="right")


def bin_counts(bins: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(np.asarray(bins, np.int64), minlength=size)[:size].astype(np.float64)


def in_sample(content_hashes: Sequence[str | None], fraction: float) -> np.ndarray:
    """Which rows join the embedding sample: decided by the content hash, so every worker and
    every rerun picks the same rows."""
    cut = fraction * HASH_SPACE
    return np.array([h is not None and int(h[:8], 16) < cut for h in content_hashes], dtype=bool)


@dataclass(frozen=True)
class Verdict:
    """One statistic of one model version in one window: its distance from the reference."""

    statistic: str
    kind: str  # input | prediction | embedding
    method: str  # psi | jensen_shannon | mmd
    value: float | None  # None: too few rows to judge
    threshold: float
    drifted: bool
    rows: int
    counts: list[int] = field(default_factory=list)  # this window's rows per bin (per label)
    reference_shares: list[float] = field(default_factory=list)
    p_value: float | None = None  # MMD's permutation p-value

    def describe(self) -> str:
        if self.value is None:
            return f"{self.statistic}: not judged ({self.rows} rows)"
        if self.method == "mmd":
            return f"{self.statistic} MMD p={self.p_value:.3g}"
        return f"{self.statistic} {'PSI' if self.method == 'psi' else 'JS'} {self.value:.3g}"


def compare(reference: Reference, counts: Mapping[str, np.ndarray], label_counts: np.ndarray,
            embeddings: np.ndarray | None, thresholds: Thresholds, permutations: int = 200) -> list[Verdict]:
    """The verdict on every statistic: binned counts (by the reference's bins) against the
    reference's shares by PSI, label counts by Jensen-Shannon distance, the embedding sample by
    MMD. Statistics missing from `counts` are skipped."""
    out = []
    for name in reference.statistics:
        if name not in counts:
            continue
        seen = np.asarray(counts[name], np.float64)
        rows = int(seen.sum())
        value = drift.psi(np.asarray(reference.shares[name]), seen / rows) if rows >= thresholds.min_rows else None
        out.append(Verdict(name, "prediction" if name == PROBABILITY else "input", "psi", value, thresholds.psi,
                           value is not None and value > thresholds.psi, rows, [int(c) for c in seen],
                           list(reference.shares[name])))
    labels = np.asarray(label_counts, np.float64)
    rows = int(labels.sum())
    value = drift.jensen_shannon(np.asarray(reference.label_shares), labels / rows) if rows >= thresholds.min_rows else None
    out.append(Verdict(LABELS, "prediction", "jensen_shannon", value, thresholds.jensen_shannon,
                       value is not None and value > thresholds.jensen_shannon, rows, [int(c) for c in labels],
                       list(reference.label_shares)))
    if reference.embedding is not None and embeddings is not None:
        sample = np.asarray(embeddings, np.float64)
        judged = len(sample) >= min(thresholds.min_rows, len(reference.embedding))
        result = drift.mmd_test(np.asarray(reference.embedding), sample, permutations) if judged else None
        out.append(Verdict(EMBEDDING, "embedding", "mmd", result.mmd2 if result else None, thresholds.mmd_p_value,
                           result is not None and result.p_value < thresholds.mmd_p_value, len(sample),
                           p_value=result.p_value if result else None))
    return out


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line: which statistics drifted, else the largest distances."""
    drifted = [v for v in verdicts if v.drifted]
    if drifted:
        return "DRIFT in " + ", ".join(f"{v.describe()} > {v.threshold:g}" if v.method != "mmd"
                                       else f"{v.describe()} < {v.threshold:g}" for v in drifted)
    judged = [v for v in verdicts if v.value is not None]
    if not judged:
        return "not judged: " + ", ".join(v.describe() for v in verdicts[:1])
    return "no drift (" + ", ".join(v.describe() for v in judged) + ")"


def as_metrics(verdicts: Sequence[Verdict], prefix: str = "drift_") -> dict[str, Any]:
    """MLflow metrics: each judged statistic's value (MMD: its p-value) and whether any drifted."""
    out: dict[str, Any] = {f"{prefix}{v.statistic}": (v.p_value if v.method == "mmd" else v.value)
                           for v in verdicts if v.value is not None}
    out[f"{prefix}detected"] = float(any(v.drifted for v in verdicts))
    return out
