"""Helpers the benchmarks share (not a benchmark itself)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


def local_files(root: Path) -> list[str]:
    """Every input file below a local folder, sorted, as plain paths: the job's own driver listing
    (`deepspark.filesystem.list_file_status`, one recursive pyarrow call), so a limit lists as fast
    as the job does (a Python walk stats each file)."""
    from deepspark.filesystem import list_file_status

    return [path[len("file:"):] for path, _, _ in list_file_status(f"file:{root.resolve()}", lambda name: True)]
