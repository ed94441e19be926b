"""Model batching: K >= 1 models that read the same input trained as one graph per step.

Small models leave a core (or a GPU) mostly waiting on per-step overhead: Python, kernel
launches, one small matmul after another. Fusing K of them feeds one batch to K towers in one
`tf.function`: the summed loss's gradient with respect to each tower is that tower's own loss
gradient (their variables are disjoint), and each tower keeps its own optimizer, learning-rate
schedule and state, so each member trains exactly as it would alone on the same batches.

With K = 1 it is the plain trainer of model hopping and task parallelism: one traced step fed
numpy batches, no `tf.data` pipeline per pass. (Keras' `fit` on numpy builds one per call, whose
own thread pool made two workers sharing two cores train at 0.57 of one alone; this step keeps
each at 1.0: benchmarks/README.md.)

Imported inside workers (TensorFlow at call time).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class FusedModels:
    """K compiled Keras models (each with its own optimizer) stepped together."""

    def __init__(self, models: Sequence[Any]) -> None:
        import tensorflow as tf

        self.models = list(models)
        loss = tf.keras.losses.SparseCategoricalCrossentropy()

        @tf.function
        def step(x: Any, y: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                outputs = [m(x, training=True) for m in self.models]
                losses = [loss(y, out) for out in outputs]
                # regularisation terms, as Keras' own train step adds them
                total = tf.add_n([loss + tf.add_n(m.losses) if m.losses else loss for loss, m in zip(losses, self.models)])
            variables = [m.trainable_variables for m in self.models]
            grads = tape.gradient(total, variables)
            for m, g, v in zip(self.models, grads, variables):
                m.optimizer.apply_gradients(zip(g, v))
            hits = [tf.reduce_mean(tf.cast(tf.equal(tf.cast(tf.argmax(out, 1), y.dtype), y), tf.float32))
                    for out in outputs]
            return tf.stack(losses), tf.stack(hits)

        self._step = step

    def fit_rows(self, x: np.ndarray, y: np.ndarray, batch_size: int,
                 seed: int | Sequence[int]) -> tuple[list[dict[str, float]], int]:
        """One pass over in-memory rows in a seeded order, full batches only (the rest is dropped,
        as the streaming loader does): per member its mean loss and accuracy over the pass, and
        the samples each trained on."""
        steps = len(y) // batch_size
        if steps == 0:
            return [{} for _ in self.models], 0
        order = np.random.default_rng(seed).permutation(len(y))[: steps * batch_size]
        xs, ys = x[order], y[order]
        losses = np.zeros(len(self.models))
        hits = np.zeros(len(self.models))
        for i in range(steps):
            batch = slice(i * batch_size, (i + 1) * batch_size)
            step_losses, step_hits = self._step(xs[batch], ys[batch])
            losses += step_losses.numpy()
            hits += step_hits.numpy()
        return ([{"loss": float(loss / steps), "accuracy": float(h / steps)} for loss, h in zip(losses, hits)],
                steps * batch_size)
