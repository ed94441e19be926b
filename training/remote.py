"""What each Horovod rank runs. Built on the driver as a picklable object; imports TensorFlow
and Horovod lazily; shards data by rank; only rank 0 logs to MLflow and writes checkpoints."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepspark.modality import ModalityRecord
from training.config import TrainConfig

CHECKPOINT_DIR = "checkpoints"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def pack_checkpoint(model: Any, optimizer: Any) -> bytes:
    """Model and optimizer state (tf.train.Checkpoint) as one tar archive in memory."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "ckpt"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in sorted(os.listdir(tmp)):
                tar.add(os.path.join(tmp, name), arcname=name)
        return buf.getvalue()


def restore_checkpoint(archive: bytes, model: Any, optimizer: Any) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tf.train.Checkpoint(model=model, optimizer=optimizer).read(os.path.join(tmp, "ckpt")).expect_partial()


def _allreduce(values: np.ndarray, op: str, name: str) -> np.ndarray:
    """Sum or max of a float64 vector across ranks."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    reduce_op = {"sum": hvd_tf.Sum, "max": hvd_tf.Max}[op]
    return hvd_tf.allreduce(tf.constant(values, tf.float64), op=reduce_op, name=name).numpy()


@dataclass(frozen=True)
class RankTask:
    """Everything a rank needs; called once per rank by horovod.spark.run."""

    cfg: TrainConfig
    record: ModalityRecord
    model_name: str
    train_url: str
    val_url: str | None
    test_url: str
    steps_per_epoch: int
    start_epoch: int
    tracking_uri: str | None
    run_id: str | None
    checkpoint: bytes | None = None

    def __call__(self) -> dict[str, Any] | None:
        try:
            return self._train()
        except BaseException:
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

        cfg = self.cfg
        tf.config.threading.set_intra_op_parallelism_threads(cfg.horovod.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.horovod.inter_op_threads)
        import horovod.tensorflow.keras as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        self._pin_device(tf, hvd)
        if cfg.horovod.mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")
        tf.keras.utils.set_random_seed(cfg.seed)

        from training.data import ShardSpec, StallMeter, strided_rows, training_batches

        spec = self.record.spec
        model = self.record.plugin.build_model(self.model_name, self.record)
        from training.schedules import WarmupThenDecay

        schedule = WarmupThenDecay(cfg.optimizer.learning_rate * size, cfg.optimizer.warmup_epochs * self.steps_per_epoch,
                                   cfg.epochs * self.steps_per_epoch, cfg.optimizer.schedule)
        compression = hvd.Compression.fp16 if cfg.horovod.compression == "fp16" else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(learning_rate=schedule), compression=compression,
                                             backward_passes_per_step=cfg.horovod.backward_passes_per_step,
                                             average_aggregated_gradients=True)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      jit_compile=cfg.horovod.xla)
        if self.checkpoint is not None:
            model.optimizer.build(model.trainable_variables)
            restore_checkpoint(self.checkpoint, model, model.optimizer)
        pool = (cfg.loader.pool_type, cfg.loader.workers)
        shard = ShardSpec(self.train_url, spec, self.record.modality, rank, size, *pool)
        val = strided_rows(ShardSpec(self.val_url, spec, self.record.modality, rank, size, *pool),
                           cfg.max_eval_rows) if self.val_url else None
        batch = cfg.optimizer.batch_size
        meter = StallMeter()

        # A buffer larger than a rank's epoch only delays the first batch (it fills before any
        # batch leaves), which costs whole epochs of reading on small datasets of large rows.
        buffer_rows = max(batch, min(cfg.loader.shuffle_buffer, self.steps_per_epoch * batch))

        def all_epochs():  # type: ignore[no-untyped-def]
            """One generator and one reader for the whole fit: no per-epoch iterator teardown (which
            stalled ~20 s), no per-epoch reader set-up, reading ahead across epoch boundaries."""
            steps = self.steps_per_epoch * (cfg.epochs - self.start_epoch)
            return training_batches(shard, batch, buffer_rows, cfg.seed, self.start_epoch, steps,
                                    cfg.loader.queue_batches, meter)

        dataset = tf.data.Dataset.from_generator(all_epochs, output_signature=(
            tf.TensorSpec((batch, *spec.shape), tf.as_dtype(spec.dtype)), tf.TensorSpec((batch,), tf.int32)))
        task, client = self, (self._mlflow_client() if rank == 0 else None)

        class EpochEnd(tf.keras.callbacks.Callback):
            """Per-epoch validation, throughput, stall share, logging, checkpoint (rank 0)."""

            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                self.started = time.perf_counter()
                meter.reset()

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                elapsed = time.perf_counter() - self.started
                wait, _ = meter.reset()
                metrics = {"loss": logs["loss"], "accuracy": logs["accuracy"]}
                if val is not None:
                    metrics.update(task._evaluate(self.model, *val, prefix="val_")[0])
                slowest = _allreduce(np.array([elapsed]), "max", f"elapsed{epoch}")[0]
                metrics["samples_per_s"] = task.steps_per_epoch * batch * size / slowest
                metrics["input_stall_share"] = _allreduce(np.array([wait / elapsed]), "sum", f"stall{epoch}")[0] / size
                metrics["epoch_seconds"] = slowest
                metrics["learning_rate"] = schedule(self.model.optimizer.iterations)
                metrics = {k: float(v) for k, v in metrics.items()}
                logs.update(metrics)  # the exact, rank-shared validation metrics, for KeepBest
                if rank == 0:
                    task._log_epoch(client, epoch, metrics, self.model)

        from training.callbacks import KeepBest

        keep_best = KeepBest(cfg.early_stopping.monitor, cfg.early_stopping.patience, cfg.early_stopping.restore_best)
        if self.start_epoch < cfg.epochs:
            model.fit(dataset, initial_epoch=self.start_epoch, epochs=cfg.epochs, steps_per_epoch=self.steps_per_epoch,
                      verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                            hvd.callbacks.MetricAverageCallback(), EpochEnd(), keep_best])

        test_metrics, confusion = self._evaluate(model, *strided_rows(
            ShardSpec(self.test_url, spec, self.record.modality, rank, size, *pool), cfg.max_eval_rows), prefix="test_")
        if rank != 0:
            return None
        if cfg.early_stopping.restore_best and keep_best.best_epoch is not None:  # the weights tested
            test_metrics["best_epoch"] = float(keep_best.best_epoch)
        return {"weights": model.get_weights(), "test": test_metrics, "confusion": confusion.tolist()}

    def _pin_device(self, tf: Any, hvd: Any) -> None:
        """The GPU Spark assigned to this task, else the local rank's; CPU threads otherwise."""
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return
        from training.distributed import available_gpu

        assigned = available_gpu()
        index = int(assigned) if assigned is not None else hvd.local_rank()
        visible = next((g for g in gpus if g.name.endswith(f":{index}")), gpus[index % len(gpus)])
        tf.config.experimental.set_memory_growth(visible, True)
        tf.config.set_visible_devices(visible, "GPU")

    @property
    def num_classes(self) -> int:
        return len(self.record.labels)

    def _evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, prefix: str) -> tuple[dict[str, float], np.ndarray]:
        """Exact metrics over all ranks' disjoint shares: sums are allreduced, not averages of averages."""
        probs = model.predict(x, batch_size=self.cfg.eval_batch_size, verbose=0) if len(x) else np.zeros((0, self.num_classes))
        eps = 1e-7
        loss_sum = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0)).sum()) if len(y) else 0.0
        predicted = probs.argmax(axis=1)
        confusion = np.zeros((self.num_classes, self.num_classes), np.float64)
        np.add.at(confusion, (y, predicted), 1)
        totals = _allreduce(np.concatenate([[loss_sum], confusion.ravel()]), "sum", f"{prefix}eval")
        confusion = totals[1:].reshape(self.num_classes, self.num_classes)
        n = confusion.sum()
        return ({f"{prefix}loss": float(totals[0] / n), f"{prefix}accuracy": float(np.trace(confusion) / n)},
                confusion.astype(np.int64))

    def _mlflow_client(self) -> Any:
        if self.run_id is None:
            return None
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _log_epoch(self, client: Any, epoch: int, metrics: dict[str, float], model: Any) -> None:
        print(f"epoch {epoch + 1}/{self.cfg.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
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
