"""The training job on the driver: check the config against the dataset, open the one MLflow
run, launch the Horovod ranks on Spark, then log the model, plots and metrics and apply the
registry gate. Ranks only log per-epoch metrics and checkpoints (rank 0)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark import builders
from deepspark.config import ConfigError
from deepspark.datasets import DatasetRef, open_dataset
from deepspark.spark import task_slots
from deepspark.tracking import job_run, tracking_uri
from training import engines
from training.config import TrainConfig
from training.remote import BREAKDOWN, CHECKPOINT_DIR, RankTask
from training.trainer import check_finetune

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The ranks failed; the message says how to resume."""


@dataclass(frozen=True)
class TrainResult:
    run_id: str | None
    dataset: str
    num_proc: int
    epochs: int
    seconds: float
    test: dict[str, float]
    model_version: int | None = None
    registry: str = ""
    confusion: list = field(default_factory=list, repr=False)

    def summary(self) -> str:
        lines = [
            f"trained on {self.dataset} with {self.num_proc} Horovod ranks, {self.epochs} epochs in {self.seconds:.0f} s",
            f"test accuracy {self.test['test_accuracy']:.4f}, test loss {self.test['test_loss']:.4f}",
        ]
        if self.run_id:
            lines.append(f"MLflow run {self.run_id} (make ui, experiment 'deepspark')")
        if self.registry:
            lines.append(self.registry)
        return "\n".join(lines)


def train_row_groups(url: str) -> int:
    """Row groups in a split: Petastorm shards by row group, so each rank needs at least one."""
    from deepspark.filesystem import parquet_totals

    return parquet_totals(url)[1]


def plan(spark: "SparkSession", cfg: TrainConfig) -> "Plan":
    """Driver-side checks before anything is launched: dataset, splits, shapes, ranks, steps."""
    try:
        dataset = open_dataset(spark, cfg.data.root, cfg.data.name, cfg.data.version)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.name/data.version: {exc}") from None
    for key, split in (("data.train_split", cfg.data.train_split), ("data.test_split", cfg.data.test_split)):
        if split not in dataset.manifest["splits"]:
            raise ConfigError(f"{key}: dataset {dataset.name} v={dataset.version} has no split {split!r} "
                              f"(has {sorted(dataset.manifest['splits'])})")
    if len(dataset.labels) < 2:
        raise ConfigError(f"data.name: dataset {dataset.name} has {len(dataset.labels)} label(s); need >= 2")
    stopping = cfg.early_stopping
    if (stopping.patience or stopping.restore_best) and cfg.data.val_split not in dataset.manifest["splits"]:
        raise ConfigError(f"early_stopping: needs a validation split, and dataset {dataset.name} v={dataset.version} "
                          f"has no {cfg.data.val_split!r} split (data.val_split)")
    builder, key = builders.reference(cfg.model.builder, cfg.model.name, dataset.record.plugin)
    model = builders.checked(builder, dataset.record, cfg.model.params, key)  # once, on the driver, before any task
    check_finetune(model, cfg)
    weights = None
    if cfg.model.init_from:
        if cfg.model.init_from.startswith("models:/"):  # the registry lives in the tracking store
            import mlflow

            mlflow.set_tracking_uri(tracking_uri(cfg.tracking))
        weights = builders.initial_weights(cfg.model.init_from, model, dataset.record)
    engine = engines.resolve(cfg.engine)
    slots = task_slots(spark)
    num_proc = engines.load(engine).ranks(cfg.horovod.num_proc, slots)
    if num_proc > slots:
        raise ConfigError(f"horovod.num_proc={num_proc} exceeds Spark's {slots} task slots")
    if cfg.horovod.elastic:
        check_elastic(cfg, num_proc, engines.load(engine), task_attempts(spark.sparkContext.master or "",
                                                                         spark.sparkContext.getConf()))
    groups = train_row_groups(dataset.split_url(cfg.data.train_split))
    if groups < num_proc:
        raise ConfigError(f"horovod.num_proc={num_proc} but the {cfg.data.train_split} split has {groups} row "
                          "group(s): re-run the ETL with automatic row groups (output.row_group_size_mb=null) "
                          "or a larger output.min_row_groups")
    global_batch = cfg.optimizer.batch_size * num_proc
    steps = cfg.steps_per_epoch or dataset.rows(cfg.data.train_split) // global_batch
    if steps < 1:
        raise ConfigError(f"optimizer.batch_size={cfg.optimizer.batch_size} x {num_proc} ranks exceeds the "
                          f"{dataset.rows(cfg.data.train_split)} training rows")
    return Plan(dataset, builder, num_proc, steps, builders.user_code(builder), weights, engine)


