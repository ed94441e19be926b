"""Drift monitoring of batch inference: does it flag shifted inputs, how often does it alarm on
unshifted ones, and what does it add to a run.

Set-up (not timed): the real ETL over 2,000 train and 2,000 test Fashion-MNIST images (Debian's
package), the real training job (1 epoch, registered with its drift reference: the first 2,000
test-split rows). Held out from all of it: Fashion-MNIST test images 2,000-9,999.

- Detection: one batch inference run per shifted set of 400 held-out images: inverted, darkened
  (pixels x 0.6), rotated a quarter turn, blurred (5x5 box), and two classes only (sneakers and
  bags: a shift of the label mix). `drift_detected_shifted` is the share of sets flagged.
- False alarms: 20 hourly runs over one growing folder, 400 new unshifted held-out images each
  (the run window judges each run's new rows); `drift_false_alarm_rate` is the share flagged.
- Overhead: the same full run over all 8,000 held-out images with `monitor.enabled=true` and
  `false` (the peer: the job without monitoring), alternating, best of the rounds, in one warm
  session; and the same on 400 images, which gives the fixed cost apart from the marginal one.
  Unshifted runs draw no plot (`monitor.plots=on_drift`); a third variant plots every run.

Usage: python benchmarks/monitoring.py [--quick] [--json PATH]
  --quick: two rounds of the overhead runs (the full run takes the best of four).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HELD_OUT = (2000, 10_000)
BATCH = 400


def write(folder: Path, images: np.ndarray, labels: np.ndarray, start: int = 0) -> Path:
    from pipelines.images.demo_data import CLASS_NAMES, _png, folder_name

    for i, (image, label) in enumerate(zip(images, labels), start):
        target = folder / folder_name(CLASS_NAMES[label])
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{i:05d}.png").write_bytes(_png(image, f"image {i}"))
    return folder


def shifted_sets(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import cv2

    pick = slice(0, BATCH)
    two = np.flatnonzero(np.isin(labels, (7, 8)))[:BATCH]  # sneakers and bags
    return {
        "inverted": (255 - images[pick], labels[pick]),
        "darkened": ((images[pick] * 0.6).astype(np.uint8), labels[pick]),
        "rotated": (np.rot90(images[pick], 1, axes=(1, 2)).copy(), labels[pick]),
        "blurred": (np.stack([cv2.blur(im, (5, 5)) for im in images[pick]]), labels[pick]),
        "two_classes": (images[two], labels[two]),
    }


def setup(spark, tmp: Path, store: list[str]) -> None:
    """ETL and training of the registered model (with its drift reference)."""
    from deepspark.config import load_config
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl
    from pipelines.images.demo_data import write_raw_folder
    from training.config import TrainConfig
    from training.job import run_job

    write_raw_folder(tmp / "raw", limit=2000)
    run_etl(spark, load_config(EtlConfig, "etl", [f"input.path={tmp / 'raw'}", f"output.root={tmp / 'datasets'}",
                                                  "output.name=fashion-bench", "tracking.enabled=false"]))
    run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={tmp / 'datasets'}", "data.name=fashion-bench", *store, "epochs=1", "steps_per_epoch=60",
        "optimizer.batch_size=32"]))


def infer(spark, store: list[str], folder: Path, out: Path, *extra: str):
    from deepspark.config import load_config
    from inference.config import BatchInferenceConfig
    from inference.job import run_job

    return run_job(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *store, f"input.path={folder}", f"output.path={out}", "tracking.enabled=true", *extra]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rounds of the overhead runs instead of four")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from deepspark.spark import SparkSettings, build_session
    from pipelines.images.demo_data import load_split

    spark = build_session(SparkSettings(app_name="bench-monitoring", conf={"spark.ui.enabled": "false"}))
    images, labels = load_split("test")
    images, labels = images[HELD_OUT[0] : HELD_OUT[1]], labels[HELD_OUT[0] : HELD_OUT[1]]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}"]
        setup(spark, tmp, store)

        detected = {}
        for label, (x, y) in shifted_sets(images, labels).items():
            result = infer(spark, store, write(tmp / "shifted" / label, x, y), tmp / "out" / label)
            detected[label] = result.drift is not None and result.drift.detected
            print(f"{label:<12} {result.drift.lines()[0] if result.drift else 'not monitored'}")

        alarms, growing = [], tmp / "incoming"
        for hour in range(20):
            part = slice(hour * BATCH, (hour + 1) * BATCH)
            write(growing, images[part], labels[part], start=part.start)
            result = infer(spark, store, growing, tmp / "out" / "hourly")
            assert result.scored == BATCH, result.summary()
            alarms.append(result.drift is not None and result.drift.detected)
            if alarms[-1]:
                print(f"false alarm in hour {hour}: {result.drift.lines()[0]}")

        def timed(folder: Path, tag: str, enabled: bool, *extra: str) -> float:
            """The whole job as a user runs it: MLflow run, metrics and plots included."""
            started = time.perf_counter()
            infer(spark, store, folder, tmp / "out" / tag, "full_refresh=true", f"monitor.enabled={enabled}", *extra)
            return time.perf_counter() - started

        small = write(tmp / "small", images[:BATCH], labels[:BATCH])
        timed(small, "warm", True)  # workers hold the model
        seconds: dict[str, list[float]] = {k: [] for k in ("on_full", "off_full", "on_small", "off_small",
                                                         "plot_full")}
        for round_ in range(2 if args.quick else 4):
            for enabled in ((True, False) if round_ % 2 == 0 else (False, True)):
                key = "on" if enabled else "off"
                seconds[f"{key}_full"].append(timed(growing, f"{key}-full", enabled))
                seconds[f"{key}_small"].append(timed(small, f"{key}-small", enabled))
            seconds["plot_full"].append(timed(growing, "plot-full", True, "monitor.plots=always"))
        spark.stop()

    best = {k: min(v) for k, v in seconds.items()}
    rows = HELD_OUT[1] - HELD_OUT[0]
    overhead = (best["on_full"] - best["off_full"]) / best["off_full"]
    with_plot = (best["plot_full"] - best["off_full"]) / best["off_full"]
    fixed = best["on_small"] - best["off_small"]
    marginal = (best["on_full"] - best["off_full"] - fixed) / (rows - BATCH) * 1000
    rate = sum(detected.values()) / len(detected)
    false_rate = sum(alarms) / len(alarms)
    print(f"\n{'shifted set (400 held-out images)':<36}{'flagged':>8}")
    for label, flag in detected.items():
        print(f"{label:<36}{'yes' if flag else 'NO':>8}")
    print(f"false alarms: {sum(alarms)} of {len(alarms)} unshifted hourly runs of {BATCH} images")
    print(f"\n{'full run, seconds (best of rounds)':<36}{'8,000 images':>14}{'400 images':>12}")
    print(f"{'job with monitoring':<36}{best['on_full']:>14.2f}{best['on_small']:>12.2f}")
    print(f"{'peer: the job without it':<36}{best['off_full']:>14.2f}{best['off_small']:>12.2f}")
    print(f"{'job with monitoring, plot every run':<36}{best['plot_full']:>14.2f}")
    print(f"overhead: {overhead:.3f} of the full run (goal <= 0.10), {with_plot:.3f} with a plot (drifted runs, "
          f"or monitor.plots=always); fixed {fixed:.2f} s per run, marginal {marginal:.4f} ms per row; "
          f"rounds: {seconds}")
    figures = [
        {"name": "drift_detected_shifted", "value": rate, "goal": 1.0, "unit": "share of sets"},
        *({"name": f"drift_detected_{label}", "value": float(flag), "goal": 1.0, "unit": "flagged"}
          for label, flag in detected.items()),
        {"name": "drift_false_alarm_rate", "value": false_rate, "goal": 0.05, "unit": "share of runs"},
        {"name": "monitoring_overhead", "value": round(overhead, 3), "goal": 0.10, "unit": "ratio"},
        {"name": "monitoring_overhead_with_plot", "value": round(with_plot, 3), "goal": None, "unit": "ratio"},
        {"name": "monitoring_fixed_seconds", "value": round(fixed, 2), "goal": None, "unit": "s"},
        {"name": "monitoring_marginal_ms_per_row", "value": round(marginal, 4), "goal": None, "unit": "ms"},
        {"name": "inference_full_seconds_8k_monitored", "value": round(best["on_full"], 2), "goal": None, "unit": "s"},
        {"name": "inference_full_seconds_8k_unmonitored", "value": round(best["off_full"], 2), "goal": None,
         "unit": "s"},
    ]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
