"""The capacity planner against measured epochs: is its prediction of an epoch's training steps
within 15 % of what a real run takes, for each configuration this machine can run?

Set-up (not timed): the real ETL over 2,000 train and 2,000 test Fashion-MNIST images. Then, with
the real training job (the convnet, 64 rows per rank and step, 2 epochs of `--steps` steps; the
second epoch's breakdown is read):
- 1 rank; 2 ranks; 2 ranks with `horovod.backward_passes_per_step=2`;
- one allreduce probe on 2 ranks (latency and bandwidth of the link).
Each configuration is predicted from another one's measured compute and input wait (2 ranks from
the 1-rank run, 1 rank from the 2-rank run), plus the probe's link, so no prediction sees its own
measurement. The peer is what a user would assume without a planner: linear scaling (each
rank's step as fast as one rank's, no communication).

Multi-host configurations (the network-namespace cluster of `tests/test_multihost.py`) are not
run here yet.

Usage: python benchmarks/planner.py [--quick] [--json PATH]
  --quick: 20 steps per epoch (default 40).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIGS = {  # name: (ranks, backward passes per step)
    "1 rank": (1, 1),
    "2 ranks": (2, 1),
    "2 ranks, backward_passes_per_step=2": (2, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 steps per epoch instead of 40")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps = 20 if args.quick else 40

    from deepspark import builders
    from deepspark.config import load_config
    from deepspark.spark import SparkSettings, build_session
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl
    from pipelines.images.demo_data import write_raw_folder
    from training import capacity
    from training.job import plan as plan_training
    from training.job import run_job as train
    from training.planner import Measured, PlanConfig, gradient_bytes, probe

    spark = build_session(SparkSettings(app_name="bench-planner", conf={"spark.ui.enabled": "false"}))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}"]
        write_raw_folder(tmp / "raw", limit=2000)
        run_etl(spark, load_config(EtlConfig, "etl", [f"input.path={tmp / 'raw'}", f"output.root={tmp / 'datasets'}",
                                                      "output.name=fashion-bench", "tracking.enabled=false"]))
        base = [f"data.root={tmp / 'datasets'}", "data.name=fashion-bench", *store, "epochs=2",
                f"steps_per_epoch={steps}", "optimizer.batch_size=64", "max_eval_rows=200", "registry.enabled=false"]
        measured = {}
        for label, (ranks, passes) in CONFIGS.items():
            cfg = load_config(PlanConfig, "plan", [*base, f"horovod.num_proc={ranks}",
                                                   f"horovod.backward_passes_per_step={passes}"])
            measured[label] = Measured.of_run(train(spark, cfg).run_id)  # type: ignore[arg-type]
        cfg = load_config(PlanConfig, "plan", [*base, "horovod.num_proc=2"])
        planned = plan_training(spark, cfg)
        grad_bytes = gradient_bytes(builders.build(planned.builder, planned.dataset.record, {}), "none")
        link = probe(cfg, planned.engine, 2)
        spark.stop()

    rows = []
    for label, (ranks, passes) in CONFIGS.items():
        source = measured["2 ranks"] if ranks == 1 else measured["1 rank"]  # never its own measurement
        comm = capacity.ring_allreduce_s(ranks, grad_bytes, link)
        predicted = steps * capacity.step_s(source.compute_s, source.input_wait_s, comm, 0.0, passes)
        naive = steps * (source.compute_s + source.input_wait_s)
        actual = measured[label].trained_s
        rows.append((label, source, actual, predicted, naive, comm))
    print(f"\nlink (allreduce probe, 2 ranks): latency {link.latency_s * 1e6:.0f} us, {link.bytes_per_s / 1e9:.2f} GB/s; "
          f"gradients {grad_bytes / 2**20:.2f} MB")
    print(f"{'configuration':<40}{'predicted from':>16}{'measured s':>12}{'planner s':>11}{'error':>8}"
          f"{'linear s':>10}{'error':>8}")
    errors, naive_errors = [], []
    for label, source, actual, predicted, naive, _ in rows:
        error, naive_error = abs(predicted - actual) / actual, abs(naive - actual) / actual
        errors.append(error)
        naive_errors.append(naive_error)
        print(f"{label:<40}{f'{source.ranks} rank(s)':>16}{actual:>12.2f}{predicted:>11.2f}{error:>8.2f}"
              f"{naive:>10.2f}{naive_error:>8.2f}")
    print("measured per step (compute, input wait, negotiation + allreduce), ms:")
    for label, m in measured.items():
        print(f"  {label:<38}{m.compute_s * 1000:>8.1f}{m.input_wait_s * 1000:>8.1f}{m.communication_s * 1000:>8.1f}")
    figures = [
        {"name": "planner_error", "value": round(max(errors), 3), "goal": 0.15, "unit": "ratio"},
        *({"name": f"planner_error_{label.replace(' ', '_').replace(',', '').replace('=', '')}",
           "value": round(e, 3), "goal": 0.15, "unit": "ratio"} for (label, *_), e in zip(rows, errors)),
        {"name": "linear_scaling_error", "value": round(max(naive_errors), 3), "goal": None, "unit": "ratio"},
        {"name": "probe_latency_us", "value": round(link.latency_s * 1e6, 1), "goal": None, "unit": "us"},
        {"name": "probe_bandwidth_gb_per_s", "value": round(link.bytes_per_s / 1e9, 3), "goal": None, "unit": "GB/s"},
    ]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
