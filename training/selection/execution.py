"""The three ways a search trains its configurations, each one stage at a time (a stage takes
every live configuration to a target epoch; successive halving runs one stage per rung):

- `mop`: P hopper tasks in one barrier stage, each holding one partition of the train split; the
  driver's HopScheduler tells each idle hopper which model to train next; state goes through the
  store. No data moves, no gradients are exchanged.
- `task`: one Spark task per configuration, each over the whole train split.
- `horovod`: the data-parallel trainer (training/remote.py), one configuration at a time.

Every stage leaves one marker per finished unit in the store; `on_marker` sees each as it lands
(the driver logs metrics to MLflow from there).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from deepspark.builders import CodeArchive, user_code
from training.selection.schedule import HopScheduler
from training.selection.store import Backoff, Store, unit_name
from training.selection.workers import Hopper, SplitData, Trial, WholeDataTrainer

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

OnMarker = Callable[[dict[str, Any]], None]


class StageFailed(RuntimeError):
    """A Spark stage of the search failed; finished units stay in the store for a resume."""


class SparkJobThread:
    """A Spark job run from a driver thread (its own job group, so it can be cancelled) while the
    driver's main thread schedules and watches the store."""

    def __init__(self, spark: "SparkSession", description: str, run: Callable[[], Any]) -> None:
        from pyspark import InheritableThread

        self.sc = spark.sparkContext
        self.group = f"deepspark-select-{uuid.uuid4().hex[:8]}"
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            self.sc.setJobGroup(self.group, description, interruptOnCancel=True)
            try:
                self.result = run()
            except BaseException as exc:  # surfaced on the driver's main thread by check()
                self.error = exc

        self.thread = InheritableThread(target=target, daemon=True)
        self.thread.start()

    def check(self) -> None:
        if self.error is not None:
            raise StageFailed(f"{type(self.error).__name__}: {str(self.error).splitlines()[0][:500]}") from self.error

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def cancel(self) -> None:
        self.sc.cancelJobGroup(self.group)

    def join(self) -> Any:
        self.thread.join()
        self.check()
        return self.result


@dataclass(frozen=True)
class Stage:
    spark: "SparkSession"
    data: SplitData
    trials: tuple[Trial, ...]
    store: Store
    workers: int
    intra_op_threads: int
    poll_s: float


def fuse_groups(trials: dict[int, Trial], live: list[int], fuse: int) -> tuple[tuple[int, ...], ...]:
    """Live configurations in groups of up to `fuse` that can share one input pipeline (the same
    batch size), in trial order; each group trains, hops and is checkpointed together."""
    by_batch: dict[int, list[int]] = {}
    for t in sorted(live):
        by_batch.setdefault(trials[t].cfg.optimizer.batch_size, []).append(t)
    groups = [tuple(members[i:i + fuse]) for members in by_batch.values() for i in range(0, len(members), fuse)]
    return tuple(sorted(groups))


def run_mop(stage: Stage, groups: tuple[tuple[int, ...], ...], target: int, on_marker: OnMarker) -> dict[str, Any]:
    """Model hopper parallelism: every (group, partition) pair once per epoch, dynamically scheduled."""
    store, parts = stage.store, stage.workers
    history = {g: [m["partition"] for m in store.markers(group[-1])] for g, group in enumerate(groups)}
    scheduler = HopScheduler(parts, {g: target for g in range(len(groups))}, history)
    if scheduler.done:
        return {"hoppers": []}
    attempt = uuid.uuid4().hex[:12]
    hopper = Hopper(stage.data, stage.trials, store.url, attempt, parts, stage.intra_op_threads, stage.poll_s)
    sc = stage.spark.sparkContext
    job = SparkJobThread(stage.spark, f"model hopper: {len(groups)} model groups x {parts} partitions",
                         lambda: sc.parallelize(range(parts), parts).barrier().mapPartitions(hopper).collect())
    sent = [0] * parts

    def send(part: int, order: dict[str, Any]) -> None:
        store.write_json(f"ctl/{attempt}/w{part}/{sent[part]:06d}.json", order)
        sent[part] += 1

    inflight: dict[int, Any] = {}
    backoff = Backoff(stage.poll_s)  # looks again soon after a unit finished: the next is due
    try:
        while not scheduler.done:
            finished = []
            for part, unit in list(inflight.items()):
                if store.exists(unit_name(groups[unit.model][-1], unit.index, "json")):  # the last member is published last
                    scheduler.finish(unit)
                    del inflight[part]
                    finished.append(unit)
            for part in range(parts):  # orders before the markers' MLflow logging: no hopper waits on it
                if part not in inflight and (unit := scheduler.next_for(part)) is not None:
                    send(part, {"trials": list(groups[unit.model]), "index": unit.index, "epoch": unit.epoch,
                                "last_of_epoch": unit.last_of_epoch})
                    inflight[part] = unit
            for unit in finished:
                for trial in groups[unit.model]:
                    on_marker(store.read_json(unit_name(trial, unit.index, "json")))
            job.check()
            if not job.running:
                raise StageFailed("the hopper tasks ended before the schedule did")
            if finished:
                backoff.reset()
            else:
                backoff.sleep()
    except BaseException:
        job.cancel()
        raise
    finally:
        for part in range(parts):
            send(part, {"stop": True})
    return {"hoppers": job.join()}


