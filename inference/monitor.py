"""Drift monitoring of batch inference, the I/O around `deepspark.monitoring`: the reference each
model version was registered with, what the scorer bins, the counts Spark adds up, the drift
table committed with the predictions, metrics and plots.

The scorer bins every scored row on the reference's edges on the executors and reads the
penultimate-layer embedding of a sample of rows chosen by content hash; the driver counts bins
with one aggregation over the rows the run scored (or, with `monitor.window=cumulative`, adds the
counts of the committed runs of that model version too) and judges them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from deepspark import monitoring
from deepspark.monitoring import PROBABILITY, Reference, Verdict

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from inference.model import ResolvedModel
    from inference.state import PredictionStore, Snapshot

log = logging.getLogger(__name__)

DRIFT_DDL = ("statistic string, kind string, method string, value double, threshold double, drifted boolean, "
             "rows long, counts array<long>, reference_shares array<double>, p_value double, window string, "
             "job_id string, scored_at string, model_version int")


def load_reference(model: "ResolvedModel", workdir: str) -> Reference | None:
    """The reference stored with a model version, None for one logged without it."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model.name}/{model.version}/artifacts/{monitoring.REFERENCE_FILE}",
            dst_path=os.path.join(workdir, f"reference-v{model.version}"))
    except Exception:  # noqa: BLE001  # MLflow raises several types for a missing artifact
        log.info("%s has no drift reference: its inputs and predictions are not monitored", model.uri)
        return None
    with open(path) as fh:
        return Reference.from_json(fh.read())


@dataclass(frozen=True)
class BinPlan:
    """What the scorer computes for monitoring, per monitored model version: the inner edges of
    each input statistic (the modality's, in order) then of the top-1 probability; and the share
    of rows whose embedding joins the sample."""

    statistics: tuple[str, ...]  # the modality's input statistics, without the top-1 probability
    edges: Mapping[int, tuple[tuple[float, ...], ...]]
    sample_fraction: float

    @classmethod
    def of(cls, references: Mapping[int, Reference], expected_rows: int, sample: int) -> "BinPlan | None":
        if not references:
            return None
        first = next(iter(references.values()))
        names = tuple(n for n in first.statistics if n != PROBABILITY)
        edges = {v: tuple(tuple(ref.edges[n]) for n in (*names, PROBABILITY)) for v, ref in references.items()}
        return cls(names, edges, min(1.0, 2.0 * sample / max(expected_rows, 1)))

    def bins(self, version: int, statistics: Mapping[str, np.ndarray], top1: np.ndarray,
             predicted: np.ndarray) -> np.ndarray:
        """(rows, statistics + 2) bin indexes: each input statistic's, the top-1 probability's,
        then the predicted label's index."""
        edges = self.edges[version]
        columns = [monitoring.bin_rows(statistics[name], edges[j]) for j, name in enumerate(self.statistics)]
        columns += [monitoring.bin_rows(top1, edges[-1]), np.asarray(predicted)]
        return np.stack(columns, axis=1).astype(np.int32)


@dataclass(frozen=True)
class Observed:
    """One version's rows in one window: counts per bin of each binned statistic (and of each
    predicted label, under `monitoring.LABELS`) and the embedding sample."""

    counts: dict[str, np.ndarray]
    embeddings: np.ndarray | None

    def plus(self, prior: Mapping[str, np.ndarray]) -> "Observed":
        """With the counts of earlier runs added (the embedding sample stays this run's)."""
        summed = {name: c + np.asarray(prior[name]) if name in prior and len(prior[name]) == len(c) else c
                  for name, c in self.counts.items()}
        return Observed(summed, self.embeddings)

    def judge(self, reference: Reference, thresholds: monitoring.Thresholds) -> list[Verdict]:
        binned = {k: v for k, v in self.counts.items() if k != monitoring.LABELS}
        return monitoring.compare(reference, binned, self.counts[monitoring.LABELS], self.embeddings, thresholds)


