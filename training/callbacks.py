"""Keras callbacks that run inside the ranks. Imported only there (TensorFlow at import time,
like training/schedules.py)."""

from __future__ import annotations

import tensorflow as tf


class KeepBest(tf.keras.callbacks.Callback):
    """Early stopping and best-weights restore. Keras' EarlyStopping restores the best weights
    only when it stops early; this one restores them at the end of training in every case. It
    decides on metrics every rank holds identically (the allreduced validation metrics), so all
    ranks stop at the same epoch and none waits for a peer that has left."""

    def __init__(self, monitor: str, patience: int | None, restore_best: bool) -> None:
        super().__init__()
        self.monitor, self.patience, self.restore_best = monitor, patience, restore_best
        self.higher_is_better = monitor.endswith("accuracy")
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: list | None = None
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if self.best is None or (value > self.best if self.higher_is_better else value < self.best):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            if self.restore_best:
                self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            self.model.stop_training = True

    @property
    def stopped(self) -> bool:
        """Patience ran out: no later epoch (nor a later fine-tuning phase) should run."""
        return self.patience is not None and self.wait >= self.patience

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.restore_best and self.best_weights is not None:
            self.model.set_weights(self.best_weights)
