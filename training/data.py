"""The Petastorm seam: a rank's shard of a split as batches of (stored tensors, int labels), for
any modality (uint8 images, int32 token ids, int16 waveforms).

One Petastorm Reader per run and rank reads whole row groups of the rank's shard, pass after
pass, each pass in its own seeded order, ahead across pass and epoch boundaries (our ventilator
and worker replace Petastorm's, whose per-row-group waits and footer reads made small row groups
slow). The raw tensor column of a row group decodes with one `np.frombuffer`
(deepspark.modality), each pass's rows are mixed in a seeded shuffle buffer, and a background
thread keeps `queue_batches` batches ready. The time the training step spends waiting on that
queue is the input stall. Replacing Petastorm means replacing this module.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, groupby, islice
from typing import Any, Callable, Generator, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np

from deepspark.modality import LABEL, TensorSpec, get_modality, unischema

Batch = tuple[np.ndarray, np.ndarray]  # (tensors, int32 labels)


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
    # Shards of (nearly) equal rows, row groups dealt largest first to the lightest shard, instead
    # of Petastorm's every size-th row group: model hopping waits on its largest partition.
    balanced: bool = False


class _ArrowRowGroups:
    """Replaces Petastorm's results reader: Petastorm turns every binary value into a Python bytes
    object (`to_pandas`), which costs more than the whole decode; this one hands the row group's
    Arrow buffers straight to the modality's `decode_arrow`. It also puts a thread pool's results
    back in ventilation order, so a pass is read in its seeded order whatever the pool."""

    batched_output = True

    def __init__(self, spec: TensorSpec, modality: str) -> None:
        self.spec = spec
        self.modality = get_modality(modality)
        self._pending: dict[int, Any] = {}
        self._next = 0

    def read_next(self, workers_pool, schema, ngram):  # type: ignore[no-untyped-def]
        from petastorm.workers_pool import EmptyResultError

        while self._next not in self._pending:
            try:
                seq, table = workers_pool.get_results()
            except EmptyResultError:
                raise StopIteration from None
            self._pending[seq] = table
        table = self._pending.pop(self._next)
        self._next += 1
        tensors = self.modality.decode_arrow(table.column(self.spec.column), self.spec)
        return self._next - 1, tensors, table.column(LABEL).to_numpy().astype(np.int32)


@dataclass(frozen=True)
class PassSeeds:
    """The seed of each pass over a rank's row groups (its row-group order and shuffle buffer):
    pass i of a reader is pass `first + i` of the run, so the order depends only on
    (seed, pass, rank). None: stored order, no shuffling."""

    seed: int | None
    first: int = 0
    rank: int = 0

    def __call__(self, index: int) -> int | None:
        if self.seed is None:
            return None
        return self.seed * 100_003 + (self.first + index) * 101 + self.rank


def pass_order(groups: int, seed: int | None) -> np.ndarray:
    """Positions of a shard's row groups in the order one pass reads them (its own stream of the
    pass seed, independent of the shuffle buffer's)."""
    return np.arange(groups) if seed is None else np.random.default_rng([seed, 1]).permutation(groups)


