"""Training benchmarks, each measured side by side in one run on the demo dataset:

(a) loader: training/data.py (Petastorm make_batch_reader -> raw decode -> shuffle buffer -> batches)
    against its limit (pyarrow reads the same row groups and builds the same batches in one
    process, no Petastorm) and against Petastorm's usual recipe with default settings
    (make_batch_reader defaults -> make_petastorm_dataset -> tf decode_raw -> unbatch/shuffle/batch).
(b) Horovod scaling: samples/s of the real training job with 2 ranks against 2 x 1 rank, same
    per-rank batch, one intra-op thread per rank (per-epoch samples/s logged by rank 0; the first
    epoch, which traces the graph, is left out).
(c) allreduce: hvd.allreduce of 4, 16, 64 MB float32 across 2 gloo ranks: bus bandwidth against a
    memcpy of the same size in one process.
(d) input stall share of the demo model (2 ranks), from the same runs as (b).

Usage: python benchmarks/training.py [--quick] [--json PATH]   (needs the demo dataset: make demo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from deepspark.config import load_config  # noqa: E402
from deepspark.datasets import DatasetRef, open_dataset  # noqa: E402
from deepspark.modality import decode_raw_arrow  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import ShardSpec, StallMeter, training_batches  # noqa: E402

BATCH = 64


def loader_ours(dataset: DatasetRef, batches: int) -> float:
    shard = ShardSpec(dataset.split_url("train"), dataset.spec, dataset.record.modality)
    started = time.perf_counter()
    n = sum(len(y) for _, y in training_batches(shard, BATCH, 10_000, 1, 0, batches, 8, StallMeter()))
    return n / (time.perf_counter() - started)


def loader_limit(dataset: DatasetRef, batches: int) -> float:
    """pyarrow only: read row groups, decode straight from the Arrow buffer, shuffle buffer,
    batches: the same work, no Petastorm, no Python object per row."""
    import pyarrow.parquet as pq

    from training.data import shuffled_batches

    root = Path(dataset.split_url("train").replace("file://", ""))
    files = sorted(root.glob("*.parquet"))

    def groups():
        while True:
            for f in files:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    t = pf.read_row_group(i, columns=["image", "label"])
                    yield decode_raw_arrow(t.column("image"), dataset.spec), t.column("label").to_numpy()

    started, n = time.perf_counter(), 0
    for count, (_, y) in enumerate(shuffled_batches(groups(), BATCH, 10_000, 1)):
        if count >= batches:
            break
        n += len(y)
    return n / (time.perf_counter() - started)


def loader_petastorm_default(dataset: DatasetRef, batches: int) -> float:
    import tensorflow as tf
    from petastorm import make_batch_reader
    from petastorm.tf_utils import make_petastorm_dataset

    shape = dataset.spec.shape
    started, n = time.perf_counter(), 0  # reader construction counts, as it does for ours and the limit
    with make_batch_reader(dataset.split_url("train"), schema_fields=["image", "label"], num_epochs=None) as reader:
        ds = (make_petastorm_dataset(reader)
              .map(lambda b: (tf.reshape(tf.io.decode_raw(b.image, tf.uint8), (-1, *shape)), b.label))
              .unbatch().shuffle(10_000, seed=1).batch(BATCH, drop_remainder=True).take(batches))
        for _, y in ds:
            n += int(y.shape[0])
        return n / (time.perf_counter() - started)


def train_rates(spark, ranks: int, steps: int, epochs: int, tmp: Path, *extra: str) -> tuple[float, float]:
    """Median samples/s and input-stall share over epochs 2..n of the real training job."""
    from mlflow.tracking import MlflowClient

    from training.job import run_job

    cfg = load_config(TrainConfig, "train", [
        f"horovod.num_proc={ranks}", f"epochs={epochs}", f"steps_per_epoch={steps}", "registry.enabled=false",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}",
        "tracking.experiment=bench-training", "max_eval_rows=1000", f"optimizer.batch_size={BATCH}", *extra,
    ])
    result = run_job(spark, cfg)
    client = MlflowClient()
    rates = [m.value for m in sorted(client.get_metric_history(result.run_id, "samples_per_s"), key=lambda m: m.step)][1:]
    stalls = [m.value for m in sorted(client.get_metric_history(result.run_id, "input_stall_share"), key=lambda m: m.step)][1:]
    return statistics.median(rates), statistics.median(stalls)


class AllreduceProbe:
    """Runs on each rank: time hvd.allreduce of float32 tensors of the given sizes."""

    def __init__(self, sizes_mb: list[int], repeats: int) -> None:
        self.sizes_mb, self.repeats = sizes_mb, repeats

    def __call__(self) -> dict[int, float]:
        import horovod.tensorflow as hvd
        import tensorflow as tf

        hvd.init()
        out = {}
        for mb in self.sizes_mb:
            tensor = tf.ones((mb * 1024 * 1024 // 4,), tf.float32)
            hvd.allreduce(tensor, op=hvd.Sum, name=f"warm{mb}")
            times = []
            for r in range(self.repeats):
                started = time.perf_counter()
                hvd.allreduce(tensor, op=hvd.Sum, name=f"t{mb}_{r}").numpy()
                times.append(time.perf_counter() - started)
            out[mb] = statistics.median(times)
        return out


def memcpy_seconds(mb: int, repeats: int) -> float:
    src = np.ones(mb * 1024 * 1024 // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loader_batches = 4000  # ~4.7 epochs of the demo train split: long enough that start-up does not dominate
    steps, epochs = (60, 3) if args.quick else (150, 4)

    from deepspark.spark import SparkSettings, build_session
    from training.distributed import run_ranks

    spark = build_session(SparkSettings(app_name="bench-training"))
    figures = []
    try:
        dataset = open_dataset(spark, "data/datasets", "fashion-mnist")
        limit = loader_limit(dataset, loader_batches)
        ours = loader_ours(dataset, loader_batches)
        peer = loader_petastorm_default(dataset, loader_batches)
        with tempfile.TemporaryDirectory() as tmp:
            one, _ = train_rates(spark, 1, steps, epochs, Path(tmp))
            two, stall = train_rates(spark, 2, steps, epochs, Path(tmp))
            two_fp16, _ = train_rates(spark, 2, steps, epochs, Path(tmp), "horovod.compression=fp16")
        sizes = [4, 16, 64]
        reduce_s = run_ranks(AllreduceProbe(sizes, 3 if args.quick else 7), 2, 120, ["lo"])[0]
    finally:
        spark.stop()

    efficiency = two / (2 * one)
    print(f"\n(a) loader, batch {BATCH}, samples/s")
    print(f"  limit (pyarrow, same batches)   {limit:>12,.0f}")
    print(f"  ours (training/data.py)         {ours:>12,.0f}   {ours / limit:.2f} of limit")
    print(f"  petastorm default recipe        {peer:>12,.0f}   {peer / limit:.2f} of limit; ours is {ours / peer:.1f}x")
    print(f"\n(b) training samples/s, batch {BATCH} per rank, 1 intra-op thread per rank")
    print(f"  1 rank {one:,.0f}; 2 ranks {two:,.0f}; efficiency 2 / (2 x 1) = {efficiency:.2f}")
    print(f"  2 ranks with fp16 gradient compression {two_fp16:,.0f}; efficiency {two_fp16 / (2 * one):.2f}")
    print("\n(c) allreduce across 2 gloo ranks vs memcpy (one process)")
    for mb in sizes:
        bus = mb / 1024 / reduce_s[mb]  # GB/s; for 2 ranks the bus factor 2(n-1)/n is 1
        copy = mb / 1024 / memcpy_seconds(mb, 7)
        print(f"  {mb:>3} MB: allreduce {reduce_s[mb] * 1e3:7.1f} ms = {bus:5.2f} GB/s bus; memcpy {copy:6.2f} GB/s; ratio {bus / copy:.3f}")
        figures.append({"name": f"allreduce_bus_over_memcpy_{mb}mb", "value": round(bus / copy, 4), "goal": None, "unit": "ratio"})
        figures.append({"name": f"allreduce_bus_gbps_{mb}mb", "value": round(bus, 3), "goal": None, "unit": "GB/s"})
    print(f"\n(d) input stall share, demo model, 2 ranks: {stall:.3f} (goal <= 0.05)")
    figures += [
        {"name": "loader_over_limit", "value": round(ours / limit, 3), "goal": 0.9, "unit": "ratio"},
        {"name": "loader_over_petastorm_default", "value": round(ours / peer, 2), "goal": None, "unit": "ratio"},
        {"name": "loader_samples_per_s", "value": round(ours), "goal": None, "unit": "samples/s"},
        {"name": "train_samples_per_s_1_rank", "value": round(one), "goal": None, "unit": "samples/s"},
        {"name": "train_samples_per_s_2_ranks", "value": round(two), "goal": None, "unit": "samples/s"},
        {"name": "horovod_scaling_efficiency", "value": round(efficiency, 3), "goal": 0.85, "unit": "ratio"},
        {"name": "horovod_scaling_efficiency_fp16", "value": round(two_fp16 / (2 * one), 3), "goal": 0.85, "unit": "ratio"},
        {"name": "input_stall_share", "value": round(stall, 4), "goal": 0.05, "unit": "share"},
    ]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
