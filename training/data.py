"""The Petastorm seam: a rank's shard of a split as batches of (stored tensors, int labels), for
any modality (uint8 images, int32 token ids, int16 waveforms).

Petastorm's `make_batch_reader` yields whole row groups; the raw tensor column of a row group
decodes with one `np.frombuffer` (deepspark.modality), rows are mixed in a seeded shuffle
buffer, and a background thread keeps `queue_batches` batches ready. The time the training step
spends waiting on that queue is the input stall. Replacing Petastorm means replacing this module.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from deepspark.modality import LABEL, TensorSpec, get_modality, unischema


@dataclass(frozen=True)
class ShardSpec:
    """Which rows this rank reads and how."""

    url: str
    spec: TensorSpec
    modality: str
    rank: int = 0
    size: int = 1
    pool_type: str = "dummy"
    workers: int = 1


class _ArrowRowGroups:
    """Replaces Petastorm's results reader for make_batch_reader: Petastorm turns every binary
    value into a Python bytes object (`to_pandas`), which costs more than the whole decode; this
    one hands the row group's Arrow buffers straight to the modality's `decode_arrow`."""

    batched_output = True

    def __init__(self, spec: TensorSpec, modality: str) -> None:
        self.spec = spec
        self.modality = get_modality(modality)

    def read_next(self, workers_pool, schema, ngram):  # type: ignore[no-untyped-def]
        from petastorm.workers_pool import EmptyResultError

        try:
            table = workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None
        tensors = self.modality.decode_arrow(table.column(self.spec.column), self.spec)
        return tensors, table.column(LABEL).to_numpy().astype(np.int32)


def read_row_groups(shard: ShardSpec, seed: int | None, infinite: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per row group of this rank's shard, row groups in a seeded order."""
    from petastorm import make_batch_reader

    fields = unischema(shard.spec, shard.modality).fields
    with make_batch_reader(
        shard.url,
        schema_fields=[fields[shard.spec.column], fields[LABEL]],  # fields, not name patterns: exact match
        reader_pool_type=shard.pool_type,
        workers_count=shard.workers,
        shuffle_row_groups=seed is not None,
        seed=seed,
        num_epochs=None if infinite else 1,
        cur_shard=shard.rank if shard.size > 1 else None,
        shard_count=shard.size if shard.size > 1 else None,
        shard_seed=0,
    ) as reader:
        reader._results_queue_reader = _ArrowRowGroups(shard.spec, shard.modality)  # pinned petastorm 0.12.1's hook
        yield from reader


def shuffled_batches(
    groups: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, buffer_rows: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Full batches drawn uniformly from a seeded shuffle buffer of `buffer_rows` rows (tf.data's
    shuffle semantics, vectorised): each batch is gathered from random slots, which the next rows
    of the stream then refill, so every row is copied once in and once out."""
    rng = np.random.default_rng(seed)
    capacity = max(buffer_rows, batch_size)
    bx: np.ndarray | None = None
    by: np.ndarray | None = None
    filled = 0
    carry: tuple[np.ndarray, np.ndarray] | None = None
    for x, y in groups:
        if carry is not None:
            x, y = np.concatenate([carry[0], x]), np.concatenate([carry[1], y])
            carry = None
        if bx is None:
            bx, by = np.empty((capacity, *x.shape[1:]), x.dtype), np.empty((capacity,), y.dtype)
        pos = min(capacity - filled, len(y))
        bx[filled : filled + pos], by[filled : filled + pos] = x[:pos], y[:pos]
        filled += pos
        while filled == capacity and len(y) - pos >= batch_size:
            slots = rng.choice(capacity, batch_size, replace=False)
            yield bx[slots], by[slots]
            bx[slots], by[slots] = x[pos : pos + batch_size], y[pos : pos + batch_size]
            pos += batch_size
        if pos < len(y):
            carry = (x[pos:], y[pos:])
    if bx is None:
        return
    xs, ys = bx[:filled], by[:filled]
    if carry is not None:
        xs, ys = np.concatenate([xs, carry[0]]), np.concatenate([ys, carry[1]])
    order = rng.permutation(len(ys))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield xs[idx], ys[idx]


class StallMeter:
    """Seconds the consumer spent waiting for a batch that was not ready yet."""

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        self.batches = 0

    def reset(self) -> tuple[float, int]:
        out = (self.wait_seconds, self.batches)
        self.wait_seconds, self.batches = 0.0, 0
        return out


def prefetched(source: Iterator, depth: int, meter: StallMeter, limit: int) -> Iterator:
    """Run `source` in a thread, `depth` items ahead; stop after `limit` items. Waiting is metered."""
    items: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for count, item in enumerate(source):
                if stop.is_set() or count >= limit:
                    break
                items.put(item)
        except BaseException as exc:  # surfaced to the consumer
            items.put(exc)
        finally:
            items.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            started = time.perf_counter()
            item = items.get()
            meter.wait_seconds += time.perf_counter() - started
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            meter.batches += 1
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so the producer can exit
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def training_batches(shard: ShardSpec, batch_size: int, buffer_rows: int, seed: int, epoch: int,
                     steps: int, depth: int, meter: StallMeter) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Exactly `steps` batches for one epoch; the order depends only on (seed, epoch, rank),
    so a resumed run sees the same data order from its first resumed epoch on."""
    epoch_seed = seed * 100_003 + epoch * 101 + shard.rank
    groups = read_row_groups(shard, seed=epoch_seed, infinite=True)
    return prefetched(shuffled_batches(groups, batch_size, buffer_rows, epoch_seed), depth, meter, steps)


def strided_rows(shard: ShardSpec, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every `size`-th row starting at `rank` of a whole split (row order as stored):
    exact, disjoint evaluation shards whatever the number of row groups."""
    whole = ShardSpec(shard.url, shard.spec, shard.modality, 0, 1, shard.pool_type, shard.workers)
    parts = list(read_row_groups(whole, seed=None, infinite=False))
    xs = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, *shard.spec.shape), shard.spec.dtype)
    ys = np.concatenate([p[1] for p in parts]) if parts else np.empty((0,), np.int32)
    if max_rows is not None:
        xs, ys = xs[:max_rows], ys[:max_rows]
    return xs[shard.rank :: shard.size], ys[shard.rank :: shard.size]
