"""ETL images/s against its limit, side by side in one run, fixed cost and marginal rate apart.

- etl:   `pipelines.etl.run_etl` (modality=image) on a real local[2] SparkSession, warm (one session,
         warmed on a small folder first, as a scheduled job's executors would be);
- limit: exactly the ETL's per-image work (read the file, decode + validate + resize, encode, hash,
         Parquet out), each of several ways: pools of 2 processes (local[2]'s task slots) and of one
         process per core this machine has (Spark's JVM works beside its Python workers), each
         with chunks of 512 and 2,048 files; all warmed on the same small folder; the best way
         (the fastest at 4x) is the limit;
- each scenario runs at 1x and 4x files, ours and the limit's ways alternating, in 2 rounds (the
  best of each kept); the marginal rate is (n4 - n1) / (t4 - t1) for each, and the fixed cost
  t1 - n1 / marginal rate;
- the demo: the whole job on the 70,000-image Fashion-MNIST folder against the limit's whole run;
- storage (full run only): raw uint8 vs PNG-in-Parquet, read back the training loader's way.

Usage: python benchmarks/etl_images.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from benchmarks._shared import local_files  # noqa: E402
from deepspark.config import load_config  # noqa: E402
from deepspark.modality import TensorSpec, content_hash  # noqa: E402
from pipelines.config import EtlConfig  # noqa: E402
from pipelines.images.demo_data import CLASS_NAMES, folder_name, load_split  # noqa: E402
from pipelines.images.modality import IMAGE  # noqa: E402
from pipelines.images.transforms import ImageRules, decode_image  # noqa: E402

CORES = 2


def make_folder(root: Path, n: int, fmt: str, side: int) -> None:
    """n Fashion-MNIST images as <class>/<i>.<fmt>, upscaled to side x side RGB when side > 28."""
    import cv2

    images, labels = load_split("train")
    for name in CLASS_NAMES:
        (root / folder_name(name)).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".png" if fmt == "png" else ".jpg"
    for i in range(n):
        img = images[i % len(images)]
        if side != 28:
            img = cv2.resize(img, (side, side), interpolation=cv2.INTER_LINEAR)
            img = np.dstack([img, np.roll(img, 3, axis=0), rng.integers(0, 40, img.shape, dtype=np.uint8)])
        ok, data = cv2.imencode(ext, img)
        assert ok
        (root / folder_name(CLASS_NAMES[labels[i % len(labels)]]) / f"{i:06d}{ext}").write_bytes(data.tobytes())


def _limit_chunk(args: tuple[list[str], ImageRules, TensorSpec, str]) -> int:
    """One pool task: read, decode + validate + resize, encode, hash, Parquet out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, rules, spec, out = args
    images, hashes = [], []
    for path in paths:
        with open(path, "rb") as fh:
            data = fh.read()
        images.append(IMAGE.encode(decode_image(data, rules), spec))
        hashes.append(content_hash(data))
    pq.write_table(pa.table({"image": images, "path": paths, "content_hash": hashes}), out)
    return len(paths)


@dataclass(frozen=True)
class LimitWay:
    """One way to do the limit's work: a pool of warm processes and the files per pool task."""

    pool: Any
    processes: int
    chunk: int

    @property
    def name(self) -> str:
        return f"{self.processes} processes, chunks of {self.chunk}"