def run_task(stage: Stage, groups: tuple[tuple[int, ...], ...], target: int, on_marker: OnMarker) -> dict[str, Any]:
    """Task parallelism: one Spark task per group of configurations over the whole train split."""
    store = stage.store
    seen = {g: len(store.markers(group[-1])) for g, group in enumerate(groups)}
    todo = [g for g in range(len(groups)) if seen[g] < target]
    if not todo:
        return {"tasks": []}
    trainer = WholeDataTrainer(stage.data, stage.trials, store.url, groups, target, stage.intra_op_threads)
    sc = stage.spark.sparkContext
    job = SparkJobThread(stage.spark, f"task parallelism: {len(todo)} model groups",
                         lambda: sc.parallelize(todo, len(todo)).mapPartitions(trainer).collect())

    def poll() -> None:
        for g in todo:
            while seen[g] < target and store.exists(unit_name(groups[g][-1], seen[g], "json")):
                for trial in groups[g]:
                    on_marker(store.read_json(unit_name(trial, seen[g], "json")))
                seen[g] += 1

    try:
        while job.running:
            poll()
            time.sleep(stage.poll_s)
        result = job.join()
        poll()
    except BaseException:
        job.cancel()
        raise
    return {"tasks": result}


def run_horovod(stage: Stage, groups: tuple[tuple[int, ...], ...], target: int, on_marker: OnMarker,
                run_ids: dict[int, str | None], tracking_uri: str | None) -> dict[str, Any]:
    """The data-parallel trainer, one configuration at a time, with the configuration's batch size
    and learning rate as the global ones (per rank: batch / ranks; the trainer scales the learning
    rate back by the ranks). Rank 0 logs epochs and checkpoints to the child run; the store gets a
    marker per epoch, written here from the ranks' results."""
    from training.config import horovod_environment
    from training.distributed import RankFailure, run_ranks
    from training.remote import RankTask

    store, ranks = stage.store, stage.workers
    trials = {t.index: t for t in stage.trials}
    done = []
    for (t,) in groups:
        trial = trials[t]
        start = len(store.markers(t))
        if start >= target:
            continue
        cfg = trial.cfg
        per_rank = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={
            "batch_size": cfg.optimizer.batch_size // ranks, "learning_rate": cfg.optimizer.learning_rate / ranks})})
        checkpoint = store.read(unit_name(t, start - 1, "ckpt")) if start else None
        task = RankTask(cfg=per_rank, record=stage.data.record, builder=trial.builder,
                        train_url=stage.data.train_url, val_url=stage.data.val_url, test_url=None,
                        steps_per_epoch=trial.steps_per_epoch, start_epoch=start,
                        tracking_uri=tracking_uri, run_id=run_ids.get(t), checkpoint=checkpoint,
                        stop_epoch=target, epoch_results=True, user_code=_user_code(trial.builder))
        started = time.perf_counter()
        try:
            outcome = run_ranks(task, ranks, cfg.horovod.start_timeout_s, cfg.horovod.nics,
                                horovod_environment(cfg.horovod))[0]
        except RankFailure as exc:
            raise StageFailed(str(exc)) from exc
        seconds = (time.perf_counter() - started) / (target - start)
        for epoch, metrics in zip(range(start, target), outcome["epochs"]):
            if epoch == target - 1:
                store.write(unit_name(t, epoch, "ckpt"), outcome["checkpoint"])
            marker = {"trial": t, "index": epoch, "epoch": epoch, "partition": -1, "seconds": seconds,
                      "train_seconds": metrics.pop("epoch_seconds", seconds),
                      "samples": trial.steps_per_epoch * cfg.optimizer.batch_size, "metrics": metrics,
                      "logged_by_ranks": run_ids.get(t) is not None}
            store.write_json(unit_name(t, epoch, "json"), marker)
            on_marker(marker)
        done.append(t)
    return {"trials": done}


def _user_code(builder: str) -> CodeArchive | None:
    """The builder's package, when it is the user's own, for a rank process to import it from."""
    path = user_code(builder)
    return CodeArchive.pack(path) if path else None
