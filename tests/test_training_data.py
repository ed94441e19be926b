"""The loader: shuffle buffer, prefetch queue with stall metering, and real Petastorm readers over
small Parquet splits (epochs, shards, order, read-ahead, shutdown)."""

import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import petastorm.reader
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepspark.modality import TensorSpec
from training.data import (
    ShardSpec,
    StallMeter,
    pass_batches,
    prefetched,
    read_row_groups,
    shuffled_batches,
    strided_rows,
    training_batches,
)


def groups(n_groups: int, rows: int):
    for g in range(n_groups):
        ids = np.arange(g * rows, (g + 1) * rows)
        yield ids.reshape(-1, 1, 1, 1).astype(np.uint8), ids.astype(np.int32)


def test_shuffle_buffer_emits_full_batches_of_every_row_once():
    batches = list(shuffled_batches(groups(10, 100), batch_size=32, buffer_rows=250, seed=1))
    assert all(len(y) == 32 for _, y in batches)
    seen = np.concatenate([y for _, y in batches])
    assert len(seen) == len(set(seen.tolist())) == (1000 // 32) * 32
    assert not np.array_equal(seen, np.sort(seen))  # actually shuffled


def test_shuffle_is_seeded():
    first = [y.tolist() for _, y in shuffled_batches(groups(5, 64), 16, 100, seed=7)]
    assert first == [y.tolist() for _, y in shuffled_batches(groups(5, 64), 16, 100, seed=7)]
    assert first != [y.tolist() for _, y in shuffled_batches(groups(5, 64), 16, 100, seed=8)]


def test_shuffle_mixes_across_row_groups():
    first_batch = next(shuffled_batches(groups(10, 100), 64, 300, seed=3))[1]
    assert len({int(v) // 100 for v in first_batch}) >= 3  # rows from several row groups


def test_prefetch_stops_at_the_limit_and_meters_waiting():
    def slow():
        for i in range(100):
            time.sleep(0.01)
            yield i

    meter = StallMeter()
    got = list(prefetched(slow(), depth=2, meter=meter, limit=5))
    assert got == [0, 1, 2, 3, 4]
    assert meter.batches == 5 and meter.wait_seconds >= 0.03


def test_prefetch_surfaces_producer_errors():
    def broken():
        yield 1
        raise ValueError("bad row group")

    with pytest.raises(ValueError, match="bad row group"):
        list(prefetched(broken(), depth=2, meter=StallMeter(), limit=10))


def test_prefetch_thread_exits_when_consumer_stops_early():
    before = threading.active_count()
    it = prefetched(iter(range(1000)), depth=2, meter=StallMeter(), limit=1000)
    next(it)
    it.close()
    time.sleep(0.2)
    assert threading.active_count() == before


# ---- real Petastorm readers over small Parquet splits written here --------------------------------

SPEC = TensorSpec("image", (1,), "int32")  # each row's tensor is its id, as is its label


def write_split(root: Path, files: list[list[int]]) -> str:
    """One Parquet file per list, one row group per size in it; rows are numbered 0.. in order."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    schema = pa.schema([("image", pa.binary()), ("label", pa.int32())])
    for f, sizes in enumerate(files):
        with pq.ParquetWriter(root / f"part-{f:05d}.parquet", schema) as writer:
            for n in sizes:
                ids = np.arange(start, start + n, dtype=np.int32)
                writer.write_table(pa.table({"image": [i.tobytes() for i in ids], "label": ids}, schema=schema))
                start += n
    return "file://" + str(root)


def labels_of(batches) -> np.ndarray:
    """Labels in order, checking that every tensor travelled with its label."""
    for x, y in batches:
        assert np.array_equal(x[:, 0], y)
    return np.concatenate([y for _, y in batches])


@pytest.fixture()
def split(tmp_path) -> str:
    """384 rows in 9 uneven row groups over 2 files."""
    url = write_split(tmp_path / "train", [[40, 56, 24, 72], [48, 8, 64, 32, 40]])
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in (tmp_path / "train").glob("*.parquet")) == 384
    return url


@pytest.mark.parametrize("pool,workers,batch", [("dummy", 1, 32), ("thread", 2, 32), ("dummy", 1, 40)])
def test_epochs_read_every_row_once_in_a_new_order_from_one_reader(split, monkeypatch, pool, workers, batch):
    constructed = []
    original = petastorm.reader.Reader.__init__

    def counting(self, *args, **kwargs):
        constructed.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(petastorm.reader.Reader, "__init__", counting)
    shard = ShardSpec(split, SPEC, "image", pool_type=pool, workers=workers)
    per_epoch = 384 // batch  # as the job computes steps per epoch: 12 x 32 = 384, 9 x 40 = 360
    batches = list(training_batches(shard, batch, 100, seed=5, epoch=0, steps=3 * per_epoch, depth=4,
                                    meter=StallMeter()))
    assert len(batches) == 3 * per_epoch and all(len(y) == batch for _, y in batches)
    assert len(constructed) == 1  # one reader for all three epochs
    epochs = labels_of(batches).reshape(3, per_epoch * batch)
    for seen in epochs:
        assert len(set(seen.tolist())) == per_epoch * batch  # no row twice in an epoch
        assert batch != 32 or sorted(seen.tolist()) == list(range(384))  # all of them when they fit
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
    # Seeded by (seed, epoch, rank) only: a run resumed at epoch 1 reads what epochs 1-2 were,
    # whatever the pool (a thread pool's results are put back in order).
    resumed = training_batches(shard, batch, 100, seed=5, epoch=1, steps=2 * per_epoch, depth=4, meter=StallMeter())
    assert np.array_equal(labels_of(list(resumed)), epochs[1:].ravel())
    other = training_batches(shard, batch, 100, seed=6, epoch=0, steps=per_epoch, depth=4, meter=StallMeter())
    assert not np.array_equal(labels_of(list(other)), epochs[0])


def test_two_ranks_read_disjoint_shards_that_cover_the_split(split):
    shards = [labels_of(list(read_row_groups(ShardSpec(split, SPEC, "image", rank, 2), None, False)))
              for rank in (0, 1)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert sorted(np.concatenate(shards).tolist()) == list(range(384))
    assert len(shards[0]) != len(shards[1])  # uneven, as whole row groups are
    # Each rank yields exactly the steps asked for (ranks would deadlock on uneven counts), only
    # from its own shard, each row at most once per pass.
    steps = 384 // (2 * 16)
    for rank, own in enumerate(shards):
        got = labels_of(list(training_batches(ShardSpec(split, SPEC, "image", rank, 2), 16, 64, 3, 0, steps, 4,
                                              StallMeter())))
        assert len(got) == steps * 16 and set(got.tolist()) <= set(own.tolist())
        first_pass = got[: len(own) - len(own) % 16]
        assert len(set(first_pass.tolist())) == len(first_pass)


def test_stored_order_whatever_the_pool(split):
    for pool, workers in (("dummy", 1), ("thread", 2)):
        shard = ShardSpec(split, SPEC, "image", pool_type=pool, workers=workers)
        assert labels_of(list(read_row_groups(shard, None, False))).tolist() == list(range(384))
        xs, ys = strided_rows(ShardSpec(split, SPEC, "image", 1, 3, pool, workers))
        assert ys.tolist() == list(range(1, 384, 3))


def test_a_split_of_more_files_than_a_worker_keeps_open(tmp_path):
    url = write_split(tmp_path / "many", [[3, 2]] * 20)  # 40 row groups in 20 files, read in a seeded order
    shard = ShardSpec(url, SPEC, "image", pool_type="thread", workers=2)
    got = labels_of(list(islice(read_row_groups(shard, 7, True), 80)))
    assert np.bincount(got).tolist() == [2] * 100  # two whole passes


def test_a_shard_smaller_than_a_batch_still_fills_every_batch(tmp_path):
    url = write_split(tmp_path / "tiny", [[5]])
    got = labels_of(list(training_batches(ShardSpec(url, SPEC, "image"), 8, 8, 1, 0, 5, 2, StallMeter())))
    assert len(got) == 40 and set(got.tolist()) == set(range(5))  # passes merged until a batch fills


def test_many_small_row_groups_are_each_read_once_in_a_seeded_order(tmp_path):
    # Their speed is benchmarks/training.py's loader_over_limit_small_row_groups, not a test's.
    url = write_split(tmp_path / "small", [[4] * 150, [4] * 150])
    got = labels_of(list(read_row_groups(ShardSpec(url, SPEC, "image"), 1, False)))
    assert sorted(got.tolist()) == list(range(1200)) and got.tolist() != list(range(1200))


def test_stopping_early_stops_the_reader(split):
    before = threading.active_count()
    it = training_batches(ShardSpec(split, SPEC, "image", pool_type="thread", workers=2), 16, 64, 1, 0, 1000, 2,
                          StallMeter())
    next(it)
    it.close()  # the prefetch thread closes the reader, whose worker threads then exit
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_pass_batches_drain_each_pass_and_drop_the_rest():
    passes = [(s, groups(3, 10)) for s in (1, 2, 3)]  # 30 rows a pass, batches of 8: 3 batches a pass
    got = np.concatenate([y for _, y in pass_batches(passes, 8, 16)]).reshape(3, 24)
    for seen in got:
        assert len(set(seen.tolist())) == 24  # each pass: no row twice
    assert len({tuple(p) for p in got}) == 3
