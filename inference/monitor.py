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
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from deepspark import monitoring
from deepspark.monitoring import PROBABILITY, Reference, Verdict

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, Row, SparkSession

    from deepspark.modality import ModalityRecord
    from inference.model import ResolvedModel
    from inference.state import PredictionStore, Snapshot

log = logging.getLogger(__name__)

def load_reference(model: "ResolvedModel", workdir: str) -> Reference | None:
    """The reference stored with a model version, None for one logged without it."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model.name}/{model.version}/artifacts/{monitoring.REFERENCE_FILE}",
            dst_path=os.path.join(workdir, f"reference-v{model.version}"))
    except Exception as exc:  # noqa: BLE001  # MLflow raises several types for a missing artifact
        log.warning("%s: no drift reference could be read, so its inputs and predictions are not monitored "
                    "(%s: %s)", model.uri, type(exc).__name__, str(exc)[:300])
        return None
    with open(path) as fh:
        return Reference.from_json(fh.read())


def statistic_names(record: "ModalityRecord") -> list[str]:
    """The input statistics the record's modality computes (on one blank tensor)."""
    blank = np.zeros((1, *record.spec.shape), np.dtype(record.spec.dtype))
    return list(record.plugin.input_statistics(blank, record.typed_rules(), record.state))


@dataclass(frozen=True)
class BinPlan:
    """What the scorer counts for monitoring, per monitored model version: the inner edges of
    each input statistic (the modality's, in order) then of the top-1 probability, the number of
    labels; and the share of rows whose embedding joins the sample."""

    statistics: tuple[str, ...]  # the modality's input statistics, without the top-1 probability
    edges: Mapping[int, tuple[tuple[float, ...], ...]]
    labels: Mapping[int, int]
    sample_fraction: float

    @classmethod
    def of(cls, references: Mapping[int, Reference], expected_rows: int, sample: int,
           record: "ModalityRecord") -> "BinPlan | None":
        """A statistic a reference lacks, or that the record's modality no longer computes, is left
        out rather than failing the run."""
        if not references:
            return None
        available = statistic_names(record)
        first = next(iter(references.values()))
        names = tuple(n for n in first.statistics if n != PROBABILITY and n in available
                      and all(n in ref.edges for ref in references.values()))
        edges = {v: tuple(tuple(ref.edges[n]) for n in (*names, PROBABILITY)) for v, ref in references.items()}
        labels = {v: len(ref.label_shares) for v, ref in references.items()}
        return cls(names, edges, labels, min(1.0, 2.0 * sample / max(expected_rows, 1)))

    def sizes(self, version: int) -> list[int]:
        """How many counts each binned statistic, then the predicted label, takes."""
        return [len(e) + 1 for e in self.edges[version]] + [self.labels[version]]

    def counts(self, version: int, statistics: Mapping[str, np.ndarray], top1: np.ndarray,
               predicted: np.ndarray) -> np.ndarray:
        """One batch's counts per bin, flat: each input statistic's, the top-1 probability's,
        then each predicted label's. Counted on the executor, so no row carries its bins."""
        edges, sizes = self.edges[version], self.sizes(version)
        values = [statistics[name] for name in self.statistics] + [top1]
        parts = [monitoring.bin_counts(monitoring.bin_rows(v, e), size) for v, e, size in zip(values, edges, sizes)]
        parts.append(monitoring.bin_counts(np.asarray(predicted), sizes[-1]))
        return np.concatenate(parts).astype(np.int64)


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


def aggregations(references: Mapping[int, Reference]) -> "list[Column]":
    """Columns for the job's one aggregation over the scored rows (no extra pass, no shuffle):
    per monitored version, the per-batch counts the scorer made and the sampled embeddings."""
    from pyspark.sql import functions as F

    out = []
    for version in references:
        mine = F.col("model_version") == version
        out.append(F.collect_list(F.when(mine, F.col("drift_counts"))).alias(f"drift_{version}_counts"))
        out.append(F.collect_list(F.when(mine & F.col("embedding").isNotNull(), F.struct("content_hash", "embedding")))
                   .alias(f"drift_{version}_sample"))
    return out


