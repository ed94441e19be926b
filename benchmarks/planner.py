"""The capacity planner against measured epochs: is its prediction of an epoch's training steps
within 15 % of what a real run takes, for each configuration this machine can run?

Set-up (not timed): the real ETL over 2,000 train and 2,000 test Fashion-MNIST images. Then, with
the real training job (the convnet, 64 rows per rank and step, 2 epochs of `--steps` steps; the
second epoch's breakdown is read):
- 1 rank; 2 ranks; 2 ranks with `horovod.backward_passes_per_step=2`;
- one allreduce probe on 2 ranks (latency and bandwidth of the link).
The planner measures as `deepspark plan` does by default: one rank alone and 2 ranks sharing the
host (a rank's compute per step at 1 and 2 ranks per host: its step less the input wait and the
ring allreduce the probe predicts there), plus the probe's link, and predicts every configuration
from them (`planner_error`, the worst). On one host of 2 slots, 1 and 2 ranks are its calibration
points, and only `backward_passes_per_step=2` is predicted apart from its own measurement. It is
also asked to predict each configuration from each other single run's measurement
(`planner_error_from_one_run`, as `plan.from_run` would: nothing says how ranks sharing the host
slow each other). The peer is what a user would assume without a planner: linear scaling (each
step as fast as in the measured configuration).

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
    from training.job import plan as plan_training
    from training.job import run_job as train
    from training.planner import Measured, PlanConfig, PlanSettings, gradient_bytes, make_plan, probe

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

    planner = make_plan(measured["2 ranks"], link, grad_bytes, 2000, PlanSettings(), hosts=1,
                        calibration=(measured["1 rank"],))  # what `deepspark plan` measures by default
    rows = []  # the planner's; then every configuration from each other single run's measurement
    for label, (ranks, passes) in CONFIGS.items():
        naive = steps * measured["2 ranks"].step_s
        rows.append((label, "planner (1 and 2 ranks)", measured[label].trained_s,
                     planner.predicted_trained_s(ranks, steps, passes), naive, True))
    for label, (ranks, passes) in CONFIGS.items():
        actual = measured[label].trained_s
        for source_label, source in measured.items():
            if source_label == label:
                continue
            single = make_plan(source, link, grad_bytes, 2000, PlanSettings(), hosts=1)
            naive = steps * source.step_s  # linear scaling: each rank's step as fast as the measured one's
            rows.append((label, source_label, actual, single.predicted_trained_s(ranks, steps, passes), naive,
                         source.ranks == ranks))
    print(f"\nlink (allreduce probe, 2 ranks): latency {link.latency_s * 1e6:.0f} us, {link.bytes_per_s / 1e9:.2f} GB/s; "
          f"gradients {grad_bytes / 2**20:.2f} MB; {steps} steps per epoch, 64 rows per rank and step")
    print(f"{'configuration':<38}{'predicted from':<38}{'measured s':>11}{'planner s':>10}{'error':>7}"
          f"{'linear s':>10}{'error':>7}")
    errors, own, same, naive_errors = [], [], [], []
    for label, source_label, actual, predicted, naive, same_ranks in rows:
        error, naive_error = abs(predicted - actual) / actual, abs(naive - actual) / actual
        naive_errors.append(naive_error)
        print(f"{label:<38}{source_label:<38}{actual:>11.2f}{predicted:>10.2f}{error:>7.2f}{naive:>10.2f}"
              f"{naive_error:>7.2f}")
        if source_label.startswith("planner"):
            own.append(error)
            continue
        errors.append(error)
        if same_ranks:
            same.append(error)
    print("measured per step, ms: step, input wait, communication (Horovod's timeline is off: the epoch-end meeting); "
          "model compute")
    for label, m in measured.items():
        print(f"  {label:<38}{m.step_s * 1000:>8.1f}{m.input_wait_s * 1000:>8.1f}{m.communication_s * 1000:>8.1f}"
              f"{m.compute_s(grad_bytes, link) * 1000:>8.1f}")
    figures = [
        {"name": "planner_error", "value": round(max(own), 3), "goal": 0.15, "unit": "ratio"},
        {"name": "planner_error_from_one_run", "value": round(max(errors), 3), "goal": None, "unit": "ratio"},
        {"name": "planner_error_same_ranks", "value": round(max(same), 3), "goal": 0.15, "unit": "ratio"},
        {"name": "linear_scaling_error", "value": round(max(naive_errors), 3), "goal": None, "unit": "ratio"},
        {"name": "probe_latency_us", "value": round(link.latency_s * 1e6, 1), "goal": None, "unit": "us"},
        {"name": "probe_bandwidth_gb_per_s", "value": round(link.bytes_per_s / 1e9, 3), "goal": None, "unit": "GB/s"},
        *({"name": f"measured_step_ms_{label.replace(' ', '_').replace(',', '').replace('=', '')}",
           "value": round(m.step_s * 1000, 1), "goal": None, "unit": "ms"} for label, m in measured.items()),
    ]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
