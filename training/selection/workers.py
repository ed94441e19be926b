"""What the executors run during a search: model hoppers (`mop`) and whole-data trainers
(`task`). Built on the driver as picklable objects; TensorFlow and Petastorm load inside the task.

Both train through the trainer seam (training/trainer.py) with the `Solo` collective: no
gradients are exchanged. A unit's state is read from and written to the search's store; a
worker keeps the Keras models it has built (one per graph, shared by configurations that differ
only in learning rate and seed; traced once per worker) and skips the restore when its model
still holds the state it wrote itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from deepspark.builders import build
from deepspark.modality import ModalityRecord
from training.config import TrainConfig
from training.selection.store import Store, unit_name


@dataclass(frozen=True)
class Trial:
    """One configuration as the executors see it."""

    index: int
    cfg: TrainConfig
    builder: str  # the model builder's `module:attr` reference (deepspark/builders.py)
    steps_per_epoch: int  # of one pass over all the training rows (the learning-rate schedule's unit)


@dataclass(frozen=True)
class SplitData:
    """The dataset splits a search reads, through the Petastorm seam (training/data.py)."""

    record: ModalityRecord
    train_url: str
    val_url: str | None
    max_eval_rows: int | None
    eval_batch_size: int
    pool_type: str
    pool_workers: int

    def shard(self, url: str, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """Partition `part` of `parts` of a split (whole row groups, balanced by rows), in memory."""
        from training.data import ShardSpec, read_row_groups

        spec = self.record.spec
        shard = ShardSpec(url, spec, self.record.modality, part, parts, self.pool_type, self.pool_workers,
                          balanced=True)
        groups = list(read_row_groups(shard, seed=None, infinite=False))
        if not groups:
            return np.empty((0, *spec.shape), spec.dtype), np.empty((0,), np.int32)
        return np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])

    def validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.val_url is None:
            return None
        from training.data import ShardSpec, strided_rows

        return strided_rows(ShardSpec(self.val_url, self.record.spec, self.record.modality, 0, 1, self.pool_type,
                                      self.pool_workers), self.max_eval_rows)


def graph_key(trial: Trial) -> str:
    """What decides a configuration's traced train step: all of its config but the learning rate
    (a variable of the step, training/schedules.py) and the seed (initial weights only)."""
    cfg = trial.cfg
    neutral = cfg.model_copy(update={"seed": 0, "optimizer": cfg.optimizer.model_copy(update={"learning_rate": 1.0})})
    return f"{trial.builder}/{trial.steps_per_epoch}/{neutral.model_dump_json()}"


@dataclass
class Slot:
    """One built and compiled Keras model of a worker, and whose state it holds now."""

    model: Any
    schedule: Any  # its learning-rate schedule, whose peak is a variable
    holds: tuple[int, int] | None = None  # (trial, unit): the state after that unit (-1: initial weights)


class ModelCache:
    """The Keras models one worker process has built. Configurations with the same graph (they
    differ only in learning rate and seed) share models: a worker builds and traces one model per
    graph and member of a fused group, not one per configuration (in a model hopper, every
    worker meets every configuration), and loads a configuration's state (weights, optimizer
    variables, its learning rate) when its model does not hold it already."""

    def __init__(self, trials: Iterable[Trial], record: ModalityRecord) -> None:
        self.trials = {t.index: t for t in trials}
        self.graphs = {index: graph_key(t) for index, t in self.trials.items()}
        self.record = record
        self.slots: dict[str, list[Slot]] = {}  # graph key -> its models
        self.training: dict[int, Slot] = {}  # trial -> the slot its current unit trains in
        self.groups: dict[tuple[int, ...], Any] = {}  # fused groups of slots, traced once each

    def ready(self, store: Store, group: Sequence[int], unit: int) -> list[Any]:
        """The group's models, each holding its trial's state after unit `unit - 1` (its seeded
        initial weights for unit 0), in distinct slots."""
        import tensorflow as tf

        from training.trainer import Solo, compiled_model, load_state

        taken: list[Slot] = []
        for trial in group:
            spec = self.trials[trial]
            slots = self.slots.setdefault(self.graphs[trial], [])
            free = [s for s in slots if all(s is not t for t in taken)]
            wanted = (trial, unit - 1)
            slot = next((s for s in free if s.holds == wanted), free[0] if free else None)
            if slot is None:  # built with this trial's seed: it holds its initial weights
                tf.keras.utils.set_random_seed(spec.cfg.seed)
                slot = Slot(*compiled_model(spec.cfg, self.record, spec.builder, spec.steps_per_epoch, Solo(),
                                            variable_rate=True), holds=(trial, -1))
                slots.append(slot)
            if slot.holds != wanted:
                if unit == 0:
                    self._initial_state(slot, spec)
                else:
                    load_state(store.read(unit_name(trial, unit - 1, "ckpt")), slot.model)
                slot.holds = wanted
            slot.schedule.peak.assign(spec.cfg.optimizer.learning_rate)
            taken.append(slot)
            self.training[trial] = slot
        return [s.model for s in taken]

    def _initial_state(self, slot: Slot, spec: Trial) -> None:
        """The weights a fresh model of this trial starts from (the same on any worker: built
        under its seed) and an optimizer that has taken no step."""
        import tensorflow as tf

        tf.keras.utils.set_random_seed(spec.cfg.seed)
        slot.model.set_weights(build(spec.builder, self.record, spec.cfg.model.params).get_weights())
        slot.model.optimizer.build(slot.model.trainable_variables)
        for variable in slot.model.optimizer.variables:
            variable.assign(tf.zeros_like(variable))

    def fused(self, group: Sequence[int]) -> Any:
        """The group's slots as one graph per step (one member: the plain trainer), built and
        traced once per combination of slots and worker."""
        from training.fused import FusedModels

        slots = [self.training[t] for t in group]
        key = tuple(id(s) for s in slots)
        if key not in self.groups:
            self.groups[key] = FusedModels([s.model for s in slots])
        return self.groups[key]

    def trained(self, store: Store, trial: int, unit: int, marker: dict[str, Any]) -> None:
        """Publish the state after `unit`, then its marker; drop the state two units back."""
        from training.trainer import state_bytes

        slot = self.training[trial]
        store.write(unit_name(trial, unit, "ckpt"), state_bytes(slot.model))
        store.write_json(unit_name(trial, unit, "json"), marker)
        slot.holds = (trial, unit)
        if unit >= 2:
            store.delete(unit_name(trial, unit - 2, "ckpt"))


def train_unit(cache: ModelCache, store: Store, group: Sequence[int], unit: int, epoch: int, partition: int,
               rows: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None,
               evaluate_after: bool, data: SplitData) -> list[dict[str, Any]]:
    """One unit of a group of configurations (one, or several fused into one graph per step):
    restore, one seeded pass over `rows`, validation at an epoch's end, publish each member."""
    from training.trainer import Solo, evaluate

    started = time.perf_counter()
    models = cache.ready(store, group, unit)
    first = cache.trials[group[0]].cfg
    seed = (first.seed, unit, partition + 1)  # partition -1 (one task over all rows) stays non-negative
    per_member, samples = cache.fused(group).fit_rows(*rows, first.optimizer.batch_size, seed)
    trained_s = (time.perf_counter() - started) / len(group)  # each member's share of the core
    markers = []
    for trial, model, metrics in zip(group, models, per_member):
        if evaluate_after and val is not None:
            metrics.update(evaluate(model, *val, len(cache.record.labels), data.eval_batch_size, "val_", Solo())[0])
        marker = {"trial": trial, "index": unit, "epoch": epoch, "partition": partition, "samples": samples,
                  "train_seconds": trained_s, "seconds": (time.perf_counter() - started) / len(group),
                  "fused_with": [t for t in group if t != trial], "finished_at": time.time(), "metrics": metrics}
        cache.trained(store, trial, unit, marker)
        markers.append(marker)
    return markers