def _pass_reader_class(local: bool) -> type:
    """Petastorm's Reader with our ventilator and worker, for a local split or not (imported here:
    Petastorm costs ~0.35 s to import)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from petastorm.reader import Reader
    from petastorm.workers_pool.ventilator import Ventilator
    from petastorm.workers_pool.worker_base import WorkerBase

    open_files: list[OrderedDict[str, tuple[Any, Any]]] = []  # every worker's, closed once the reader is joined

    class PassVentilator(Ventilator):
        """Ventilates the shard's row groups pass after pass, each pass in its seeded order, numbered
        in sequence. Petastorm's ConcurrentVentilator polls every 10 ms with room for workers + 2 row
        groups, and its DummyPool sleeps 0.1 s when it finds nothing queued: small row groups waited
        on both. This one ventilates the next row group as soon as one is consumed
        (`processed_item` runs on the consumer's thread), so `ahead` row groups are always queued."""

        def __init__(self, ventilate_fn: Callable[..., None], pieces: list[int], seeds: PassSeeds,
                     passes: int | None, ahead: int) -> None:
            super().__init__(ventilate_fn)
            self.pieces, self.seeds, self.ahead = pieces, seeds, ahead
            self.total = None if passes is None else passes * len(pieces)
            self.next = 0
            self.order = np.arange(0)
            self.stopped = False

        def start(self) -> None:
            for _ in range(self.ahead):
                self._ventilate_one()

        def processed_item(self) -> None:
            self._ventilate_one()

        def completed(self) -> bool:
            return self.stopped or not self.pieces or (self.total is not None and self.next >= self.total)

        def stop(self) -> None:
            self.stopped = True

        def _ventilate_one(self) -> None:
            if self.completed():
                return
            index, position = divmod(self.next, len(self.pieces))
            if position == 0:
                self.order = pass_order(len(self.pieces), self.seeds(index))
            self._ventilate_fn(piece_index=self.pieces[self.order[position]], seq=self.next)
            self.next += 1

    class RowGroupWorker(WorkerBase):
        """Reads one row group's columns and publishes (sequence number, Arrow table). Petastorm's
        ArrowReaderWorker opens the file and parses its footer twice per row group, which costs
        more than reading a small row group; this one keeps the last `OPEN_FILES` files open.
        Local files are Arrow's own, read with Arrow's threads; other filesystems give Python file
        objects, read on this thread only: Arrow's threads calling into them ran Python's garbage
        collector, which aborted the process at exit ("terminate called without an active
        exception")."""

        OPEN_FILES = 16  # per worker: a split of many files must not exhaust file handles

        def __init__(self, worker_id: int, publish_func: Callable[[Any], None], args: tuple) -> None:
            super().__init__(worker_id, publish_func, args)
            self.filesystem, self.row_groups = args[0], args[4]
            self.columns = list(args[2].fields)
            self.files: OrderedDict[str, tuple[Any, Any]] = OrderedDict()  # path -> (handle, ParquetFile)
            open_files.append(self.files)

        @staticmethod
        def new_results_queue_reader() -> None:
            return None  # open_reader sets its own

        def process(self, piece_index: int, seq: int) -> None:
            piece = self.row_groups[piece_index]
            if piece.path in self.files:
                self.files.move_to_end(piece.path)
            else:
                if len(self.files) >= self.OPEN_FILES:
                    self.files.popitem(last=False)[1][0].close()
                handle = pa.OSFile(piece.path) if local else self.filesystem.open(piece.path, "rb")
                self.files[piece.path] = (handle, pq.ParquetFile(handle))
            table = self.files[piece.path][1].read_row_group(piece.row_group, columns=self.columns, use_threads=local)
            self.publish_func((seq, table))

    class PassReader(Reader):  # type: ignore[misc]
        """Petastorm's Reader (dataset metadata, row-group list, shard, worker pool) with our
        ventilator and worker."""

        def __init__(self, seeds: PassSeeds, passes: int | None, balanced: bool, *args: Any, **kwargs: Any) -> None:
            self.seeds, self.passes, self.groups_per_pass, self.balanced = seeds, passes, 0, balanced
            super().__init__(*args, worker_class=RowGroupWorker, **kwargs)

        def _partition_row_groups(self, dataset, row_groups, shard_count, cur_shard, indexes, seed):  # type: ignore[no-untyped-def]
            if not self.balanced:
                return super()._partition_row_groups(dataset, row_groups, shard_count, cur_shard, indexes, seed)
            if len(row_groups) < shard_count:
                raise ValueError(f"{len(row_groups)} row groups cannot make {shard_count} shards")
            footers: dict[str, Any] = {}
            rows = []
            for index in indexes:
                piece = row_groups[index]
                if piece.path not in footers:
                    with dataset.fs.open(piece.path) as handle:
                        footers[piece.path] = pq.ParquetFile(handle).metadata
                rows.append(footers[piece.path].row_group(piece.row_group).num_rows)
            return [i for i, shard in zip(indexes, balanced_shards(rows, shard_count)) if shard == cur_shard]

        def _create_ventilator(self, row_group_indexes, *unused):  # type: ignore[no-untyped-def]
            self.groups_per_pass = len(row_group_indexes)
            return PassVentilator(self._workers_pool.ventilate, list(row_group_indexes), self.seeds, self.passes,
                                  self._workers_pool.workers_count + 2)

        def join(self) -> None:
            """Close the workers' files once they are done: Petastorm's pool and ventilator reference
            each other, so without this only the cycle collector would, some time later."""
            super().join()
            for files in open_files:
                while files:
                    files.popitem()[1][0].close()

    return PassReader


def balanced_shards(rows: list[int], shards: int) -> list[int]:
    """The shard of each row group (given its rows) so that shards hold nearly equal rows: largest
    row group first, each to the shard holding the fewest rows so far (ties: lowest index)."""
    totals = [0] * shards
    out = [0] * len(rows)
    for index in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        target = min(range(shards), key=lambda s: (totals[s], s))
        out[index] = target
        totals[target] += rows[index]
    return out


def open_reader(shard: ShardSpec, seeds: PassSeeds, passes: int | None) -> Any:
    """A Petastorm Reader over this rank's row groups (`cur_shard`/`shard_count`) for `passes`
    passes (None: endless), yielding (sequence number, tensors, labels) per row group in
    ventilation order. Dataset metadata, the row-group list and the worker pool are set up once
    per run, not once per epoch."""
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import normalize_dataset_url_or_urls
    from petastorm.workers_pool.dummy_pool import DummyPool
    from petastorm.workers_pool.thread_pool import ThreadPool

    from deepspark.filesystem import s3_for_fsspec

    if shard.pool_type not in ("thread", "dummy"):
        raise ValueError(f"pool_type {shard.pool_type!r}: expected 'thread' or 'dummy'")
    reader_class = _pass_reader_class(urlparse(shard.url).scheme in ("", "file"))
    s3_for_fsspec()
    filesystem, path = get_filesystem_and_path_or_paths(normalize_dataset_url_or_urls(shard.url))
    fields = unischema(shard.spec, shard.modality).fields
    sharded = shard.size > 1
    reader = reader_class(
        seeds, passes, shard.balanced, filesystem, path,
        schema_fields=[fields[shard.spec.column], fields[LABEL]],  # fields, not name patterns: exact match
        reader_pool=ThreadPool(shard.workers) if shard.pool_type == "thread" else DummyPool(),
        num_epochs=None, is_batched_reader=True,
        cur_shard=shard.rank if sharded else None, shard_count=shard.size if sharded else None,
    )
    reader._results_queue_reader = _ArrowRowGroups(shard.spec, shard.modality)  # pinned petastorm 0.12.1's hook
    return reader


def read_passes(shard: ShardSpec, seeds: PassSeeds, passes: int | None
                ) -> Generator[tuple[int | None, Iterator[Batch]], None, None]:
    """(pass seed, its (tensors, labels) per row group) for each pass over this rank's shard, all
    from one reader; the next row groups are read ahead across pass boundaries."""
    with open_reader(shard, seeds, passes) as reader:
        per_pass = max(reader.groups_per_pass, 1)
        for index, items in groupby(reader, key=lambda item: item[0] // per_pass):
            yield seeds(index), ((x, y) for _, x, y in items)


def read_row_groups(shard: ShardSpec, seed: int | None, infinite: bool) -> Generator[Batch, None, None]:
    """(tensors, labels) per row group of this rank's shard: stored order without a seed, else each
    pass in its own seeded order; one pass unless `infinite`."""
    for _, groups in read_passes(shard, PassSeeds(seed, 0, shard.rank), None if infinite else 1):
        yield from groups


def shuffled_batches(
    groups: Iterable[Batch], batch_size: int, buffer_rows: int, seed: int | None
) -> Generator[Batch, None, Batch | None]:
    """Full batches drawn uniformly from a seeded shuffle buffer of `buffer_rows` rows (tf.data's
    shuffle semantics, vectorised): each batch is gathered from random slots, which the next rows
    of the stream then refill, so every row is copied once in and once out. At the end of the
    stream the buffer drains in a random order; the fewer than `batch_size` rows left are returned."""
    rng = np.random.default_rng(seed)
    capacity = max(buffer_rows, batch_size)
    bx: np.ndarray | None = None
    by: np.ndarray | None = None
    filled = 0
    carry: Batch | None = None
    for x, y in groups:
        if carry is not None:
            x, y = np.concatenate([carry[0], x]), np.concatenate([carry[1], y])
            carry = None
        if bx is None or by is None:
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
    if bx is None or by is None:
        return None
    xs, ys = bx[:filled], by[:filled]
    if carry is not None:
        xs, ys = np.concatenate([xs, carry[0]]), np.concatenate([ys, carry[1]])
    order = rng.permutation(len(ys))
    full = len(order) - len(order) % batch_size
    for start in range(0, full, batch_size):
        idx = order[start : start + batch_size]
        yield xs[idx], ys[idx]
    return (xs[order[full:]], ys[order[full:]]) if full < len(order) else None


def pass_batches(passes: Iterable[tuple[int | None, Iterable[Batch]]], batch_size: int,
                 buffer_rows: int) -> Iterator[Batch]:
    """Full batches, pass after pass: each pass is mixed in a shuffle buffer seeded by its pass seed
    and drained at its end, so a pass yields each of its rows at most once, in batches drawn across
    its row groups, and a pass of R rows yields R // batch_size batches (with steps per epoch =
    rows // batch, one rank's epochs are its passes). The fewer than `batch_size` rows left are
    dropped, unless the pass filled no batch at all (a shard smaller than a batch): then they
    open the next pass."""
    left: Batch | None = None
    for seed, groups in passes:
        batches = shuffled_batches(groups if left is None else chain([left], groups), batch_size, buffer_rows, seed)
        emitted = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration as end:
                left = None if emitted else end.value
                break
            emitted += 1
            yield batch


class StallMeter:
    """Seconds the consumer spent waiting for a batch that was not ready yet."""

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        self.batches = 0

    def reset(self) -> tuple[float, int]:
        out = (self.wait_seconds, self.batches)
        self.wait_seconds, self.batches = 0.0, 0
        return out


def prefetched(source: Iterable, depth: int, meter: StallMeter, limit: int) -> Iterator:
    """Run `source` in a thread, up to `depth` items ahead; stop after `limit` items, then close the
    source in that thread (a generator holding a reader stops it). Waiting is metered. Each side
    wakes the other at the half-full mark, not for every item: waking per item made the two threads
    trade the GIL for every batch, which cost about as much as building a batch of 64 small rows."""
    items: deque = deque()
    ready = threading.Condition()
    half = max(1, depth // 2)
    finished, stopped = False, False
    error: BaseException | None = None

    def produce() -> None:
        nonlocal finished, error
        try:
            for item in islice(source, limit):
                with ready:
                    while len(items) >= depth and not stopped:
                        ready.wait()
                    if stopped:
                        break
                    items.append(item)
                    if len(items) >= half:
                        ready.notify()
        except BaseException as exc:  # surfaced to the consumer
            error = exc
        finally:
            try:
                getattr(source, "close", lambda: None)()
            except BaseException as exc:
                error = error or exc
            with ready:
                finished = True
                ready.notify()

    thread = threading.Thread(target=produce, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            with ready:
                if not items and not finished:
                    started = time.perf_counter()
                    while not items and not finished:
                        ready.wait()
                    meter.wait_seconds += time.perf_counter() - started
                if not items:
                    break
                item = items.popleft()
                if len(items) <= half:
                    ready.notify()
            meter.batches += 1
            yield item
        if error is not None:
            raise error
    finally:
        with ready:
            stopped = True
            ready.notify_all()
        thread.join()


def training_batches(shard: ShardSpec, batch_size: int, buffer_rows: int, seed: int, epoch: int,
                     steps: int, depth: int, meter: StallMeter) -> Iterator[Batch]:
    """Exactly `steps` batches from pass `epoch` on, all from one reader however many passes they
    span: a run's epochs are one call (steps = epochs x steps per epoch), so the reader is opened
    once and reads ahead across epochs. Each rank yields exactly `steps` batches whatever its shard
    holds (shards are whole row groups, so uneven): a small shard just starts its next pass sooner.
    Pass p's row-group order and shuffle depend only on (seed, p, rank); with one pass per epoch
    (one rank, steps per epoch = rows // batch) a resumed run reads what the uninterrupted one did."""

    def stream() -> Iterator[Batch]:
        with closing(read_passes(shard, PassSeeds(seed, epoch, shard.rank), None)) as passes:
            yield from pass_batches(passes, batch_size, buffer_rows)

    return prefetched(stream(), depth, meter, steps)


def strided_rows(shard: ShardSpec, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every `size`-th row starting at `rank` of a whole split (row order as stored):
    exact, disjoint evaluation shards whatever the number of row groups."""
    whole = ShardSpec(shard.url, shard.spec, shard.modality, 0, 1, shard.pool_type, shard.workers)
    parts, held = [], 0
    with closing(read_row_groups(whole, seed=None, infinite=False)) as groups:  # closing: stops the reader
        for part in groups:
            parts.append(part)
            held += len(part[0])
            if max_rows is not None and held >= max_rows:  # the first rows are enough: read no more
                break
    xs = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, *shard.spec.shape), shard.spec.dtype)
    ys = np.concatenate([p[1] for p in parts]) if parts else np.empty((0,), np.int32)
    if max_rows is not None:
        xs, ys = xs[:max_rows], ys[:max_rows]
    return xs[shard.rank :: shard.size], ys[shard.rank :: shard.size]
