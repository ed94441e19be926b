"""ETL images/s against its limit, side by side in one run.

- etl:   `pipelines.etl.run_etl` (modality=image) on a real local[2] SparkSession (warm: one session for all runs).
- limit: the same decode + validate + resize + encode + hash (pipelines.images.transforms) in a
         multiprocessing pool over the same 2 cores, reading files with open() and writing Parquet
         with pyarrow: no Spark, no JVM.
- scaling: ETL time at 4x the files over time at 1x.
- storage: raw uint8 vs PNG-in-Parquet, read back with Petastorm's make_batch_reader and decoded
           into (N, H, W, C) batches (the training loader's path), plus bytes on disk.

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
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

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


def run_limit(root: Path, rules: ImageRules, spec: TensorSpec, out: Path) -> float:
    started = time.perf_counter()
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    chunks = [paths[i : i + 2048] for i in range(0, len(paths), 2048)]
    out.mkdir(parents=True, exist_ok=True)
    with get_context("fork").Pool(CORES) as pool:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (about 3 minutes)")
    parser.add_argument("--json", type=Path, help="write figures as JSON")
    args = parser.parse_args()
    n_small = 5_000 if args.quick else 15_000
    n_photo = 1_000 if args.quick else 3_000

    from deepspark.spark import SparkSettings, build_session

    spark = build_session(SparkSettings(app_name="bench-etl", conf={"spark.sql.shuffle.partitions": "4"}))
    work = Path(tempfile.mkdtemp(prefix="bench-etl-"))
    figures, rows = [], []
    try:
        warm = work / "warm"
        make_folder(warm, 200, "png", 28)
        run_etl(spark, warm, work / "warm-out", 28, 1)  # JIT and Python workers, once

        scenarios = [("png-28px", "png", 28, 28, 1, n_small), ("jpeg-28px", "jpeg", 28, 28, 1, n_small),
                     ("jpeg-256px->96x96x3", "jpeg", 256, 96, 3, n_photo)]
        for name, fmt, side, target, channels, n in scenarios:
            root = work / name
            make_folder(root, n, fmt, side)
            rules, spec = ImageRules(target, target, channels), TensorSpec("image", (target, target, channels), "uint8")
            limit_s = run_limit(root, rules, spec, work / f"{name}-limit")
            etl_s, _ = run_etl(spark, root, work / f"{name}-out", target, channels)
            ratio = limit_s / etl_s
            rows.append((name, n, n / etl_s, n / limit_s, ratio))
            figures.append({"name": f"etl_vs_limit_{name}", "value": round(ratio, 3), "goal": 0.8, "unit": "ratio"})
            figures.append({"name": f"etl_images_per_s_{name}", "value": round(n / etl_s), "goal": None, "unit": "images/s"})

        # scaling: 4x the files of the first scenario
        big = work / "png-28px-4x"
        make_folder(big, 4 * n_small, "png", 28)
        t1, _ = run_etl(spark, work / "png-28px", work / "scale-1x", 28, 1)
        t4, _ = run_etl(spark, big, work / "scale-4x", 28, 1)
        figures.append({"name": "etl_time_4x_over_1x", "value": round(t4 / t1, 3), "goal": 4.4, "unit": "ratio"})

        # storage: raw vs png in the dataset, read back by the loader path
        storage = []
        for encoding in ("raw", "png"):
            _, result = run_etl(spark, big, work / f"enc-{encoding}", 28, 1, encoding)
            rate = loader_rate(result.url, TensorSpec("image", (28, 28, 1), "uint8", encoding))
            storage.append((encoding, rate, disk_bytes(result.url) / result.rows_written))
            figures.append({"name": f"loader_samples_per_s_{encoding}", "value": round(rate), "goal": None, "unit": "samples/s"})
            figures.append({"name": f"bytes_per_row_{encoding}", "value": round(storage[-1][2], 1), "goal": None, "unit": "bytes"})
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'scenario':<22}{'files':>8}{'ETL img/s':>12}{'limit img/s':>13}{'ETL/limit':>11}")
    for name, n, etl_rate, limit_rate, ratio in rows:
        print(f"{name:<22}{n:>8}{etl_rate:>12,.0f}{limit_rate:>13,.0f}{ratio:>11.2f}")
    print(f"\nETL time at 4x files / 1x ({n_small} -> {4 * n_small} PNGs): {t4 / t1:.2f} (goal <= 4.4)")
    print(f"\n{'storage':<10}{'loader samples/s':>18}{'bytes/row on disk':>19}")
    for encoding, rate, per_row in storage:
        print(f"{encoding:<10}{rate:>18,.0f}{per_row:>19.1f}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
