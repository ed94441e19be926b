"""Model hopper parallelism's scheduler (Cerebro, Nakandala et al., VLDB 2020), as pure code.

P workers each hold one partition of the training data; a model trains on one partition at a
time (a *unit*: one sub-epoch), then hops. Within an epoch a model visits every partition exactly
once, in whatever order frees up first, and never runs on two workers at once, so each epoch is
the same number of sequential SGD updates as one pass over all the data. The scheduler is
dynamic: an idle worker takes the eligible model with the least progress (ties: lowest index),
so models of different speeds do not leave workers waiting on a fixed rotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Unit:
    """Model `model` trains its `index`-th sub-epoch (epoch index // partitions) on `partition`."""

    model: int
    partition: int
    index: int
    epoch: int
    last_of_epoch: bool  # the model has then visited every partition of this epoch


@dataclass
class HopScheduler:
    partitions: int
    targets: Mapping[int, int]  # model -> epochs it must have finished when this stage ends
    history: dict[int, list[int]] = field(default_factory=dict)  # model -> partitions of its done units, in order
    running: dict[int, Unit] = field(default_factory=dict)  # model -> its unit in flight

    def __post_init__(self) -> None:
        for model in self.targets:
            self.history.setdefault(model, [])

    def _visited_this_epoch(self, model: int) -> Sequence[int]:
        done = self.history[model]
        return done[len(done) - len(done) % self.partitions:]

    def remaining(self, model: int) -> int:
        return self.targets[model] * self.partitions - len(self.history[model])

    def next_for(self, partition: int) -> Unit | None:
        """The unit an idle worker holding `partition` should run now, or None (wait)."""
        busy = {u.partition for u in self.running.values()}
        if partition in busy:
            raise ValueError(f"partition {partition} is already training model "
                             f"{next(m for m, u in self.running.items() if u.partition == partition)}")
        eligible = [m for m in self.targets if m not in self.running and self.remaining(m) > 0
                    and partition not in self._visited_this_epoch(m)]
        if not eligible:
            return None
        model = min(eligible, key=lambda m: (len(self.history[m]), m))
        index = len(self.history[model])
        unit = Unit(model, partition, index, index // self.partitions,
                    len(self._visited_this_epoch(model)) == self.partitions - 1)
        self.running[model] = unit
        return unit

    def finish(self, unit: Unit) -> None:
        if self.running.get(unit.model) != unit:
            raise ValueError(f"unit {unit} is not running")
        del self.running[unit.model]
        self.history[unit.model].append(unit.partition)

    @property
    def done(self) -> bool:
        return not self.running and all(self.remaining(m) <= 0 for m in self.targets)
