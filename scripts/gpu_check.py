"""GPU smoke check for a cluster that has GPUs: on every GPU Spark assigns, one training step and
one inference batch, placed on that GPU the way DeepSpark's ranks and UDFs place theirs.

    spark-submit --master spark://<master>:7077 \\
        --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \\
        --conf spark.executor.resource.gpu.discoveryScript=/opt/deepspark/conf/gpu/discover_gpus.sh \\
        [--py-files dist/deepspark.zip] scripts/gpu_check.py [--tasks N] [--json PATH]

(the executors import DeepSpark's placement code: installed on the hosts, or shipped as --py-files).

It prints one line per task (host, the address Spark assigned, TensorFlow's GPUs, where the step
and the batch ran, whether Horovod has NCCL) and exits 0 when every task trained and predicted on
its GPU, 1 naming what is missing (`--json` also writes the reports and the problems). Install
with `scripts/setup.sh --gpu` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("gpu_check")


def check_on_assigned_gpu(_: Any) -> Iterator[dict[str, Any]]:
    """In a Spark task: train one step and predict one batch on the task's GPU."""
    import socket

    import numpy as np

    from inference.model import gpu_device, task_gpu

    assigned = task_gpu()
    report: dict[str, Any] = {"host": socket.gethostname(), "assigned": assigned}
    try:
        import horovod.tensorflow as hvd

        report["horovod_nccl"] = bool(hvd.nccl_built())
    except Exception as exc:  # reported, not fatal: training on one GPU needs no Horovod
        report["horovod_nccl"] = f"{type(exc).__name__}: {exc}"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    report.update(tensorflow=tf.__version__, cuda_build=tf.test.is_built_with_cuda(),
                  tensorflow_gpus=[g.name for g in gpus])
    if not gpus:
        yield report
        return
    device = gpu_device([g.name for g in gpus], assigned)
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    y = np.arange(64) % 10
    with tf.device(device):
        model = tf.keras.Sequential([tf.keras.Input((28, 28, 1)), tf.keras.layers.Conv2D(16, 3, activation="relu"),
                                     tf.keras.layers.GlobalAveragePooling2D(), tf.keras.layers.Dense(10)])
        model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        report["train_loss"] = float(model.train_on_batch(x, y))
        predicted = model(x, training=False)
    report.update(weights_on=model.trainable_variables[0].device, predicted_on=predicted.device,
                  predicted_shape=list(predicted.shape))
    yield report


def problems(reports: list[dict[str, Any]]) -> list[str]:
    """What keeps each task from using its GPU (empty when every one did)."""
    found = []
    for r in reports:
        where = f"{r['host']} (Spark's GPU {r['assigned']})"
        if r["assigned"] is None:
            found.append(f"{r['host']}: Spark assigned no GPU (set spark.task.resource.gpu.amount and the "
                         "executors' discovery script, or use --profile gpu)")
        if not r["tensorflow_gpus"]:
            build = "a CUDA build" if r["cuda_build"] else "the CPU build (run scripts/setup.sh --gpu)"
            found.append(f"{where}: TensorFlow {r['tensorflow']} sees no GPU; it is {build}")
            continue
        for key in ("weights_on", "predicted_on"):
            if "GPU" not in str(r.get(key)):
                found.append(f"{where}: {key.replace('_', ' ')} {r.get(key)}, not a GPU")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=None, help="tasks (GPUs) to check; default: the executors' cores")
    parser.add_argument("--json", type=Path, default=None, help="write {reports, problems} here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("deepspark-gpu-check").getOrCreate()
    try:
        tasks = args.tasks or spark.sparkContext.defaultParallelism
        reports = spark.sparkContext.parallelize(range(tasks), tasks).mapPartitions(check_on_assigned_gpu).collect()
    finally:
        spark.stop()
    for report in reports:
        log.info("GPU check %s", json.dumps(report, sort_keys=True))
    found = problems(reports)
    for problem in found:
        log.error("%s", problem)
    if args.json:
        args.json.write_text(json.dumps({"reports": reports, "problems": found}, indent=2))
    if not found:
        log.info("every task trained and predicted on its GPU (%d tasks)", len(reports))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