def check_elastic(cfg: TrainConfig, num_proc: int, engine: object, attempts: int) -> None:
    """`horovod.elastic` against the engine, the other keys and Spark's `attempts` per task, before launch."""
    if not getattr(engine, "elastic", False):
        raise ConfigError(f"horovod.elastic: engine={cfg.engine} does not run elastic training (engine=horovod does)")
    if cfg.horovod.min_num_proc > num_proc:
        raise ConfigError(f"horovod.min_num_proc={cfg.horovod.min_num_proc} exceeds the {num_proc} ranks planned "
                          "(horovod.num_proc)")
    for key, on in (("finetune.freeze_epochs", cfg.finetune.freeze_epochs),
                    # Horovod's local aggregation counters and the loss scale live outside the
                    # optimizer's variables, so a restored or joining rank would disagree on them
                    ("horovod.backward_passes_per_step", cfg.horovod.backward_passes_per_step > 1),
                    ("horovod.mixed_precision", cfg.horovod.mixed_precision),
                    ("early_stopping.patience", cfg.early_stopping.patience),
                    ("early_stopping.restore_best", cfg.early_stopping.restore_best)):
        if on:
            raise ConfigError(f"{key}: not supported with horovod.elastic=true yet (its state is not carried "
                              "across a change of ranks)")
    if attempts < 2:
        raise ConfigError(f"horovod.elastic: Spark makes {attempts} attempt per task here, so a lost rank's task "
                          "fails the job instead of starting again; set spark.task.maxFailures >= 2, or on a local "
                          "master use local[N,F] (e.g. --master 'local[2,4]')")


def task_attempts(master: str, conf: Any) -> int:
    """How many attempts Spark makes per task: local[N,F]'s F on a local master (local[N]: 1), else
    spark.task.maxFailures from `conf` (a SparkConf or dict; default 4)."""
    import re

    if master == "local" or master.startswith("local["):  # not local-cluster[...], which retries
        found = re.fullmatch(r"local\[[^,\]]+,\s*(\d+)\]", master)
        return int(found.group(1)) if found else 1
    return int(conf.get("spark.task.maxFailures", "4"))


@dataclass(frozen=True)
class Plan:
    """What the driver decided before launching anything."""

    dataset: DatasetRef
    builder: str  # the model builder's `module:attr` reference
    num_proc: int
    steps_per_epoch: int
    user_code: str | None = None  # the builder's package when it is the user's own (shipped with the job)
    initial_weights: list[np.ndarray] | None = field(default=None, repr=False)  # from model.init_from
    engine: str = "training.engines:HOROVOD"  # the training engine's reference (training/engines.py)