def observe(scored: "DataFrame", fresh_ok: "Column", plan: BinPlan, references: Mapping[int, Reference],
            sample: int) -> dict[int, Observed]:
    """Per monitored model version, what the rows `fresh_ok` selects (scored by this run) hold:
    one aggregation of the bins the scorer wrote, and the sampled embeddings."""
    from pyspark.sql import functions as F

    rows = scored.where(fresh_ok & F.col("model_version").isin(*references))
    found = (rows.select("model_version", F.posexplode("drift_bins").alias("position", "bin"))
             .groupBy("model_version", "position", "bin").count().collect())
    sampled = (rows.where(F.col("embedding").isNotNull()).select("model_version", "content_hash", "embedding")
               .collect())
    names = [*plan.statistics, PROBABILITY, monitoring.LABELS]
    out = {}
    for version, reference in references.items():
        counts = {name: np.zeros(len(reference.edges[name]) + 1) for name in names[:-1]}
        counts[monitoring.LABELS] = np.zeros(len(reference.label_shares))
        for v, position, bucket, n in found:
            target = counts[names[position]] if v == version and position < len(names) else None
            if target is not None and 0 <= bucket < len(target):
                target[bucket] += n
        vectors = sorted(((h, e) for v, h, e in sampled if v == version), key=lambda pair: pair[0])[:sample]
        out[version] = Observed(counts, np.array([e for _, e in vectors], np.float64) if vectors else None)
    return out


def prior_counts(spark: "SparkSession", store: "PredictionStore", base: "Snapshot",
                 versions: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """The binned counts of the runs `base` commits (their run-window rows, which hold each run's
    own rows), per version and statistic: the cumulative window adds them to this run's."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for version in versions:
        urls = [store.batch_url("drift", v, b) for v, b in base.live("drift", version)]
        if not urls:
            continue
        rows = (spark.read.parquet(*urls).where("window = 'run' and method != 'mmd'")
                .select("statistic", "counts").collect())
        summed = out.setdefault(version, {})
        for name, counts in rows:
            counts = np.asarray(counts, np.float64)
            if name in summed and len(summed[name]) == len(counts):
                summed[name] += counts
            elif name not in summed:
                summed[name] = counts
    return out


def table(spark: "SparkSession", windows: Mapping[str, Mapping[int, Sequence[Verdict]]], job_id: str,
          scored_at: str) -> "DataFrame":
    """The drift table's rows of one run: one per (window, model version, statistic). The run
    window's counts are the run's own rows, so later cumulative windows can add them up."""
    import pandas as pd

    from deepspark.spark import frame_from_pandas

    rows = [{"statistic": v.statistic, "kind": v.kind, "method": v.method, "value": v.value,
             "threshold": v.threshold, "drifted": v.drifted, "rows": v.rows, "counts": list(v.counts),
             "reference_shares": list(v.reference_shares), "p_value": v.p_value, "window": window,
             "job_id": job_id, "scored_at": scored_at, "model_version": version}
            for window, verdicts in windows.items() for version, found in verdicts.items() for v in found]
    return frame_from_pandas(spark, pd.DataFrame(rows), DRIFT_DDL)


def plot(verdicts: Sequence[Verdict], labels: Sequence[str], title: str, path: str) -> None:
    """Reference against current share per bin, one panel per binned statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    binned = [v for v in verdicts if v.counts]
    fig, axes = plt.subplots(1, len(binned), figsize=(3.6 * len(binned), 3.2), squeeze=False)
    for ax, v in zip(axes[0], binned):
        current = np.asarray(v.counts, np.float64) / max(v.rows, 1)
        x = np.arange(len(current))
        ax.bar(x - 0.2, v.reference_shares, 0.4, label="reference")
        ax.bar(x + 0.2, current, 0.4, label="this run", color="tab:red" if v.drifted else "tab:orange")
        if v.statistic == monitoring.LABELS:
            ax.set_xticks(x, [str(label) for label in labels], rotation=60, fontsize=7)
        else:
            ax.set_xlabel("reference bin (equal mass)")
        ax.set_title(f"{v.describe()}" + (" DRIFT" if v.drifted else ""), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
