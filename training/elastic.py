"""Horovod elastic state for a compiled Keras 2.15 model. Imported only inside ranks (Horovod and
TensorFlow at import time).

Horovod 0.28.1's `KerasState` calls `optimizer.variables()`, a method of the optimizers before
Keras 2.11; today's optimizers have a `variables` property, so its save, restore and sync all
raise. This state holds the same things (the model's variables, the optimizer's slots and step
counter, plain progress values) through the property. The optimizer must be built before the
state is made, so every rank, a late joiner included, holds the same list of variables."""

from __future__ import annotations

from typing import Any

import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
import numpy as np
from horovod.common.elastic import ObjectState


class KerasModelState(hvd.elastic.KerasState):  # type: ignore[misc]
    def __init__(self, model: Any, **progress: Any) -> None:
        model.optimizer.build(model.trainable_variables)  # slots exist before the first commit
        super().__init__(model, **progress)

    def _variables(self) -> list[Any]:
        return [*self.model.variables, *self.optimizer.variables]

    def _save_model(self) -> None:
        self._saved_values = [np.array(v.numpy(), copy=True) for v in self._variables()]

    def _load_model(self) -> None:
        for variable, value in zip(self._variables(), self._saved_values):
            variable.assign(value)

    def sync(self) -> None:
        """Rank 0's variables and progress to every rank (a new rank joins with them)."""
        hvd_tf.broadcast_variables(self._variables(), root_rank=0)
        self._save_model()
        ObjectState.sync(self)  # the progress values (KerasState's own sync is the broken one)
