"""The model-selection job on the driver: sample the configurations, check every one of them
against the training config and the dataset before any task, open the parent MLflow run and a
child run per configuration, run the stages (one per successive-halving rung), then log each
final model, the leaderboard and its plots, and register the winner through the champion gate.

Stopping the search and starting it again with `resume=<parent run id>` continues each model
after its last finished unit: the units, their state and the configurations live in the store.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepspark import builders
from deepspark.config import ConfigError
from deepspark.datasets import DatasetRef, open_dataset
from deepspark.spark import task_slots
from deepspark.tracking import job_run, tracking_uri
from training.selection import space as search_space
from training.selection.config import SelectConfig, trial_config
from training.selection.execution import Stage, StageFailed, fuse_groups, run_horovod, run_mop, run_task
from training.selection.store import Store
from training.selection.workers import SplitData, Trial

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class SearchFailed(RuntimeError):
    """A stage failed; the message says how to resume."""


@dataclass(frozen=True)
class SearchPlan:
    dataset: DatasetRef
    params: list[dict[str, Any]]  # the sampled configurations, by trial index
    trials: tuple[Trial, ...]
    workers: int
    rungs: list[int]  # the epochs at which the search decides (one stage per entry)


def propose(cfg: SelectConfig) -> list[dict[str, Any]]:
    """The configurations the search method proposes (pure; fails naming the key)."""
    dims = search_space.parse_space(cfg.search.space)
    if cfg.search.method == "grid":
        return search_space.grid(dims)
    return search_space.sample(dims, cfg.search.num_models, cfg.search.seed)


def plan(spark: "SparkSession", cfg: SelectConfig, params: list[dict[str, Any]] | None = None) -> SearchPlan:
    """Every check before any Spark task: the space, each configuration's training config, the
    dataset's splits, model names, batch sizes against partitions, workers against task slots."""
    params = propose(cfg) if params is None else params
    configs = [trial_config(cfg, p, i) for i, p in enumerate(params)]
    try:
        dataset = open_dataset(spark, cfg.data.root, cfg.data.name, cfg.data.version)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.name/data.version: {exc}") from None
    splits = dataset.manifest["splits"]
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split not in splits:
            raise ConfigError(f"{key}: dataset {dataset.name} v={dataset.version} has no split {split!r} "
                              f"(has {sorted(splits)}); a search ranks configurations on validation")
    plugin = dataset.record.plugin
    if cfg.execution.fuse > 1 and cfg.execution.method == "horovod":
        raise ConfigError(f"execution.fuse={cfg.execution.fuse}: fusing applies to execution.method=mop or task")
    slots = task_slots(spark)
    workers = cfg.execution.workers or slots
    if workers > slots:
        raise ConfigError(f"execution.workers={workers} exceeds Spark's {slots} task slots")
    from training.job import train_row_groups

    groups = train_row_groups(dataset.split_url(cfg.data.train_split))
    if cfg.execution.method in ("mop", "horovod") and groups < workers:
        raise ConfigError(f"execution.workers={workers} but the {cfg.data.train_split} split has {groups} row "
                          "group(s) to partition: re-run the ETL with a larger output.min_row_groups")
    rows = dataset.rows(cfg.data.train_split)
    trials = []
    built: set[str] = set()
    if cfg.model.init_from or any(c.model.init_from for c in configs):
        raise ConfigError("model.init_from: a model search starts every configuration from its own seeded weights; "
                          "train from existing weights with jobs/train.py")
    for index, (p, tcfg) in enumerate(zip(params, configs)):
        searched = "model.name" in p or "model.builder" in p
        builder, key = builders.reference(tcfg.model.builder, tcfg.model.name, plugin,
                                          "search.space.model" if searched else "model")
        identity = f"{builder}:{json.dumps(tcfg.model.params, sort_keys=True, default=str)}"
        if identity not in built:  # each distinct model built once on the driver, checked against the data
            built.add(identity)
            builders.checked(builder, dataset.record, tcfg.model.params,
                             "search.space.model.params" if any(k.startswith("model.params.") for k in p) else key)
        batch = tcfg.optimizer.batch_size
        where = "search.space.optimizer.batch_size" if "optimizer.batch_size" in p else "optimizer.batch_size"
        if cfg.execution.method == "horovod" and batch % workers:
            raise ConfigError(f"{where}: {batch} is not divisible by the {workers} Horovod ranks")
        smallest = rows // workers if cfg.execution.method == "mop" else rows
        if batch * 2 > smallest:
            raise ConfigError(f"{where}: {batch} leaves fewer than 2 batches per sub-epoch "
                              f"({smallest} rows per {'partition' if cfg.execution.method == 'mop' else 'pass'})")
        trials.append(Trial(index, tcfg, builder, max(1, rows // batch)))
    if cfg.search.method == "halving":
        if cfg.search.min_epochs > cfg.epochs:
            raise ConfigError(f"search.min_epochs={cfg.search.min_epochs} exceeds epochs={cfg.epochs}")
        rungs = search_space.rungs(cfg.search.min_epochs, cfg.epochs, cfg.search.eta)
    else:
        rungs = [cfg.epochs]
    return SearchPlan(dataset, params, tuple(trials), workers, rungs)


@dataclass
class Progress:
    """What the driver knows of every configuration: its markers and its logged epochs."""

    units_per_epoch: int
    markers: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def epochs(self, trial: int) -> list[dict[str, float]]:
        """Per finished epoch: training loss and accuracy over its units (sample-weighted), the
        validation metrics of its last unit, samples/s over the units' training time."""
        units = self.markers.get(trial, [])
        out = []
        for end in range(self.units_per_epoch, len(units) + 1, self.units_per_epoch):
            chunk = units[end - self.units_per_epoch : end]
            samples = sum(u["samples"] for u in chunk)
            metrics = {k: v for k, v in chunk[-1]["metrics"].items() if k.startswith("val_")}
            for key in ("loss", "accuracy"):
                values = [(u["metrics"].get(key), u["samples"]) for u in chunk if key in u["metrics"]]
                if values:
                    metrics[key] = sum(v * n for v, n in values) / max(1, sum(n for _, n in values))
            metrics["samples_per_s"] = samples / max(1e-9, sum(u["train_seconds"] for u in chunk))
            metrics["epoch_seconds"] = sum(u["seconds"] for u in chunk)
            out.append(metrics)
        return out


@dataclass(frozen=True)
class SelectResult:
    run_id: str | None
    method: str
    execution: str
    seconds: float
    leaderboard: list[dict[str, Any]]
    winner: int
    test: dict[str, float]
    registry: str = ""

    def summary(self) -> str:
        keys = sorted({k for row in self.leaderboard for k in row["params"]})
        header = ["trial", *keys, "epochs", "val_accuracy", "samples/s"]
        lines = [f"model selection ({self.method}, {self.execution}): {len(self.leaderboard)} configurations "
                 f"in {self.seconds:.0f} s", "  ".join(f"{h:>14}" for h in header)]
        for row in self.leaderboard:
            cells = [str(row["trial"]), *[_cell(row["params"].get(k)) for k in keys], str(row["epochs"]),
                     f"{row['val_accuracy']:.4f}", f"{row['samples_per_s']:.0f}"]
            mark = "  <- winner" if row["trial"] == self.winner else ""
            lines.append("  ".join(f"{c:>14}" for c in cells) + mark)
        if self.test:
            lines.append(f"winner: trial {self.winner}, test accuracy {self.test['test_accuracy']:.4f}")
        if self.run_id:
            lines.append(f"MLflow parent run {self.run_id} (make ui, experiment 'deepspark')")
        if self.registry:
            lines.append(self.registry)
        return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _score(metrics: dict[str, float], metric: str) -> float:
    value = metrics.get(metric, float("nan"))
    return value if metric.endswith("accuracy") else -value  # higher is better


def choose_winner(leaderboard: list[dict[str, Any]], epochs: int, metric: str) -> int:
    """The trial with the best final `metric` among those that trained every epoch (a
    configuration halving stopped early is never the winner, however its last epoch scored);
    ties go to the lowest trial index."""
    finalists = [r for r in leaderboard if r["epochs"] == epochs]
    return max(finalists, key=lambda r: (_score(r, metric), -r["trial"]))["trial"]


def run_job(spark: "SparkSession", cfg: SelectConfig) -> SelectResult:
    """Plan, open the runs, train stage by stage, then log models, leaderboard and the winner."""
    from training.selection.tracking import SearchTracker

    started = time.perf_counter()
    resumed = None
    if cfg.resume:
        if not cfg.tracking.enabled:
            raise ConfigError("resume: needs tracking.enabled=true (the search's runs and store are found through it)")
        resumed = SearchTracker.stored_search(cfg.tracking, cfg.resume)
        for key, value in (("execution.method", cfg.execution.method), ("execution.workers", cfg.execution.workers)):
            stored = resumed["execution" if key == "execution.method" else "workers"]
            if value is not None and value != stored:
                raise ConfigError(f"{key}={value}: search {cfg.resume} ran with {key}={stored}; resume it the same way")
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"workers": resumed["workers"]})})
    searched = plan(spark, cfg, resumed["params"] if resumed else None)
    dataset = searched.dataset
    for code in {builders.user_code(t.builder) for t in searched.trials} - {None}:  # workers import the builders
        builders.ship_to_executors(spark, builders.CodeArchive.pack(str(code)))
    method, execution = cfg.search.method, cfg.execution.method
    tags = {"deepspark.job": "select_models", "deepspark.modality": dataset.record.modality,
            "dataset.name": dataset.name, "dataset.version": str(dataset.version), "dataset.id": dataset.dataset_id,
            "deepspark.selection.method": method, "deepspark.selection.execution": execution, **cfg.extra_tags}
    run_name = cfg.run_name or f"select:{method}/{execution}:{dataset.name}@v{dataset.version}"
    with job_run(cfg.tracking, run_name, cfg, tags, resume_run_id=cfg.resume) as run:
        parent = run.info.run_id if run else None
        search_id = resumed["search_id"] if resumed else (parent or os.urandom(8).hex())
        store_url = resumed["store"] if resumed else f"{cfg.execution.store_root.rstrip('/')}/{search_id}"
        store_url = os.path.abspath(store_url) if "://" not in store_url else store_url
        try:
            Store.check(store_url)
        except ValueError as exc:
            raise ConfigError(f"execution.store_root: {exc}") from None
        store = Store(store_url)
        tracker = SearchTracker(cfg, run, searched, store, resumed)
        units_per_epoch = searched.workers if execution == "mop" else 1
        if not resumed:
            tracker.start(units_per_epoch)
        progress = Progress(units_per_epoch, {t.index: store.markers(t.index) for t in searched.trials})
        tracker.catch_up(progress)

        def on_marker(marker: dict[str, Any]) -> None:
            units = progress.markers[marker["trial"]]
            if marker["index"] < len(units):  # a fused member redone after a kill: the newer state counts
                units[marker["index"]] = marker
                return
            units.append(marker)
            if (marker["index"] + 1) % units_per_epoch == 0 and not marker.get("logged_by_ranks"):
                tracker.log_epoch(marker["trial"], marker["epoch"], progress.epochs(marker["trial"])[marker["epoch"]])

        val_url = dataset.split_url(cfg.data.val_split)
        data = SplitData(dataset.record, dataset.split_url(cfg.data.train_split), val_url, cfg.max_eval_rows,
                         cfg.eval_batch_size, cfg.loader.pool_type, cfg.loader.workers)
        stage = Stage(spark, data, searched.trials, store, searched.workers, cfg.execution.intra_op_threads,
                      cfg.execution.poll_s)
        live = [t.index for t in searched.trials]
        by_index = {t.index: t for t in searched.trials}
        stopped: dict[int, int] = {}
        for rung, target in enumerate(searched.rungs):
            groups = fuse_groups(by_index, live, cfg.execution.fuse)
            log.info("stage %d/%d: %d configurations (%d groups) to epoch %d (%s)", rung + 1, len(searched.rungs),
                     len(live), len(groups), target, execution)
            stage_started = time.perf_counter()
            try:
                if execution == "mop":
                    report = run_mop(stage, groups, target, on_marker)
                elif execution == "task":
                    report = run_task(stage, groups, target, on_marker)
                else:
                    report = run_horovod(stage, groups, target, on_marker, tracker.child_ids,
                                         tracking_uri(cfg.tracking) if run else None)
            except StageFailed as exc:
                tracker.interrupted()
                hint = f"; resume with resume={parent}" if parent else ""
                raise SearchFailed(f"model selection failed in stage {rung + 1}{hint}: {exc}") from exc
            log.info("stage %d took %.1f s: %s", rung + 1, time.perf_counter() - stage_started, report)
            if rung < len(searched.rungs) - 1:
                scores = {t: _score(progress.epochs(t)[-1], cfg.search.metric) for t in live}
                kept = search_space.survivors(scores, cfg.search.eta)
                stopped.update({t: target for t in live if t not in kept})
                live = kept
        leaderboard = []
        for trial in searched.trials:
            epochs = progress.epochs(trial.index)
            final = epochs[-1]
            samples = sum(u["samples"] for u in progress.markers[trial.index])
            busy = sum(u["train_seconds"] for u in progress.markers[trial.index])
            leaderboard.append({"trial": trial.index, "params": searched.params[trial.index], "epochs": len(epochs),
                                "val_accuracy": final.get("val_accuracy", float("nan")),
                                "val_loss": final.get("val_loss", float("nan")),
                                "best_val_accuracy": max(e.get("val_accuracy", float("nan")) for e in epochs),
                                "samples_per_s": samples / max(busy, 1e-9),
                                "run_id": tracker.child_ids.get(trial.index)})
        winner = choose_winner(leaderboard, cfg.epochs, cfg.search.metric)
        seconds = time.perf_counter() - started
        test, registry_line = tracker.finish(progress, leaderboard, winner, stopped, seconds)
    return SelectResult(parent, method, execution, seconds, leaderboard, winner, test, registry_line)
