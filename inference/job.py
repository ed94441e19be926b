"""Batch inference job: resolve the model once, score only what this model version has not
scored yet, commit predictions and quarantine atomically, report accuracy where labels exist."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from deepspark.config import ConfigError
from deepspark.storage import HadoopFS, to_url
from inference.config import BatchInferenceConfig
from inference.model import ResolvedModel, resolve_and_ship
from inference.state import KEY, Lock, Table
from inference.udf import SCORED_DDL, make_scorer

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceResult:
    job_id: str
    model: str
    inputs: int
    already_scored: int
    scored: int
    quarantined: int
    model_loads: int
    seconds: float
    accuracy: float | None
    output: str
    modality: str

    def summary(self) -> str:
        lines = [
            f"batch inference {self.job_id} with {self.model} -> {self.output}",
            f"inputs {self.inputs} = already scored {self.already_scored} + scored now {self.scored}"
            f" + quarantined {self.quarantined}",
            f"{self.seconds:.1f} s, {self.scored / self.seconds if self.seconds else 0:,.0f} rows/s, "
            f"model loaded {self.model_loads} time(s)",
        ]
        if self.accuracy is not None:
            lines.append(f"accuracy against the input's labels: {self.accuracy:.4f}")
        return "\n".join(lines)


def _inputs(spark: "SparkSession", cfg: BatchInferenceConfig, fs: HadoopFS, model: ResolvedModel
            ) -> tuple["DataFrame", str, str | None]:
    """The input rows: raw inputs of the model's modality (files or text records), or a dataset
    split whose stored tensors match the model's; checked on the driver, errors name the key."""
    if cfg.input.path is not None:
        from pipelines.inputs import RecordColumns, open_inputs, resolve_input

        plugin = model.record.plugin
        root, kind = resolve_input(fs, cfg.input.path, "input.path", cfg.input.format, "records" in plugin.input_kinds)
        inputs = open_inputs(spark, fs, root, "input.path", kind, cfg.input.glob or plugin.default_glob,
                             cfg.files_per_task, RecordColumns(cfg.input.text_column, cfg.input.label_column,
                                                               label_required=False))
        return inputs.frame, inputs.kind, inputs.root
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
    rows = spark.read.parquet(url).select("path", "content_hash", held.spec.column, "label_name")
    return rows, "dataset", None


def run_inference(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:

    started = time.perf_counter()
    job_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    fs = HadoopFS(spark)
    from deepspark.tracking import ensure_experiment

    ensure_experiment(cfg.tracking)  # the registry lives in the tracking store
    out_url = fs.qualify(to_url(cfg.output.path))
    predictions = Table(fs, out_url)
    quarantine = Table(fs, fs.qualify(to_url(cfg.output.quarantine_path or cfg.output.path.rstrip("/") + "_quarantine")))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    # Shipped files must outlive the job while the SparkContext lives (executors may fetch late).
    workdir = tempfile.mkdtemp(prefix="deepspark-model-")
    model = resolve_and_ship(spark, cfg.model_uri, workdir)  # one concrete version for the whole job
    rows, source, root = _inputs(spark, cfg, fs, model)
    lock = Lock(fs, out_url, job_id)
    lock.acquire(cfg.force_unlock)
    try:
        return _score(spark, cfg, model, rows, source, root, predictions, quarantine, job_id, started)
    finally:
        lock.release()
        for table in (predictions, quarantine):
            fs.delete(table.staging(job_id))


def _score(spark, cfg, model, rows, source, root, predictions: Table, quarantine: Table, job_id: str,
           started: float) -> InferenceResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    inputs = rows.count()  # files: a listing only (binaryFile reads no content for a count)
    done = None
    if not cfg.full_refresh:
        committed = [t.committed(spark, model.version) for t in (predictions, quarantine)]
        parts = [c.select(*KEY) for c in committed if c is not None]
        if parts:
            done = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    keyed = rows
    if done is not None:
        raw = source != "dataset"
        if raw:  # the content hash is computed on executors; only skip unchanged inputs
            payload = F.coalesce("payload", F.lit("")) if source == "records" else F.col("payload")
            keyed = rows.withColumn("content_hash", F.sha2(payload, 256))
        keyed = keyed.join(F.broadcast(done.distinct()), KEY, "left_anti")
        if raw:
            keyed = keyed.drop("content_hash")
    loads = spark.sparkContext.accumulator(0)
    scorer = make_scorer(model, source, root, cfg.batch_size, cfg.top_k, cfg.intra_op_threads, loads)
    stamp = F.lit(datetime.now(timezone.utc).isoformat(timespec="seconds"))
    scored = (keyed.mapInPandas(scorer, SCORED_DDL)
              .withColumn("model_name", F.lit(model.name)).withColumn("model_version", F.lit(model.version))
              .withColumn("model_run_id", F.lit(model.run_id)).withColumn("job_id", F.lit(job_id))
              .withColumn("scored_at", stamp)
              .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        good = scored.where(F.col("reason").isNull()).drop("reason", "detail")
        bad = scored.where(F.col("reason").isNotNull()).select("path", "content_hash", "reason", "detail",
                                                                "model_name", "model_version", "job_id", "scored_at")
        good.drop("model_version").write.parquet(predictions.staging(job_id))
        bad.drop("model_version").coalesce(1).write.parquet(quarantine.staging(job_id))
        ok = F.col("reason").isNull()
        labelled = ok & F.col("true_label").isNotNull() & F.col("true_label").isin(*model.labels)
        totals = scored.agg(  # one pass: counts and accuracy against folder/dataset labels
            F.count(F.when(ok, 1)).alias("good"), F.count(F.when(~ok, 1)).alias("bad"),
            F.count(F.when(labelled, 1)).alias("labelled"),
            F.count(F.when(labelled & (F.col("true_label") == F.col("predicted_label")), 1)).alias("hits"),
        ).collect()[0]
        n_good, n_bad = totals["good"], totals["bad"]
        accuracy = totals["hits"] / totals["labelled"] if totals["labelled"] else None
        if cfg.full_refresh:
            predictions.drop_version(model.version)
            quarantine.drop_version(model.version)
        predictions.commit(job_id, model.version)
        quarantine.commit(job_id, model.version)
    finally:
        scored.unpersist()
    already = inputs - n_good - n_bad
    return InferenceResult(job_id, model.uri, inputs, already, n_good, n_bad, loads.value,
                           time.perf_counter() - started, accuracy, predictions.url, model.record.modality)


def run_job(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:
    """The job, with its MLflow run (counts, throughput, model version, accuracy)."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, "batch-inference", cfg, tags={"deepspark.job": "batch_inference"}) as run:
        result = run_inference(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.set_tags({"model.uri": result.model, "inference.job_id": result.job_id,
                             "deepspark.modality": result.modality})
            metrics = {"inputs": result.inputs, "scored": result.scored, "quarantined": result.quarantined,
                       "already_scored": result.already_scored, "model_loads": result.model_loads,
                       "seconds": result.seconds}
            if result.accuracy is not None:
                metrics["accuracy"] = result.accuracy
            mlflow.log_metrics(metrics)
    return result