def run_limit(way: LimitWay, root: Path, rules: ImageRules, spec: TensorSpec, out: Path) -> float:
    """The limit's whole run: list, then the pool's warm processes read, process and write Parquet."""
    started = time.perf_counter()
    paths = local_files(root)
    pool = way.pool
    n_chunks = max(way.processes, -(-len(paths) // way.chunk))  # every process busy, chunks of at most `chunk`
    chunks = [paths[i::n_chunks] for i in range(n_chunks)]
    out.mkdir(parents=True, exist_ok=True)
    done = sum(pool.map(_limit_chunk, [(c, rules, spec, str(out / f"{i}.parquet")) for i, c in enumerate(chunks)]))
    assert done == len(paths)
    return time.perf_counter() - started


def run_etl(spark, root: Path, out: Path, height: int, channels: int, encoding: str = "raw"):
    from pipelines.etl import run_etl as etl

    cfg = load_config(EtlConfig, "etl", [
        f"input.path={root}", f"output.root={out}", "output.name=bench", "tracking.enabled=false",
        f"image.height={height}", f"image.width={height}", f"image.channels={channels}", f"image.encoding={encoding}",
    ])
    started = time.perf_counter()
    result = etl(spark, cfg)
    assert result.inputs_in == result.rows_written, result.summary()
    return time.perf_counter() - started, result


def loader_rate(url: str, spec: TensorSpec, repeats: int = 2) -> float:
    """Samples/s of make_batch_reader + decode of the train split into (N, H, W, C) batches."""
    from petastorm import make_batch_reader

    best = 0.0
    for _ in range(repeats):
        started, n = time.perf_counter(), 0
        with make_batch_reader(f"{url}/data/train", num_epochs=1, reader_pool_type="thread", workers_count=2,
                               schema_fields=["image", "label"]) as reader:
            for batch in reader:
                pixels = IMAGE.decode(list(batch.image), spec)
                n += len(pixels)
        best = max(best, n / (time.perf_counter() - started))
    return best


def disk_bytes(url: str) -> int:
    root = Path(url.replace("file:", "", 1)) / "data"
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def marginal(n1: int, t1: float, n4: int, t4: float) -> tuple[float, float]:
    """(marginal inputs/s, fixed seconds) from a run at n1 and one at n4 inputs."""
    rate = (n4 - n1) / (t4 - t1) if t4 > t1 else float("inf")
    return rate, t1 - n1 / rate


def demo_folder(work: Path) -> Path:
    """The 70,000-image demo folder (`make demo`'s, or written here from the Debian package)."""
    from pipelines.images.demo_data import write_raw_folder

    shipped = Path(__file__).resolve().parent.parent / "data" / "raw" / "fashion-mnist"
    if (shipped / "_COMPLETE").exists():
        return shipped
    write_raw_folder(work / "demo")
    return work / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (about 4 minutes)")
    parser.add_argument("--json", type=Path, help="write figures as JSON")
    args = parser.parse_args()
    n_small = 5_000 if args.quick else 15_000
    n_photo = 1_000 if args.quick else 2_000

    from deepspark.spark import SparkSettings, build_session

    spark = build_session(SparkSettings(app_name="bench-etl", conf={"spark.sql.shuffle.partitions": "4",
                                                                     "spark.ui.enabled": "false"}))
    sizes = sorted({CORES, len(os.sched_getaffinity(0))})  # local[2]'s slots, and every core of this machine
    pools = {n: get_context("spawn").Pool(n) for n in sizes}
    ways = [LimitWay(pools[n], n, chunk) for n in sizes for chunk in (512, 2048)]
    work = Path(tempfile.mkdtemp(prefix="bench-etl-"))
    figures, rows, storage = [], [], []
    limit_ways: dict[str, str] = {}
    try:
        warm = work / "warm"
        make_folder(warm, 400, "png", 28)
        warm_rules = ImageRules(28, 28, 1)
        run_etl(spark, warm, work / "warm-out", 28, 1)  # JIT and Python workers, once
        for way in ways:
            run_limit(way, warm, warm_rules, TensorSpec("image", (28, 28, 1), "uint8"), work / "warm-limit")

        scenarios = [("png-28px", "png", 28, 28, 1, n_small), ("jpeg-256px", "jpeg", 256, 96, 3, n_photo)]
        for name, fmt, side, target, channels, n in scenarios:
            rules, spec = ImageRules(target, target, channels), TensorSpec("image", (target, target, channels), "uint8")
            times: dict[tuple[str, int], float] = {}
            for scale in (1, 4):
                root = work / f"{name}-{scale}x"
                make_folder(root, scale * n, fmt, side)
                # All are called within this iteration, so the loop variables they read are current.
                runs = [("ours", lambda: run_etl(spark, root, work / f"{name}-{scale}x-out", target, channels)[0]),  # noqa: B023
                        *((way.name, lambda way=way: run_limit(way, root, rules, spec, work / f"{name}-{scale}x-limit"))  # noqa: B023
                          for way in ways)]
                for round_ in range(2):  # alternate who goes first; the best of each kept
                    for who, run in (runs if (scale + round_) % 2 else runs[::-1]):
                        times[who, scale] = min(times.get((who, scale), float("inf")), run())
            best = min((way.name for way in ways), key=lambda w: times[w, 4])
            limit_ways[name] = best
            times["limit", 1], times["limit", 4] = times[best, 1], times[best, 4]
            ours_rate, ours_fixed = marginal(n, times["ours", 1], 4 * n, times["ours", 4])
            limit_rate, limit_fixed = marginal(n, times["limit", 1], 4 * n, times["limit", 4])
            ratio = ours_rate / limit_rate
            rows.append((name, n, 4 * n, ours_rate, limit_rate, ratio, ours_fixed, limit_fixed,
                         times["limit", 4] / times["ours", 4]))
            figures += [
                {"name": f"etl_marginal_over_limit_{name}", "value": round(ratio, 3), "goal": 0.8, "unit": "ratio"},
                {"name": f"etl_marginal_images_per_s_{name}", "value": round(ours_rate), "goal": None, "unit": "images/s"},
                {"name": f"etl_limit_marginal_images_per_s_{name}", "value": round(limit_rate), "goal": None,
                 "unit": "images/s"},
                {"name": f"etl_fixed_seconds_{name}", "value": round(ours_fixed, 2), "goal": None, "unit": "s"},
                {"name": f"etl_limit_fixed_seconds_{name}", "value": round(limit_fixed, 2), "goal": None, "unit": "s"},
                {"name": f"etl_whole_over_limit_{name}_4x", "value": round(times["limit", 4] / times["ours", 4], 3),
                 "goal": None, "unit": "ratio"},
            ]

        demo = demo_folder(work)
        rules, spec = ImageRules(28, 28, 1), TensorSpec("image", (28, 28, 1), "uint8")
        demo_way = next(way for way in ways if way.name == limit_ways["png-28px"])
        # Two alternating rounds (limit, ours, ours, limit), the best of each: the first reader of
        # the 70,000 new files pays the page cache's misses, whichever side it is.
        limit_demo, ours_demo = float("inf"), float("inf")
        for round_, order in enumerate((("limit", "ours"), ("ours", "limit"))):
            for who in order:
                if who == "limit":
                    limit_demo = min(limit_demo, run_limit(demo_way, demo, rules, spec, work / f"demo-limit-{round_}"))
                else:
                    seconds, result = run_etl(spark, demo, work / f"demo-out-{round_}", 28, 1)
                    ours_demo = min(ours_demo, seconds)
        figures += [
            {"name": "etl_whole_over_limit_demo", "value": round(limit_demo / ours_demo, 3), "goal": 0.4, "unit": "ratio"},
            {"name": "etl_demo_seconds", "value": round(ours_demo, 2), "goal": None, "unit": "s"},
            {"name": "etl_limit_demo_seconds", "value": round(limit_demo, 2), "goal": None, "unit": "s"},
        ]

        if not args.quick:  # storage: raw vs png in the dataset, read back by the loader path
            big = work / "png-28px-4x"
            for encoding in ("raw", "png"):
                _, result = run_etl(spark, big, work / f"enc-{encoding}", 28, 1, encoding)
                rate = loader_rate(result.url, TensorSpec("image", (28, 28, 1), "uint8", encoding))
                storage.append((encoding, rate, disk_bytes(result.url) / result.rows_written))
                figures.append({"name": f"loader_samples_per_s_{encoding}", "value": round(rate), "goal": None,
                                "unit": "samples/s"})
                figures.append({"name": f"bytes_per_row_{encoding}", "value": round(storage[-1][2], 1), "goal": None,
                                "unit": "bytes"})
    finally:
        for pool in pools.values():
            pool.terminate()
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'scenario':<12}{'files 1x/4x':>14}{'marginal img/s ours':>21}{'limit':>9}{'ratio':>7}"
          f"{'fixed s ours':>14}{'limit':>7}{'whole 4x ratio':>16}")
    for name, n1, n4, ours, limit, ratio, fo, fl, whole in rows:
        print(f"{name:<12}{f'{n1}/{n4}':>14}{ours:>21,.0f}{limit:>9,.0f}{ratio:>7.2f}{fo:>14.2f}{fl:>7.2f}{whole:>16.2f}")
    print("limit: the best way per scenario: " + "; ".join(f"{k}: {v}" for k, v in limit_ways.items()))
    print(f"\ndemo, 70,000 PNGs, whole job: ours {ours_demo:.2f} s, limit {limit_demo:.2f} s, "
          f"limit/ours {limit_demo / ours_demo:.2f} (goal >= 0.4)")
    if storage:
        print(f"\n{'storage':<10}{'loader samples/s':>18}{'bytes/row on disk':>19}")
        for encoding, rate, per_row in storage:
            print(f"{encoding:<10}{rate:>18,.0f}{per_row:>19.1f}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