def latest_checkpoint(run_id: str) -> tuple[int, bytes]:
    """The newest complete checkpoint of a run (its .json marker is written after the archive)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    markers = sorted(a.path for a in client.list_artifacts(run_id, CHECKPOINT_DIR) if a.path.endswith(".json"))
    if not markers:
        raise ConfigError(f"resume={run_id}: the run has no complete checkpoint to resume from")
    with tempfile.TemporaryDirectory() as tmp:
        marker = json.loads(open(client.download_artifacts(run_id, markers[-1], tmp)).read())
        archive = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{marker['archive']}", tmp)
        with open(archive, "rb") as fh:
            return int(marker["epoch"]), fh.read()


def _metric_history(run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def _log_dataset(dataset: DatasetRef) -> None:
    from deepspark.tracking import log_dataset_input

    log_dataset_input(dataset.url, f"{dataset.name}@v{dataset.version}", dataset.dataset_id, "training",
                      {"version": str(dataset.version)})


def _reference_inputs(dataset: DatasetRef, split: str, rows: int) -> np.ndarray | None:
    """The first `rows` tensors of the test split, which the drift reference is captured from."""
    from training.data import ShardSpec, strided_rows

    if not rows or split not in dataset.manifest["splits"]:
        return None
    record = dataset.record
    return strided_rows(ShardSpec(dataset.split_url(split), record.spec, record.modality), rows)[0]


def _log_model(cfg: TrainConfig, dataset: DatasetRef, planned: Plan, weights: list[np.ndarray]) -> int | None:
    """Rebuild the architecture on the driver, load rank 0's weights, log it with its modality
    record (so inference needs nothing but the model URI) and the user's builder code, and
    register it."""
    import mlflow

    from deepspark.serving import log_classifier

    record = dataset.record
    model = builders.build(planned.builder, record, cfg.model.params)
    model.set_weights(weights)
    reference = _reference_inputs(dataset, cfg.data.test_split, cfg.registry.drift_reference_rows)
    with tempfile.TemporaryDirectory() as tmp:
        info = log_classifier(model, record, cfg.registry.model_name if cfg.registry.enabled else None, tmp,
                              builder=planned.builder, user_code=planned.user_code, reference_inputs=reference)
    mlflow.log_dict({"modality": record.modality, "labels": list(record.labels), "builder": planned.builder,
                     "params": dict(cfg.model.params), "dataset": f"{dataset.name}@v{dataset.version}"},
                    "model_meta/summary.json")
    return int(info.registered_model_version) if info.registered_model_version else None


def run_job(spark: "SparkSession", cfg: TrainConfig) -> TrainResult:
    """The job: plan, then one MLflow run around the distributed training."""
    from training.distributed import RankFailure

    planned = plan(spark, cfg)
    dataset, num_proc, steps = planned.dataset, planned.num_proc, planned.steps_per_epoch
    start_epoch, checkpoint = 0, None
    if cfg.resume:
        if not cfg.tracking.enabled:
            raise ConfigError("resume: needs tracking.enabled=true (checkpoints live in the MLflow run)")
        from deepspark.tracking import ensure_experiment

        ensure_experiment(cfg.tracking)
        last, checkpoint = latest_checkpoint(cfg.resume)
        start_epoch = last + 1
        log.info("resuming run %s after epoch %d", cfg.resume, last + 1)
    engine = engines.load(planned.engine)
    preflight = getattr(engine, "preflight", None)  # optional for engine plug-ins
    launched = preflight(num_proc, cfg) if preflight is not None else cfg  # the run logs `cfg` as given
    started = time.perf_counter()
    tags = {"deepspark.job": "train", "deepspark.modality": dataset.record.modality, "dataset.name": dataset.name,
            "dataset.version": str(dataset.version), "dataset.id": dataset.dataset_id, **cfg.extra_tags}
    run_name = cfg.run_name or f"train:{builders.short_name(planned.builder)}:{dataset.name}@v{dataset.version}"
    with job_run(cfg.tracking, run_name, cfg, tags, resume_run_id=cfg.resume) as run:
        run_id = run.info.run_id if run else None
        if run is not None:
            import mlflow

            if not cfg.resume:
                _log_dataset(dataset)
                mlflow.log_params({"resolved.num_proc": num_proc, "resolved.steps_per_epoch": steps,
                                   "resolved.model_builder": planned.builder, "resolved.modality": dataset.record.modality,
                                   "resolved.global_batch_size": cfg.optimizer.batch_size * num_proc,
                                   "resolved.horovod.nics": ",".join(launched.horovod.nics or [])})
        task = RankTask(
            cfg=launched, record=dataset.record, builder=planned.builder,
            train_url=dataset.split_url(cfg.data.train_split),
            val_url=dataset.split_url(cfg.data.val_split) if cfg.data.val_split in dataset.manifest["splits"] else None,
            test_url=dataset.split_url(cfg.data.test_split), steps_per_epoch=steps, start_epoch=start_epoch,
            initial_weights=planned.initial_weights, engine=planned.engine, ranks=num_proc,
            user_code=builders.CodeArchive.pack(planned.user_code) if planned.user_code else None,
            tracking_uri=tracking_uri(cfg.tracking) if run else None, run_id=run_id, checkpoint=checkpoint,
        )
        try:
            results = engine.launch(task, num_proc, launched)
        except RankFailure as exc:
            hint = f"; resume with resume={run_id}" if run_id else ""
            raise TrainingFailed(f"training failed{hint}: {exc}") from exc
        outcome = results[0]
        seconds = time.perf_counter() - started
        model_version, registry_line = None, ""
        if run is not None:
            import mlflow

            mlflow.log_metrics({**outcome["test"], "train_seconds": seconds})
            with tempfile.TemporaryDirectory() as tmp:
                from training import plots

                history = _metric_history(run.info.run_id, ("loss", "accuracy", "val_loss", "val_accuracy"))
                plots.training_curves(history, os.path.join(tmp, "training_curves.png"))
                plots.epoch_breakdown(_metric_history(run.info.run_id, (*BREAKDOWN, "time_epoch_s")),
                                      os.path.join(tmp, "epoch_breakdown.png"))
                plots.confusion_matrix(np.array(outcome["confusion"]), dataset.labels, os.path.join(tmp, "confusion_matrix.png"))
                mlflow.log_artifacts(tmp, "plots")
            model_version = _log_model(cfg, dataset, planned, outcome["weights"])
            if model_version is not None:
                from training.registry import promote

                promotion = promote(cfg.registry, model_version, outcome["test"][cfg.registry.gate_metric])
                registry_line = promotion.summary(cfg.registry.model_name, cfg.registry)
    return TrainResult(run_id, f"{dataset.name}@v{dataset.version}", num_proc, cfg.epochs, seconds,
                       outcome["test"], model_version, registry_line, outcome["confusion"])
