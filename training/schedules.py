"""Learning-rate schedule computed in the graph from the optimizer's step counter: a linear
warm-up to the rank-scaled peak, then constant or cosine decay. No per-batch Python callback
(which costs a host sync per step), and a resumed run continues exactly where it stopped
because the step counter is part of the checkpoint.

Imported only inside training ranks (it needs TensorFlow at import time to register the class,
which Horovod's DistributedOptimizer rebuilds from its config)."""

from __future__ import annotations

import math

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="deepspark")
class WarmupThenDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak: "float | tf.Variable", warmup_steps: int, total_steps: int, kind: str = "cosine",
                 final_fraction: float = 0.0) -> None:
        # A variable peak is read in the graph: one traced train step serves every configuration
        # that differs only in its learning rate (model selection's workers share models so).
        self.peak = peak if isinstance(peak, tf.Variable) else float(peak)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.kind, self.final_fraction = kind, float(final_fraction)

    def __call__(self, step):  # type: ignore[no-untyped-def]
        step = tf.cast(step, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        if self.kind == "constant":
            return warm
        progress = tf.clip_by_value((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        cosine = self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, self.peak * cosine)

    def get_config(self) -> dict:
        return {"peak": float(self.peak), "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "kind": self.kind, "final_fraction": self.final_fraction}
