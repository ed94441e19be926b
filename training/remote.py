"""What each Horovod rank runs. Built on the driver as a picklable object; imports TensorFlow
and Horovod lazily; shards data by rank; only rank 0 logs to MLflow and writes checkpoints."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepspark.builders import CodeArchive
from deepspark.modality import ModalityRecord
from training.config import TrainConfig
from training.trainer import Collective, pack_checkpoint

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger(__name__)


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


@dataclass(frozen=True)
class RankTask:
    """Everything a rank needs; called once per rank by horovod.spark.run."""

    cfg: TrainConfig
    record: ModalityRecord
    builder: str  # the model builder's `module:attr` reference (deepspark/builders.py)
    train_url: str
    val_url: str | None
    test_url: str | None  # None: no test evaluation (model selection tests only its winner)
    steps_per_epoch: int
    start_epoch: int
    tracking_uri: str | None
    run_id: str | None
    checkpoint: bytes | None = None
    stop_epoch: int | None = None  # train epochs start_epoch..stop_epoch-1 of a cfg.epochs schedule (None: all)
    epoch_results: bool = False  # rank 0 also returns each epoch's metrics and the final checkpoint
    initial_weights: list[np.ndarray] | None = field(default=None, repr=False)  # model.init_from's (a checkpoint wins)
    engine: str = "training.engines:HOROVOD"  # the training engine's reference: its collective runs here
    user_code: CodeArchive | None = None  # the user's builder package, put on this rank's path first
    ranks: int | None = None  # the planned number of ranks, which scales the learning rate (None: those running)

    def __call__(self) -> dict[str, Any] | None:
        from deepspark.logs import configure_logging

        configure_logging()  # a fresh process per rank: its epoch lines go to the task's stderr
        try:
            if self.user_code is not None:  # a rank process sees no --py-files: the builder comes with the task
                self.user_code.install()
            return self._train()
        except BaseException:
            from training.distributed import remove_timeline

            remove_timeline()
            # A collective failed (a peer rank died) or training raised: report it and leave now.
            # Unwinding would destroy TensorFlow's input pipeline while its generator thread waits
            # for data that never comes: with a SIGKILLed peer that deadlocked this rank, and the
            # job with it. Exiting fails this Spark task, and the driver reports the run to resume.
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    def _train(self) -> dict[str, Any] | None:
        import tensorflow as tf

        from training import engines
        from training.trainer import compiled_model, enter_phase, finetune_phases, restore_checkpoint, set_threads

        cfg = self.cfg
        set_threads(cfg.horovod.intra_op_threads, cfg.horovod.inter_op_threads)
        from training.distributed import record_timeline

        record_timeline(cfg.horovod.timeline and not cfg.horovod.elastic)  # read at the collective's start
        collective = engines.load(self.engine).collective()
        self._pin_device(tf, collective)
        if cfg.horovod.mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")
        tf.keras.utils.set_random_seed(cfg.seed)

        model, schedule = compiled_model(cfg, self.record, self.builder, self.steps_per_epoch, collective,
                                         ranks=self.ranks)
        stop_epoch = self.stop_epoch or cfg.epochs
        phases = finetune_phases(cfg.finetune.freeze_epochs, self.start_epoch, stop_epoch)
        first_frozen = phases[0][2] if phases else None
        if first_frozen is not None:  # a fine-tuning schedule: the backbone frozen or not from the start
            schedule = enter_phase(model, cfg, first_frozen, self.steps_per_epoch, collective)
        if self.checkpoint is not None:
            # the unfrozen phase's first epoch starts a fresh optimizer: the frozen phase's weights only
            fresh = first_frozen is False and self.start_epoch == cfg.finetune.freeze_epochs
            restore_checkpoint(self.checkpoint, model, None if fresh else model.optimizer)
        elif self.initial_weights is not None:  # rank 0's are broadcast to the others before the first step
            model.set_weights(self.initial_weights)
        now = Membership(collective, schedule)
        if cfg.horovod.elastic:
            return self._train_elastic(tf, model, now, stop_epoch)
        now.join(self, cfg.optimizer.batch_size)
        from training.callbacks import KeepBest

        keep_best = KeepBest(cfg.early_stopping.monitor, cfg.early_stopping.patience, cfg.early_stopping.restore_best)
        for index, (first, end, frozen) in enumerate(phases):
            if index:  # the unfrozen phase after the frozen one: a fresh optimizer, the weights kept
                now.schedule = enter_phase(model, cfg, bool(frozen), self.steps_per_epoch, collective)
            model.fit(self._batches(tf, now, first, self.steps_per_epoch * (end - first)), initial_epoch=first,
                      epochs=end, steps_per_epoch=self.steps_per_epoch,
                      verbose=0, callbacks=[*collective.fit_callbacks(), _epoch_end(tf, self, now), keep_best])
            if keep_best.stopped:
                break
        return self._result(model, now, keep_best.best_epoch if cfg.early_stopping.restore_best else None)

    def _train_elastic(self, tf: Any, model: Any, now: "Membership", stop_epoch: int) -> dict[str, Any] | None:
        """Training under Horovod's elastic loop. Each (re)start reads rank and size afresh, reshards
        the data and takes a per-rank batch that keeps the planned global batch; it resumes the
        committed epoch at the committed batch, so a reset costs at most `commit_batches` steps.
        Rank 0 logs each membership as the `ranks` metric, and an epoch already logged (by a rank 0
        that was then lost) is not logged again."""
        cfg = self.cfg
        global_batch = cfg.optimizer.batch_size * (self.ranks or now.collective.size)
        state = now.collective.elastic_state(model, epoch=self.start_epoch, batch=0)  # type: ignore[attr-defined]  # HorovodCollective
        commit = _commit_callback(tf, state, cfg.horovod.commit_batches)

        def train(state: Any) -> dict[str, Any] | None:
            try:
                return run(state)
            except tf.errors.UnknownError as exc:  # Horovod's wrapper would swallow one not from a collective
                if not any(op in exc.message for op in ("HorovodAllreduce", "HorovodAllgather", "HorovodBroadcast")):
                    raise RuntimeError(f"training failed: {exc.message}") from exc
                raise

        def run(state: Any) -> dict[str, Any] | None:
            now.join(self, -(-global_batch // now.collective.size), elastic=True)
            if now.rank == 0:
                log.info("elastic: %d rank(s) x %d rows per batch, from epoch %d batch %d", now.size, now.batch,
                         state.epoch + 1, state.batch)
                if now.client is not None:
                    now.client.log_metric(self.run_id, "ranks", now.size, step=state.epoch)
            while state.epoch < stop_epoch:
                first, skip = state.epoch, state.batch
                steps = self.steps_per_epoch - skip  # a partial epoch first when resuming mid-epoch
                end = first + 1 if skip else stop_epoch
                commit.skip = skip
                model.fit(self._batches(tf, now, first, steps * (end - first), skip), initial_epoch=first, epochs=end,
                          steps_per_epoch=steps, verbose=0,
                          callbacks=[*now.collective.fit_callbacks(broadcast=False), _epoch_end(tf, self, now), commit])
            return self._result(model, now, None)

        return now.collective.run_elastic(train, state)  # type: ignore[attr-defined,no-any-return]

    def _batches(self, tf: Any, now: "Membership", first: int, steps: int, skip: int = 0) -> Any:
        """One generator and one reader for a whole fit (a fine-tuning phase, an elastic restart):
        no per-epoch iterator teardown (which stalled ~20 s), no per-epoch reader set-up, reading
        ahead across epoch boundaries; the order depends only on seed, epoch and rank. `skip`: the
        batches of pass `first` trained before an elastic restart, read and dropped."""
        from itertools import islice

        from training.data import training_batches

        cfg, spec, shard, batch = self.cfg, self.record.spec, now.shard, now.batch
        # A buffer larger than a rank's epoch only delays the first batch (it fills before any
        # batch leaves), which costs whole epochs of reading on small datasets of large rows.
        buffer_rows = max(batch, min(cfg.loader.shuffle_buffer, self.steps_per_epoch * batch))
        return tf.data.Dataset.from_generator(
            lambda: islice(training_batches(shard, batch, buffer_rows, cfg.seed, first, skip + steps,
                                            cfg.loader.queue_batches, now.meter), skip, None),
            output_signature=(tf.TensorSpec((batch, *spec.shape), tf.as_dtype(spec.dtype)),
                              tf.TensorSpec((batch,), tf.int32)))

    def _result(self, model: Any, now: "Membership", best_epoch: int | None) -> dict[str, Any] | None:
        """Test metrics over every rank's share; rank 0 returns them with the weights."""
        from training.data import ShardSpec, strided_rows

        cfg = self.cfg
        test_metrics: dict[str, float] = {}
        confusion = np.zeros((0, 0), np.int64)
        if self.test_url is not None:
            test_metrics, confusion = self._evaluate(model, *strided_rows(
                ShardSpec(self.test_url, self.record.spec, self.record.modality, now.rank, now.size,
                          cfg.loader.pool_type, cfg.loader.workers), cfg.max_eval_rows), "test_", now.collective)
        if now.rank != 0:
            return None
        if now.timeline is not None:
            from training.distributed import remove_timeline

            remove_timeline()
        if best_epoch is not None:  # the weights tested
            test_metrics["best_epoch"] = float(best_epoch)
        result = {"weights": model.get_weights(), "test": test_metrics, "confusion": confusion.tolist()}
        if self.epoch_results:
            result.update(epochs=now.epochs, checkpoint=pack_checkpoint(model, model.optimizer))
        return result

    def _pin_device(self, tf: Any, collective: Collective) -> None:
        """The GPU Spark assigned to this task, else the local rank's; CPU threads otherwise."""
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return
        from training.distributed import available_gpu

        assigned = available_gpu()
        index = int(assigned) if assigned is not None else collective.local_rank
        visible = next((g for g in gpus if g.name.endswith(f":{index}")), gpus[index % len(gpus)])
        tf.config.experimental.set_memory_growth(visible, True)
        tf.config.set_visible_devices(visible, "GPU")

    @property
    def num_classes(self) -> int:
        return len(self.record.labels)

    def _evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, prefix: str,
                  collective: Collective) -> tuple[dict[str, float], np.ndarray]:
        from training.trainer import evaluate

        return evaluate(model, x, y, self.num_classes, self.cfg.eval_batch_size, prefix, collective)

    def _mlflow_client(self) -> Any:
        if self.run_id is None:
            return None
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _log_epoch(self, client: Any, epoch: int, metrics: dict[str, float], model: Any, once: bool = False) -> bool:
        """The epoch's metrics and checkpoint (rank 0); `once`: not when the run already has this
        epoch's metrics (logged by a rank 0 lost before the others committed the epoch). Whether
        it logged them."""
        log.info("epoch %d/%d: %s", epoch + 1, self.cfg.epochs, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if client is None:
            return False
        if once and any(m.step == epoch for m in client.get_metric_history(self.run_id, "loss")):
            log.info("epoch %d is in the run already: not logged again", epoch + 1)
            return False
        self._log_metrics(client, epoch, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            name = checkpoint_name(epoch)
            archive = os.path.join(tmp, f"{name}.tar")
            with open(archive, "wb") as fh:
                fh.write(pack_checkpoint(model, model.optimizer))
            client.log_artifact(self.run_id, archive, CHECKPOINT_DIR)
            marker = os.path.join(tmp, f"{name}.json")  # written last: marks the checkpoint complete
            with open(marker, "w") as fh:
                json.dump({"epoch": epoch, "archive": f"{name}.tar", **metrics}, fh)
            client.log_artifact(self.run_id, marker, CHECKPOINT_DIR)
        return True

    def _log_metrics(self, client: Any, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


class Membership:
    """What a rank trains with under its current membership (rank, size, per-rank batch, data
    shard, validation share, MLflow client on rank 0), refreshed by `join` at the start and after
    each elastic reset; with the run's stall meter, schedule and rank 0's per-epoch metrics."""

    def __init__(self, collective: Collective, schedule: Any) -> None:
        from training.data import StallMeter

        self.collective, self.schedule, self.meter = collective, schedule, StallMeter()
        self.epochs: list[dict[str, float]] = []
        self.joins, self.rank, self.size, self.batch, self.elastic = 0, 0, 1, 0, False
        self.shard: Any = None
        self.val: tuple[np.ndarray, np.ndarray] | None = None
        self.client: Any = None
        self.timeline: Any = None  # rank 0's reader of Horovod's timeline (training/timeline.py)

    def join(self, task: RankTask, batch: int, elastic: bool = False) -> None:
        from training.data import ShardSpec, strided_rows

        cfg, record = task.cfg, task.record
        self.joins, self.elastic = self.joins + 1, elastic
        self.rank, self.size, self.batch = self.collective.rank, self.collective.size, batch
        pool = (cfg.loader.pool_type, cfg.loader.workers)
        self.shard = ShardSpec(task.train_url, record.spec, record.modality, self.rank, self.size, *pool)
        self.val = strided_rows(ShardSpec(task.val_url, record.spec, record.modality, self.rank, self.size, *pool),
                                cfg.max_eval_rows) if task.val_url else None
        self.client = task._mlflow_client() if self.rank == 0 else None
        from training.distributed import timeline_file
        from training.timeline import Follower

        path = timeline_file() if self.rank == 0 and not elastic else None
        self.timeline = Follower(path) if path else None


def _epoch_end(tf: Any, task: RankTask, now: Membership) -> Any:
    """The callback that ends each epoch: exact validation, throughput, stall share, logging and
    checkpoint, and where the epoch's time went (rank 0)."""

    class EpochEnd(tf.keras.callbacks.Callback):  # type: ignore[misc,name-defined]
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started, self.wall_started = time.perf_counter(), time.time()
            now.meter.reset()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            assert logs is not None  # Keras passes each epoch's logs (and KeepBest reads what we add)
            elapsed, wall_trained = time.perf_counter() - self.started, time.time()
            wait, _ = now.meter.reset()
            collective, size = now.collective, now.size
            metrics = {"loss": logs["loss"], "accuracy": logs["accuracy"]}
            validating = time.perf_counter()
            if now.val is not None:
                metrics.update(task._evaluate(self.model, *now.val, "val_", collective)[0])
            validation = time.perf_counter() - validating
            slowest = collective.allreduce(np.array([elapsed]), "max", f"elapsed{epoch}")[0]
            metrics["samples_per_s"] = self.params["steps"] * now.batch * size / slowest
            stall = collective.allreduce(np.array([wait / elapsed]), "sum", f"stall{epoch}")[0]
            metrics["input_stall_share"] = stall / size
            metrics["epoch_seconds"] = slowest
            metrics["learning_rate"] = now.schedule(self.model.optimizer.iterations)
            metrics = {k: float(v) for k, v in metrics.items()}
            synced = time.perf_counter() - validating - validation  # the ranks meeting to share the epoch's figures
            logs.update(metrics)  # the exact, rank-shared validation metrics, for KeepBest
            if now.rank == 0:
                now.epochs.append(dict(metrics))
                logging_started = time.perf_counter()
                logged = task._log_epoch(now.client, epoch, metrics, self.model, once=now.joins > 1)
                checkpoint = time.perf_counter() - logging_started
                talk = now.timeline.seconds(self.wall_started, wall_trained) if now.timeline is not None else {}
                parts = epoch_breakdown(elapsed, wait, talk, validation, synced, checkpoint,
                                        time.perf_counter() - self.started)
                log.info("epoch %d time: %s", epoch + 1, ", ".join(f"{k}={v:.3f}" for k, v in parts.items()))
                if logged and now.client is not None:
                    task._log_metrics(now.client, epoch, parts)
            if now.elastic:  # a rank 0 lost while logging fails this for all, before any commits the epoch
                collective.allreduce(np.zeros(1), "sum", f"logged{epoch}")

    return EpochEnd()


BREAKDOWN = ("time_compute_s", "time_input_wait_s", "time_negotiation_s", "time_allreduce_s", "time_validation_s",
             "time_checkpoint_s")


def epoch_breakdown(trained_s: float, input_wait_s: float, communication: dict[str, float], validation_s: float,
                    synced_s: float, checkpoint_s: float, epoch_s: float) -> dict[str, float]:
    """Where rank 0's epoch went. The training steps' time splits into waiting for input, Horovod's
    negotiation (waiting for the slowest rank) and allreduce (moving gradients, from its timeline),
    and compute: the rest of it. Then validation, the ranks meeting to share the epoch's figures
    (`synced_s`, counted as negotiation: it is waiting for the slowest rank), and the metrics and
    checkpoint logging. The parts add up to `time_epoch_s` but for a little bookkeeping."""
    negotiation, allreduce = communication.get("negotiation", 0.0), communication.get("allreduce", 0.0)
    compute = max(trained_s - input_wait_s - negotiation - allreduce, 0.0)
    values = (compute, input_wait_s, negotiation + synced_s, allreduce, validation_s, checkpoint_s)
    return {**{name: float(v) for name, v in zip(BREAKDOWN, values)}, "time_epoch_s": float(epoch_s),
            "time_steps_s": float(trained_s)}  # the training steps alone (what the capacity planner reads)


def _commit_callback(tf: Any, state: Any, every: int) -> Any:
    """Horovod elastic commits: the progress after each batch, the state every `every` batches and
    at each epoch's end (after the epoch's metrics are logged). `skip`: the batches of the epoch
    done before this fit (a restart mid-epoch)."""

    class CommitState(tf.keras.callbacks.Callback):  # type: ignore[misc,name-defined]
        _supports_tf_logs = True  # no per-batch conversion of the logs to numpy

        skip = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            state.batch = self.skip + batch + 1
            if state.batch % every == 0 and batch + 1 < self.params["steps"]:  # the epoch's end commits the last
                state.commit()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.skip = 0
            state.epoch, state.batch = epoch + 1, 0
            state.commit()

    return CommitState()