def observed(row: "Row", plan: BinPlan, references: Mapping[int, Reference], sample: int) -> dict[int, Observed]:
    """What `aggregations` gathered, per monitored version: the batches' counts added up and split
    by statistic; the embedding sample is the `sample` rows of lowest content hash (the same rows
    on any cluster and rerun)."""
    names = [*plan.statistics, PROBABILITY, monitoring.LABELS]
    out = {}
    for version in references:
        sizes = plan.sizes(version)
        total = np.zeros(sum(sizes))
        for counts in row[f"drift_{version}_counts"]:
            total += np.asarray(counts, np.float64)
        bounds = np.cumsum([0, *sizes])
        split = {name: total[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
        vectors = sorted(row[f"drift_{version}_sample"], key=lambda pair: pair[0])[:sample]
        out[version] = Observed(split, np.array([e for _, e in vectors], np.float64) if vectors else None)
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


def table(windows: Mapping[str, Mapping[int, Sequence[Verdict]]], job_id: str, scored_at: str
          ) -> "dict[int, pa.Table]":
    """The drift table's rows of one run, per model version: one per (window, statistic). The run
    window's counts are the run's own rows, so later cumulative windows can add them up."""
    import pyarrow as pa

    schema = pa.schema([("statistic", pa.string()), ("kind", pa.string()), ("method", pa.string()),
                        ("value", pa.float64()), ("threshold", pa.float64()), ("drifted", pa.bool_()),
                        ("rows", pa.int64()), ("counts", pa.list_(pa.int64())),
                        ("reference_shares", pa.list_(pa.float64())), ("p_value", pa.float64()),
                        ("window", pa.string()), ("job_id", pa.string()), ("scored_at", pa.string())])
    out: dict[int, list[dict]] = {}
    for window, verdicts in windows.items():
        for version, found in verdicts.items():
            out.setdefault(version, []).extend(
                {"statistic": v.statistic, "kind": v.kind, "method": v.method, "value": v.value,
                 "threshold": v.threshold, "drifted": v.drifted, "rows": v.rows, "counts": list(v.counts),
                 "reference_shares": list(v.reference_shares), "p_value": v.p_value, "window": window,
                 "job_id": job_id, "scored_at": scored_at} for v in found)
    return {version: pa.Table.from_pylist(rows, schema) for version, rows in out.items()}


def write_table(spark: "SparkSession", tables: "Mapping[int, pa.Table]", batch_url: "Callable[[int], str]") -> None:
    """Each version's rows as one Parquet file in its batch folder (invisible until the commit
    lists it): written by the driver through pyarrow where it reaches the output, else by Spark."""
    import io

    import pyarrow.parquet as pq

    from deepspark import filesystem

    for version, rows in tables.items():
        url = batch_url(version)
        if filesystem.reaches(url):
            buffer = io.BytesIO()
            pq.write_table(rows, buffer)
            filesystem.write_atomic(f"{url}/part-00000-drift.parquet", buffer.getvalue())
        else:
            from pyspark.sql.pandas.types import from_arrow_schema

            spark.createDataFrame(rows.to_pylist(), from_arrow_schema(rows.schema)).coalesce(1).write.parquet(url)


def plot(verdicts: Sequence[Verdict], labels: Sequence[str], title: str, path: str) -> None:
    """Reference against current share per bin, one panel per binned statistic (lines, not bars:
    a plot per run must cost little)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    binned = [v for v in verdicts if v.counts]
    fig, axes = plt.subplots(1, len(binned), figsize=(3.2 * len(binned), 3.0), squeeze=False)
    for ax, v in zip(axes[0], binned):
        current = np.asarray(v.counts, np.float64) / max(v.rows, 1)
        x = np.arange(len(current))
        ax.plot(x, v.reference_shares, "o-", label="reference", markersize=3)
        ax.plot(x, current, "s--", label="this run", markersize=3, color="tab:red" if v.drifted else "tab:orange")
        if v.statistic == monitoring.LABELS:
            ax.set_xticks(x, [str(label)[:8] for label in labels], rotation=60, fontsize=6)
        else:
            ax.set_xlabel("reference bin (equal mass)", fontsize=7)
        ax.set_title(v.describe() + (" DRIFT" if v.drifted else ""), fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.25, top=0.8, wspace=0.3)
    fig.savefig(path, dpi=72)
    plt.close(fig)
