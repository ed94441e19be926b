"""The closing summary of `make demo`: what was produced, where, and how to look at it."""

from __future__ import annotations

import json
from pathlib import Path

from deepspark.datasets import MANIFEST
from deepspark.storage import LATEST_POINTER

DATASETS = Path("data/datasets")


def main() -> None:
    print("\n=== DeepSpark demo: what was produced ===")
    for dataset in sorted(p for p in DATASETS.glob("*") if p.is_dir()):
        pointer = dataset / LATEST_POINTER
        if not pointer.is_file():
            continue
        version = pointer.read_text().strip()
        manifest = json.loads((dataset / f"v={version}" / MANIFEST).read_text())
        totals = manifest["totals"]
        print(f"dataset {manifest['dataset']} v={version} (id {manifest['dataset_id']})")
        print(f"  where:    {dataset / f'v={version}'}  (data/<split>/ = Petastorm Parquet, quarantine/, manifest.json)")
        print(f"  rows:     {totals['rows_written']} written, {totals['quarantined']} quarantined of {totals['inputs_in']} inputs")
        print("  splits:   " + ", ".join(f"{s}={sum(c.values())}" for s, c in manifest["counts"].items()))
    _mlflow_summary()
    print("MLflow:     make ui, then open http://127.0.0.1:5000 (experiment 'deepspark')")


def _mlflow_summary() -> None:
    """The latest training and inference runs, and the registry's aliases."""
    from mlflow.tracking import MlflowClient

    from deepspark.tracking import TrackingSettings, ensure_experiment

    experiment_id = ensure_experiment(TrackingSettings())
    client = MlflowClient()
    for job, metric in (("train", "test_accuracy"), ("batch_inference", "accuracy")):
        runs = client.search_runs([experiment_id], f"tags.`deepspark.job` = '{job}'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            run = runs[0]
            value = run.data.metrics.get(metric)
            shown = f"{value:.4f}" if value is not None else "n/a"
            print(f"{job + ':':<11} run {run.info.run_id} ({run.info.status}), {metric} {shown}")
    try:
        for alias in ("champion", "candidate"):
            mv = client.get_model_version_by_alias("fashion-mnist-classifier", alias)
            print(f"registry:   fashion-mnist-classifier@{alias} = v{mv.version}")
    except Exception:
        pass
    print("predictions: data/predictions/fashion-mnist (Parquet), quarantine: data/predictions/fashion-mnist_quarantine")


if __name__ == "__main__":
    main()