@dataclass(frozen=True)
class Hopper:
    """One long-running task per partition (a barrier stage, so all P run at once): it holds its
    partition of the train split in memory and trains whatever unit the driver assigns next."""

    data: SplitData
    trials: tuple[Trial, ...]
    store_url: str
    attempt: str
    partitions: int
    intra_op_threads: int
    poll_s: float

    def __call__(self, _: Iterable[Any]) -> Iterator[dict[str, Any]]:
        from pyspark import BarrierTaskContext

        from training.trainer import set_threads

        partition = BarrierTaskContext.get().partitionId()
        set_threads(self.intra_op_threads, 1)
        store = Store(self.store_url)
        started = time.perf_counter()
        rows = self.data.shard(self.data.train_url, partition, self.partitions)
        val = self.data.validation()
        load_s = time.perf_counter() - started
        cache = ModelCache(self.trials, self.data.record)
        units, waited, seq = 0, 0.0, 0
        while True:
            message = f"ctl/{self.attempt}/w{partition}/{seq:06d}.json"
            waited += store.wait_for(message, self.poll_s)
            seq += 1
            order = store.read_json(message)
            if order.get("stop"):
                break
            train_unit(cache, store, order["trials"], order["index"], order["epoch"], partition, rows, val,
                       order["last_of_epoch"], self.data)
            units += 1
        yield {"partition": partition, "rows": int(len(rows[1])), "units": units, "load_seconds": load_s,
               "idle_seconds": waited}


@dataclass(frozen=True)
class WholeDataTrainer:
    """Task parallelism: one Spark task per configuration, each reading the whole train split
    (the data is replicated to every task) and training its model epoch after epoch."""

    data: SplitData
    trials: tuple[Trial, ...]
    store_url: str
    groups: tuple[tuple[int, ...], ...]  # configurations trained together (fused when more than one)
    target: int  # epochs done when this stage ends
    intra_op_threads: int

    def __call__(self, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
        from training.trainer import set_threads

        set_threads(self.intra_op_threads, 1)
        store = Store(self.store_url)
        cache = ModelCache(self.trials, self.data.record)
        rows = val = None
        for index in indices:
            group = self.groups[index]
            start = len(store.markers(group[-1]))
            if start >= self.target:
                continue
            if rows is None:
                rows = self.data.shard(self.data.train_url, 0, 1)
                val = self.data.validation()
            for epoch in range(start, self.target):
                train_unit(cache, store, group, epoch, epoch, -1, rows, val, True, self.data)
            yield {"group": list(group), "epochs": self.target - start}
