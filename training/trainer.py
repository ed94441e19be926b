"""The trainer seam: what a Horovod rank, a model-hopper task and a task-parallel task all do.

Build and compile a model for one configuration, fit it for some steps, save and restore its
state (weights and optimizer), and evaluate it exactly across however many processes share the
data. Communication goes through a `Collective`: `Solo` for one process (model hopping and task
parallelism exchange no gradients), `training.distributed.HorovodCollective` for data-parallel
ranks. Horovod's calls live only there, so another data-parallel backend is one more Collective.

Imported inside executors only (TensorFlow loads lazily in each function).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from typing import Any, Protocol

import numpy as np

from deepspark.builders import build
from deepspark.config import ConfigError
from deepspark.modality import ModalityRecord
from training.config import TrainConfig


class Collective(Protocol):
    """How the processes training one model talk to each other."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    def distributed_optimizer(self, optimizer: Any, cfg: TrainConfig) -> Any:
        """The optimizer that averages gradients across processes."""

    def fit_callbacks(self, broadcast: bool = True) -> list[Any]:
        """Keras callbacks that keep the processes' models identical (initial broadcast unless
        `broadcast` is off, metrics)."""

    def allreduce(self, values: np.ndarray, op: str, name: str) -> np.ndarray:
        """Sum or max of a float64 vector across processes."""


class Solo:
    """One process trains the model alone: nothing to exchange."""

    rank, size, local_rank = 0, 1, 0

    def distributed_optimizer(self, optimizer: Any, cfg: TrainConfig) -> Any:
        return optimizer

    def fit_callbacks(self, broadcast: bool = True) -> list[Any]:
        return []

    def allreduce(self, values: np.ndarray, op: str, name: str) -> np.ndarray:
        return np.asarray(values, np.float64)


def set_threads(intra_op: int, inter_op: int) -> None:
    """TensorFlow's thread pools, set before any op runs (wall time is bimodal otherwise)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def compiled_model(cfg: TrainConfig, record: ModalityRecord, builder: str, steps_per_epoch: int,
                   collective: Collective, variable_rate: bool = False, ranks: int | None = None) -> tuple[Any, Any]:
    """A fresh model from `builder` (a `module:attr` reference) with `cfg.model.params` and the
    config's optimizer, compiled for training, and its learning-rate schedule (peak learning rate
    x `ranks`, by default the processes running; warm-up, decay over `cfg.epochs`). `variable_rate`:
    the peak is a variable (`schedule.peak.assign(...)` changes it after tracing)."""
    import tensorflow as tf

    from training.schedules import WarmupThenDecay

    model = build(builder, record, cfg.model.params)
    opt = cfg.optimizer
    peak = opt.learning_rate * (ranks or collective.size)
    schedule = WarmupThenDecay(tf.Variable(peak, trainable=False, dtype=tf.float32) if variable_rate else peak,
                               opt.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch, opt.schedule)
    _compile(model, cfg, schedule, collective)
    return model, schedule


def _compile(model: Any, cfg: TrainConfig, schedule: Any, collective: Collective) -> None:
    """Compile with a fresh Adam on `schedule`, wrapped by the collective (Horovod's optimizer)."""
    import tensorflow as tf

    optimizer = collective.distributed_optimizer(tf.keras.optimizers.Adam(learning_rate=schedule), cfg)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=cfg.horovod.xla)


def finetune_phases(freeze_epochs: int, start: int, stop: int) -> list[tuple[int, int, bool | None]]:
    """(first epoch, end epoch, backbone frozen) of each phase that trains epochs start..stop-1:
    frozen before `freeze_epochs`, unfrozen from then on; None when there is no schedule (the
    model trains as built)."""
    if not freeze_epochs:
        return [(start, stop, None)] if start < stop else []
    phases: list[tuple[int, int, bool | None]] = []
    if start < min(freeze_epochs, stop):
        phases.append((start, min(freeze_epochs, stop), True))
    if max(start, freeze_epochs) < stop:
        phases.append((max(start, freeze_epochs), stop, False))
    return phases


def backbone_of(model: Any, key: str = "finetune.freeze_epochs") -> Any:
    """The model's one nested Keras model: the backbone a fine-tuning schedule freezes."""
    import tensorflow as tf

    nested = [layer for layer in model.layers if isinstance(layer, tf.keras.Model)]
    if len(nested) != 1:
        raise ConfigError(f"{key}: a fine-tuning schedule needs a model with one nested backbone model "
                          f"(this one has {len(nested)}: {[layer.name for layer in nested]})")
    return nested[0]


def check_finetune(model: Any, cfg: TrainConfig) -> None:
    """A fine-tuning schedule's keys against the built model, on the driver before launch."""
    schedule = cfg.finetune
    if not schedule.freeze_epochs:
        return
    if schedule.freeze_epochs >= cfg.epochs:
        raise ConfigError(f"finetune.freeze_epochs={schedule.freeze_epochs} leaves no epoch to fine-tune in "
                          f"epochs={cfg.epochs}")
    _first_unfrozen(backbone_of(model), schedule.unfreeze_from)


