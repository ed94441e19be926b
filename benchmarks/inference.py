"""Batch inference throughput, side by side in one run (needs `make demo` first: the demo dataset,
the raw Fashion-MNIST folders and a champion in the registry):

- limit: in-process `model.predict(batch_size=1024)` over the same preprocessed rows (the test
  split, 10,000 rows), 2 intra-op threads: one process using both cores, no Spark;
- ours: the batch inference job (`inference.job.run_inference`) over the same dataset split, on
  local[2], rows/s of the whole job (resolve, ship, score, commit);
- peer: `mlflow.pyfunc.spark_udf` of the same registered model (a pyfunc over raw file bytes) over
  the same images' PNG files read with `binaryFile`;
- model loads per job (ours);
- scaling: the job over 10,000 and 40,000 raw PNG files (decode included): time(4x) / time(1x);
- incremental: 40,000 raw PNGs scored, then a no-op run and a run with 1 % new files, each
  timed as a whole job (list, decide from metadata, hash candidates, score, commit) vs the full run.

Usage: python benchmarks/inference.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
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
from inference.config import BatchInferenceConfig  # noqa: E402

MODEL_URI = "models:/fashion-mnist-classifier@champion"


def job(spark, out: Path, *overrides: str):
    from inference.job import run_inference

    cfg = load_config(BatchInferenceConfig, "batch_inference", [
        f"output.path={out}", "full_refresh=true", "force_unlock=true", *overrides])
    return run_inference(spark, cfg)


def incremental(spark, tmp: Path) -> tuple:
    """An hourly job over a folder that only grows: 40,000 raw PNGs scored once (full), then a
    run that finds nothing new (no-op), then one with 1 % new files (400). Same session, warm
    workers for all three; the folder holds hard links to the demo's files (same bytes)."""
    from inference.job import run_inference

    src = Path("data/raw/fashion-mnist/train")
    folder = tmp / "incoming"
    first = sorted(src.glob("*/[0-3][0-9]*.png"))
    extra = sorted(src.glob("*/4[0-9]*.png"))[:len(first) // 100]

    def link(files):
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(f, folder / f.parent.name / f.name)

    def run():
        cfg = load_config(BatchInferenceConfig, "batch_inference", [
            f"input.path={folder}", f"output.path={tmp / 'incremental'}"])
        return run_inference(spark, cfg)

    link(first)
    full = run()
    noop = run()
    link(extra)
    plus = run()
    assert (full.scored, noop.counts.hashed, plus.scored) == (len(first), 0, len(extra)), \
        (full.summary(), noop.summary(), plus.summary())
    return full, noop, plus


def in_process_predict(x: np.ndarray, repeats: int) -> float:
    import mlflow
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    model = mlflow.pyfunc.load_model(MODEL_URI).unwrap_python_model().keras_model
    model.predict(x[:1024], batch_size=1024, verbose=0)  # trace once
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(x, batch_size=1024, verbose=0)
        best = max(best, len(x) / (time.perf_counter() - started))
    return best


def mlflow_spark_udf(spark, rows) -> tuple[float, str]:
    """mlflow.pyfunc.spark_udf with its defaults over a `content` column of file bytes; if the
    default result type cannot hold the model's output, retry with its struct and say so."""
    import mlflow.pyfunc

    frame = rows.select("content")
    struct = "predicted_label string, probability double, reason string"
    for result_type, note in ((None, "defaults"), (struct, "result_type=struct (default crashed)")):
        try:
            kwargs = {} if result_type is None else {"result_type": result_type}
            udf = mlflow.pyfunc.spark_udf(spark, MODEL_URI, env_manager="local", **kwargs)
            rates = []
            for _ in range(2):  # cold, then warm (its workers keep the model)
                started = time.perf_counter()
                frame.select(udf("content").alias("p")).write.format("noop").mode("overwrite").save()
                rates.append(rows.count() / (time.perf_counter() - started))
            return rates[0], rates[1], note
        except Exception as exc:  # the known default result-type crash
            print(f"spark_udf with {note}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return float("nan"), float("nan"), "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from deepspark.datasets import open_dataset
    from deepspark.spark import SparkSettings, build_session
    from deepspark.tracking import TrackingSettings, ensure_experiment

    ensure_experiment(TrackingSettings())
    spark = build_session(SparkSettings(app_name="bench-inference"))
    figures = []
    try:
        dataset = open_dataset(spark, "data/datasets", "fashion-mnist")
        test = spark.read.parquet(dataset.split_url("test"))
        images = [r.image for r in test.select("image").collect()]
        x = dataset.record.plugin.decode(images, dataset.spec)
        limit = in_process_predict(x, 2 if args.quick else 3)
        with tempfile.TemporaryDirectory() as tmp:
            split = ("input.path=null", "input.dataset=fashion-mnist", "input.split=test")
            ours = job(spark, Path(tmp) / "ds", *split)  # cold: Python workers start, import TF, load the model
            ours_rate = ours.scored / ours.seconds
            warm = job(spark, Path(tmp) / "ds", *split)  # warm: the same job again in the same SparkContext
            warm_rate = warm.scored / warm.seconds

            from pipelines.inputs import read_files

            files = read_files(spark, "file://" + os.path.abspath("data/raw/fashion-mnist/test"), "*.png", 4096).cache()
            files.count()
            peer_rate, peer_warm, peer_note = mlflow_spark_udf(spark, files)
            raw = "input.path=data/raw/fashion-mnist/train"
            one = job(spark, Path(tmp) / "x1", raw, "input.glob=0[0-9]*.png")
            four = job(spark, Path(tmp) / "x4", raw, "input.glob=[0-3][0-9]*.png")
            assert (one.scored, four.scored) == (10_000, 40_000), (one.scored, four.scored)
            full, noop, plus = incremental(spark, Path(tmp))
    finally:
        spark.stop()

    print(f"\n{'batch inference, 10,000 Fashion-MNIST rows':<52}{'rows/s':>10}{'vs limit':>10}")
    print(f"{'in-process model.predict (limit)':<52}{limit:>10,.0f}{1:>10.2f}")
    print(f"{'ours, whole job, cold (fresh workers)':<52}{ours_rate:>10,.0f}{ours_rate / limit:>10.2f}")
    print(f"{'ours, whole job, warm (workers kept the model)':<52}{warm_rate:>10,.0f}{warm_rate / limit:>10.2f}")
    print(f"{'mlflow spark_udf cold, ' + peer_note:<52}{peer_rate:>10,.0f}{peer_rate / limit:>10.2f}")
    print(f"{'mlflow spark_udf warm':<52}{peer_warm:>10,.0f}{peer_warm / limit:>10.2f}")
    marginal = 30_000 / (four.seconds - one.seconds)
    print(f"ours / mlflow spark_udf: cold {ours_rate / peer_rate:.2f}, warm {warm_rate / peer_warm:.2f}; "
          f"model loads: cold job {ours.model_loads}, warm job {warm.model_loads}")
    print(f"marginal rate from raw PNGs (decode included), (40,000 - 10,000) / (t4 - t1): {marginal:,.0f} rows/s "
          f"= {marginal / limit:.2f} of the limit")
    print(f"raw PNG files, whole job: 10,000 in {one.seconds:.1f} s, 40,000 in {four.seconds:.1f} s: "
          f"time(4x)/time(1x) = {four.seconds / one.seconds:.2f}")
    print(f"\n{'incremental runs over 40,000 raw PNGs':<52}{'seconds':>10}{'vs full':>10}")
    for label, r in (("full: all 40,000 new", full), ("no-op: nothing new", noop), ("1 % new (400 files)", plus)):
        print(f"{label:<52}{r.seconds:>10.2f}{r.seconds / full.seconds:>10.3f}")
    print(f"no-op: listed {noop.counts.listed}, skipped by metadata {noop.counts.skipped}, hashed {noop.counts.hashed}; "
          f"1 %: hashed {plus.counts.hashed}, scored {plus.scored}")
    figures += [
        {"name": "inference_noop_over_full", "value": round(noop.seconds / full.seconds, 3), "goal": 0.15, "unit": "ratio"},
        {"name": "inference_1pct_new_over_full", "value": round(plus.seconds / full.seconds, 3), "goal": 0.25,
         "unit": "ratio"},
        {"name": "inference_noop_seconds_40k", "value": round(noop.seconds, 2), "goal": None, "unit": "s"},
        {"name": "inference_full_seconds_40k", "value": round(full.seconds, 2), "goal": None, "unit": "s"},

        {"name": "udf_over_in_process_predict", "value": round(ours_rate / limit, 3), "goal": 0.8, "unit": "ratio"},
        {"name": "udf_over_mlflow_spark_udf", "value": round(ours_rate / peer_rate, 3), "goal": 2.0, "unit": "ratio"},
        {"name": "udf_warm_over_in_process_predict", "value": round(warm_rate / limit, 3), "goal": 0.8, "unit": "ratio"},
        {"name": "udf_warm_over_mlflow_spark_udf_warm", "value": round(warm_rate / peer_warm, 3), "goal": 2.0, "unit": "ratio"},
        {"name": "udf_marginal_over_in_process_predict", "value": round(marginal / limit, 3), "goal": 0.8, "unit": "ratio"},
        {"name": "in_process_predict_rows_per_s", "value": round(limit), "goal": None, "unit": "rows/s"},
        {"name": "batch_inference_rows_per_s", "value": round(ours_rate), "goal": None, "unit": "rows/s"},
        {"name": "mlflow_spark_udf_rows_per_s", "value": round(peer_rate), "goal": None, "unit": "rows/s"},
        {"name": "model_loads_per_job", "value": ours.model_loads, "goal": None, "unit": "loads"},
        {"name": "inference_time_4x_over_1x", "value": round(four.seconds / one.seconds, 3), "goal": 4.4, "unit": "ratio"},
    ]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
