"""Batch inference job: resolve the model once, score only what this model version has not
scored yet, commit predictions and quarantine atomically, report accuracy where labels exist."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from deepspark import filesystem
from deepspark.config import ConfigError
from deepspark.locks import Lease
from deepspark.spark import frame_from_pandas
from deepspark.storage import HadoopFS
from inference.config import BatchInferenceConfig
from inference.model import ResolvedModel, resolve_and_ship
from inference.state import KEY, SOURCE, PredictionStore
from inference.udf import SCORED_DDL, make_scorer

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    """Where each input went. Files: listed = skipped by metadata + hashed; hashed = unchanged +
    scored + quarantined. Text records are listed and skipped per file, hashed per record."""

    listed: int = 0  # input files found (a dataset split: its rows)
    skipped: int = 0  # files whose (path, size, mtime) is committed: not read at all
    hashed: int = 0  # inputs read and hashed
    unchanged: int = 0  # hashed, but (path, content hash) is committed: not scored again
    scored: int = 0
    quarantined: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {"inputs_listed": self.listed, "skipped_by_metadata": self.skipped, "inputs_hashed": self.hashed,
                "unchanged_content": self.unchanged, "scored": self.scored, "quarantined": self.quarantined}


@dataclass(frozen=True)
class InferenceResult:
    job_id: str
    model: str
    counts: Counts
    model_loads: int
    seconds: float
    accuracy: float | None
    output: str
    modality: str
    commit: int | None  # the log entry that made this run visible; None when there was nothing new

    @property
    def scored(self) -> int:
        return self.counts.scored

    @property
    def quarantined(self) -> int:
        return self.counts.quarantined

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"batch inference {self.job_id} with {self.model} -> {self.output}"
            + (f" (commit {self.commit})" if self.commit is not None else " (nothing new: no commit)"),
            f"listed {c.listed}: skipped by metadata {c.skipped} (unchanged since committed, not read), "
            f"read and hashed {c.hashed}",
            f"hashed {c.hashed} = scored now {c.scored} + quarantined {c.quarantined} + already scored {c.unchanged}",
            f"{self.seconds:.1f} s, {c.scored / self.seconds if self.seconds else 0:,.0f} rows/s, "
            f"model loaded {self.model_loads} time(s)",
        ]
        if self.accuracy is not None:
            lines.append(f"accuracy against the input's labels: {self.accuracy:.4f}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Candidates:
    """The rows to hash and maybe score, with the counts known before scoring."""

    rows: "DataFrame | None"  # path, content_hash, payload or tensor, label_name, malformed, source metadata
    source: str  # files | records | dataset
    root: str | None
    listed: int
    skipped: int
    hashed_in_workers: bool = False  # rows hold no bytes and no hash: the scorer reads and hashes
    seen: dict[str, list[str]] = field(default_factory=dict)  # candidate path -> hashes committed under it


def _candidates(spark: "SparkSession", cfg: BatchInferenceConfig, fs: HadoopFS, model: ResolvedModel,
                committed: "DataFrame | None") -> Candidates:
    """What this run must read: raw input files whose (path, size, mtime) is not committed for the
    model version (the listing's metadata decides, no content is read), or a dataset split's
    rows. Driver-side checks first; errors name the config key."""
    import pandas as pd
    from pyspark.sql import functions as F

    if cfg.input.path is None:
        return Candidates(_dataset_rows(spark, cfg, model), "dataset", None, 0, 0)
    from pipelines.inputs import RecordColumns, list_inputs, open_inputs, resolve_input

    plugin = model.record.plugin
    glob = cfg.input.glob or plugin.default_glob
    root, kind = resolve_input(fs, cfg.input.path, "input.path", cfg.input.format, "records" in plugin.input_kinds)
    listing = list_inputs(fs, root, "input.path", kind, glob)
    in_workers = kind == "files" and filesystem.reaches(root)  # else binaryFile + sha2 and a JVM anti-join
    fresh, seen = listing, {}
    if committed is not None and listing:
        changed = _changed_files(spark, listing, committed, with_hashes=in_workers)
        fresh = tuple((source, size, modified) for source, size, modified, _ in changed)
        seen = {source: hashes for source, _, _, hashes in changed if hashes}
    if not fresh:
        return Candidates(None, kind, root, len(listing), len(listing))
    inputs = open_inputs(spark, fs, root, "input.path", kind, glob, cfg.files_per_task,
                         RecordColumns(cfg.input.text_column, cfg.input.label_column, label_required=False),
                         listing=fresh, whole=len(fresh) == len(listing), read_in_workers=in_workers)
    meta = frame_from_pandas(spark, pd.DataFrame(fresh, columns=SOURCE))
    rows = inputs.frame.join(F.broadcast(meta), "source", "left")  # left: a row without metadata is still scored
    if inputs.payload_in_workers:  # the scorer reads and hashes, and skips a file committed with its hash
        rows = rows.withColumn("content_hash", F.lit(None).cast("string"))
    else:
        payload = F.coalesce("payload", F.lit("")) if kind == "records" else F.col("payload")
        rows = rows.withColumn("content_hash", F.sha2(payload, 256))  # hashed by the JVM, once
    return Candidates(rows, kind, root, len(listing), len(listing) - len(fresh), inputs.payload_in_workers, seen)


def _changed_files(spark: "SparkSession", listing: tuple[tuple[str, int, int], ...], committed: "DataFrame",
                   with_hashes: bool) -> list[tuple[str, int, int, list[str]]]:
    """Listed files whose (path, size, mtime) this model version has not committed (an anti-join on
    the committed rows' narrow metadata columns), each, `with_hashes`, with the content hashes its
    path was committed under (a semi-join, only when some file changed; the scorer that hashes
    files itself needs them, the JVM route anti-joins on (path, hash) instead)."""
    import pandas as pd
    from pyspark.sql import functions as F

    listed = frame_from_pandas(spark, pd.DataFrame(listing, columns=SOURCE))
    known = committed.select(*SOURCE).where(F.col("source_size").isNotNull())
    fresh = [(r[0], int(r[1]), int(r[2])) for r in listed.join(known, SOURCE, "left_anti").collect()]
    if not fresh or not with_hashes:  # the usual hourly run: one anti-join, nothing else
        return [(source, size, modified, []) for source, size, modified in fresh]
    paths = frame_from_pandas(spark, pd.DataFrame({"source": [p for p, _, _ in fresh]}))
    seen: dict[str, list[str]] = {}
    for source, digest in committed.select("source", "content_hash").join(paths, "source", "left_semi").collect():
        seen.setdefault(source, []).append(digest)
    return [(source, size, modified, seen.get(source, [])) for source, size, modified in fresh]


def _dataset_rows(spark: "SparkSession", cfg: BatchInferenceConfig, model: ResolvedModel) -> "DataFrame":
    """A dataset split whose stored tensors match the model's (checked on the driver)."""
    from pyspark.sql import functions as F

    from deepspark.datasets import open_dataset

    try:
        dataset = open_dataset(spark, cfg.input.dataset_root, cfg.input.dataset, cfg.input.dataset_version)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise ConfigError(f"input.dataset: {exc}") from None
    held, wanted = dataset.record, model.record
    if (held.modality, held.spec) != (wanted.modality, wanted.spec):
        raise ConfigError(f"input.dataset: {dataset.name} v={dataset.version} holds {held.modality} "
                          f"{held.spec.dtype} {held.spec.shape} tensors but {model.uri} expects {wanted.modality} "
                          f"{wanted.spec.dtype} {wanted.spec.shape}")
    if (held.state, dict(held.rules)) != (wanted.state, dict(wanted.rules)):
        raise ConfigError(f"input.dataset: {dataset.name} v={dataset.version} was preprocessed with other rules or "
                          f"fitted state (e.g. resize mode, vocabulary) than {model.uri}; score its raw inputs with "
                          "input.path instead")
    try:
        url = dataset.split_url(cfg.input.split)
    except KeyError as exc:
        raise ConfigError(f"input.split: {exc.args[0]}") from None
    rows = (spark.read.parquet(url).select("path", "content_hash", held.spec.column, "label_name")
            .withColumn("source", F.col("path")).withColumn("source_size", F.lit(None).cast("long"))
            .withColumn("source_modified", F.lit(None).cast("long")))
    return rows


def run_inference(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:
    """Score what this model version has not scored yet and commit it, holding the output's lease."""
    started = time.perf_counter()
    job_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    fs = HadoopFS(spark)
    from deepspark.tracking import ensure_experiment

    ensure_experiment(cfg.tracking)  # the registry lives in the tracking store
    store = PredictionStore.open(fs, cfg.output.path, cfg.output.quarantine_path)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    # Shipped files must outlive the job while the SparkContext lives (executors may fetch late).
    workdir = tempfile.mkdtemp(prefix="deepspark-model-")
    model = resolve_and_ship(spark, cfg.model_uri, workdir)  # one concrete version for the whole job
    if cfg.input.path is None:
        _dataset_rows(spark, cfg, model)  # its checks, before taking the lock
    fs.mkdirs(store.url)
    lease = Lease(fs, store.lock_url, job_id, cfg.lock_ttl_s)
    lease.acquire(cfg.force_unlock)
    try:
        lease.check()
        removed = store.vacuum(cfg.output.retain_hours * 3600)  # killed runs' batches; we hold the lock
        if removed:
            log.info("removed %d uncommitted or replaced batch folder(s)", len(removed))
        return _score(spark, cfg, fs, model, store, lease, job_id, started)
    finally:
        lease.release()


def _score(spark, cfg: BatchInferenceConfig, fs: HadoopFS, model: ResolvedModel, store: PredictionStore,
           lease: Lease, job_id: str, started: float) -> InferenceResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    base = store.current()
    committed = None if cfg.full_refresh else store.committed(spark, model.version, [*KEY, *SOURCE], base)
    plan = _candidates(spark, cfg, fs, model, committed)
    log.info("%d listed, %d skipped by metadata, in %.1f s", plan.listed, plan.skipped, time.perf_counter() - started)

    def result(counts: Counts, loads: int, accuracy: float | None, commit: int | None) -> InferenceResult:
        return InferenceResult(job_id, model.uri, counts, loads, time.perf_counter() - started, accuracy,
                               store.url, model.record.modality, commit)

    if plan.rows is None:  # a no-op run: no content read, nothing written, no commit
        return result(Counts(plan.listed, plan.skipped), 0, None, _compact(spark, cfg, store, model, lease, job_id))
    rows = plan.rows
    # Files: one row per listed candidate (known without a pass); records and dataset rows are counted.
    hashed = plan.listed - plan.skipped if plan.source == "files" else rows.count()
    listed = hashed if plan.source == "dataset" else plan.listed
    todo = rows
    if committed is not None and not plan.hashed_in_workers:  # same path and content committed: not again
        todo = rows.join(committed.select(*KEY), KEY, "left_anti")
    loads = spark.sparkContext.accumulator(0)
    seen = spark.sparkContext.broadcast(plan.seen) if plan.seen else None
    scorer = make_scorer(model, plan.source, plan.root, cfg.batch_size, cfg.top_k, cfg.intra_op_threads, loads,
                         plan.hashed_in_workers, seen)
    stamp = F.lit(datetime.now(timezone.utc).isoformat(timespec="seconds"))
    scored = (todo.mapInPandas(scorer, SCORED_DDL)
              .withColumn("model_name", F.lit(model.name)).withColumn("model_run_id", F.lit(model.run_id))
              .withColumn("job_id", F.lit(job_id)).withColumn("scored_at", stamp)
              .persist(StorageLevel.MEMORY_AND_DISK))
    fresh = ~F.col("unchanged")  # unchanged: read and hashed by the scorer, committed before
    ok, failed = F.col("reason").isNull() & fresh, F.col("reason").isNotNull() & fresh
    labelled = ok & F.col("true_label").isNotNull() & F.col("true_label").isin(*model.labels)
    totals = scored.agg(  # one pass: counts and accuracy against folder/dataset labels
        F.count(F.when(ok, 1)).alias("good"), F.count(F.when(failed, 1)).alias("bad"),
        F.count(F.when(labelled, 1)).alias("labelled"),
        F.count(F.when(labelled & (F.col("true_label") == F.col("predicted_label")), 1)).alias("hits"),
    ).collect()[0]
    n_good, n_bad = int(totals["good"]), int(totals["bad"])
    log.info("candidates read and scored in %.1f s", time.perf_counter() - started)
    counts = Counts(listed, plan.skipped, hashed, hashed - n_good - n_bad, n_good, n_bad)
    accuracy = totals["hits"] / totals["labelled"] if totals["labelled"] else None
    added: dict[str, list[str]] = {}
    if n_good:
        (scored.where(ok).drop("reason", "detail", "unchanged")
         .write.parquet(store.batch_url("predictions", model.version, job_id)))
        added["predictions"] = [job_id]
    if n_bad:
        (scored.where(failed).select(*KEY, "reason", "detail", *SOURCE, "model_name", "job_id", "scored_at")
         .coalesce(1).write.parquet(store.batch_url("quarantine", model.version, job_id)))
        added["quarantine"] = [job_id]
    scored.unpersist()
    log.info("wrote %d predictions and %d quarantine rows in %.1f s", n_good, n_bad, time.perf_counter() - started)
    if not added and not cfg.full_refresh:  # every hashed input was unchanged: nothing to commit
        return result(counts, loads.value, accuracy, _compact(spark, cfg, store, model, lease, job_id))
    lease.check()  # a run whose lease was taken over must not commit over its successor
    snap = store.commit(job_id, model.version, added, cfg.full_refresh, base)
    lease.check()
    store.vacuum(cfg.output.retain_hours * 3600)
    return result(counts, loads.value, accuracy, _compact(spark, cfg, store, model, lease, job_id) or snap.number)


def _compact(spark: "SparkSession", cfg: BatchInferenceConfig, store: PredictionStore, model: ResolvedModel,
             lease: Lease, job_id: str) -> int | None:
    """With `compact=true`, rewrite this model version's batches as one (the commit's number)."""
    if not cfg.compact:
        return None
    snap = store.compact(spark, model.version, job_id, store.current(), lease.check)
    if snap is None:
        return None
    lease.check()
    store.vacuum(cfg.output.retain_hours * 3600)
    return snap.number


def run_job(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:
    """The job, with its MLflow run (counts, throughput, model version, accuracy)."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, "batch-inference", cfg, tags={"deepspark.job": "batch_inference"}) as run:
        result = run_inference(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.set_tags({"model.uri": result.model, "inference.job_id": result.job_id,
                             "deepspark.modality": result.modality})
            metrics = {**result.counts.as_metrics(), "model_loads": result.model_loads, "seconds": result.seconds}
            if result.accuracy is not None:
                metrics["accuracy"] = result.accuracy
            mlflow.log_metrics(metrics)
    return result
