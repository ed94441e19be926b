"""Helpers the benchmarks share (not a benchmark itself)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


def read_ahead(executor: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[Any]:
    """`fn` of each item, in order, computed in `executor` up to `depth` items ahead of the consumer
    (Executor.map would submit the whole iterable at once, and a loader's stream never ends)."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