def _first_unfrozen(backbone: Any, unfreeze_from: str | None) -> int:
    """The index of the backbone's first layer to train once unfrozen (0: all of them)."""
    names = [layer.name for layer in backbone.layers]
    if unfreeze_from is None:
        return 0
    if unfreeze_from not in names:
        raise ConfigError(f"finetune.unfreeze_from: the backbone {backbone.name} has no layer {unfreeze_from!r} "
                          f"(its last layers: {', '.join(names[-5:])})")
    return names.index(unfreeze_from)


def enter_phase(model: Any, cfg: TrainConfig, frozen: bool, steps_per_epoch: int, collective: Collective) -> Any:
    """Freeze or unfreeze the backbone (from `finetune.unfreeze_from`) and compile the model with a
    fresh optimizer for the phase: the configured schedule while frozen, the fine-tuning learning
    rate (x processes, cosine over the remaining epochs) after; returns the phase's schedule."""
    from training.schedules import WarmupThenDecay

    backbone = backbone_of(model)
    opt = cfg.optimizer
    if frozen:
        backbone.trainable = False
        schedule = WarmupThenDecay(opt.learning_rate * collective.size, opt.warmup_epochs * steps_per_epoch,
                                   cfg.epochs * steps_per_epoch, opt.schedule)
    else:
        backbone.trainable = True
        for layer in backbone.layers[:_first_unfrozen(backbone, cfg.finetune.unfreeze_from)]:
            layer.trainable = False
        rate = cfg.finetune.learning_rate or opt.learning_rate / 10
        schedule = WarmupThenDecay(rate * collective.size, 0,
                                   (cfg.epochs - cfg.finetune.freeze_epochs) * steps_per_epoch, opt.schedule)
    _compile(model, cfg, schedule, collective)
    return schedule


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


def restore_checkpoint(archive: bytes, model: Any, optimizer: Any | None) -> None:
    """Load a `pack_checkpoint` archive into a compiled model (its optimizer's slots are built
    first, so Adam's moments and step counter are restored too, not only the weights); with no
    optimizer, the weights alone (a fine-tuning phase starts a fresh optimizer)."""
    import tensorflow as tf

    if optimizer is not None:
        optimizer.build(model.trainable_variables)
    parts = {"model": model, **({"optimizer": optimizer} if optimizer is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tf.train.Checkpoint(**parts).read(os.path.join(tmp, "ckpt")).expect_partial()


def predict(model: Any, x: np.ndarray, batch_size: int, num_classes: int) -> np.ndarray:
    """Probabilities batch by batch, calling the model directly (Keras' `predict` builds a tf.data
    pipeline per call, which is most of the cost on a validation split)."""
    if not len(x):
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])


def state_bytes(model: Any) -> bytes:
    """Weights and optimizer state (Adam's moments and step) as one uncompressed `.npz`: what a
    model hopping between workers carries, in a few milliseconds (a tf.train.Checkpoint archive
    costs 50-200 ms here, paid on every hop)."""
    buf = io.BytesIO()
    arrays = [*model.get_weights(), *[v.numpy() for v in model.optimizer.variables]]
    np.savez(buf, *arrays)
    return buf.getvalue()


def load_state(data: bytes, model: Any) -> None:
    """`state_bytes` into a compiled model of the same configuration (its optimizer built first,
    so the variables line up in the order they were saved); a `pack_checkpoint` archive (what a
    Horovod rank returns) is restored as such."""
    if not data.startswith(b"PK"):  # .npz is a zip archive; the checkpoint a tar
        restore_checkpoint(data, model, model.optimizer)
        return
    model.optimizer.build(model.trainable_variables)
    with np.load(io.BytesIO(data)) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    weights = len(model.get_weights())
    variables = model.optimizer.variables
    if len(arrays) != weights + len(variables):
        raise ValueError(f"saved state holds {len(arrays)} arrays, the model and optimizer {weights + len(variables)}")
    model.set_weights(arrays[:weights])
    for variable, value in zip(variables, arrays[weights:]):
        variable.assign(value)


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, prefix: str,
             collective: Collective) -> tuple[dict[str, float], np.ndarray]:
    """Exact loss, accuracy and confusion matrix over all processes' disjoint shares: sums are
    reduced, not averages of averages."""
    probs = predict(model, x, batch_size, num_classes)
    eps = 1e-7
    loss_sum = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0)).sum()) if len(y) else 0.0
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.float64)
    np.add.at(confusion, (y, predicted), 1)
    totals = collective.allreduce(np.concatenate([[loss_sum], confusion.ravel()]), "sum", f"{prefix}eval")
    confusion = totals[1:].reshape(num_classes, num_classes)
    n = max(confusion.sum(), 1.0)
    return ({f"{prefix}loss": float(totals[0] / n), f"{prefix}accuracy": float(np.trace(confusion) / n)},
            confusion.astype(np.int64))
