"""The closing summary of `make demo` / `make demo-text` / `make demo-audio`: what was produced,
where, and how to look at it. Names come from the same configs the jobs ran with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepspark.config import load_config
from deepspark.datasets import MANIFEST
from deepspark.storage import LATEST_POINTER
from deepspark.ui import runs_url

PROFILES = {"image": None, "text": "text", "audio": "audio"}


def main(modality: str = "image") -> None:
    from inference.config import BatchInferenceConfig
    from pipelines.config import EtlConfig
    from training.config import TrainConfig

    profile = PROFILES[modality]
    etl = load_config(EtlConfig, "etl", [], profile)
    train = load_config(TrainConfig, "train", [], profile)
    infer = load_config(BatchInferenceConfig, "batch_inference", [], profile)
    print(f"\n=== DeepSpark {modality} demo: what was produced ===")
    dataset = Path(etl.output.root) / etl.output.name
    pointer = dataset / LATEST_POINTER
    if pointer.is_file():
        version = pointer.read_text().strip()
        manifest = json.loads((dataset / f"v={version}" / MANIFEST).read_text())
        totals = manifest["totals"]
        spec = manifest["spec"]
        print(f"dataset {manifest['dataset']} v={version} (id {manifest['dataset_id']}), {manifest['modality']}: "
              f"{spec['column']} {spec['dtype']} {tuple(spec['shape'])}")
        print(f"  where:    {dataset / f'v={version}'}  (data/<split>/ = Petastorm Parquet, quarantine/, manifest.json)")
        reasons = totals["quarantine_by_reason"]
        print(f"  rows:     {totals['rows_written']} written, {totals['quarantined']} quarantined"
              + (f" {reasons}" if reasons else "") + f" of {totals['inputs_in']} inputs")
        print("  splits:   " + ", ".join(f"{s}={sum(c.values())}" for s, c in manifest["counts"].items()))
        if "vocabulary" in manifest["state"]:
            print(f"  vocabulary: {len(manifest['state']['vocabulary'])} tokens fitted on the train split")
    experiment_id = _mlflow_summary(modality, train.registry.model_name)
    print(f"predictions: {infer.output.path} (Parquet), quarantine: {infer.output.path}_quarantine")
    print(f"MLflow:     make ui, then open {runs_url('http://127.0.0.1:5000', experiment_id)}")


def _mlflow_summary(modality: str, model_name: str) -> str:
    """The latest training and inference runs of this modality, and the registry's aliases; returns
    the experiment's id."""
    from mlflow.tracking import MlflowClient

    from deepspark.tracking import TrackingSettings, ensure_experiment

    experiment_id = ensure_experiment(TrackingSettings())
    client = MlflowClient()
    for job, metric in (("train", "test_accuracy"), ("batch_inference", "accuracy")):
        query = f"tags.`deepspark.job` = '{job}'"
        if job == "train":
            query += f" and tags.`deepspark.modality` = '{modality}'"
        else:
            query += f" and tags.`model.uri` LIKE 'models:/{model_name}/%'"
        runs = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            run = runs[0]
            value = run.data.metrics.get(metric)
            shown = f"{value:.4f}" if value is not None else "n/a"
            print(f"{job + ':':<11} run {run.info.run_id} ({run.info.status}), {metric} {shown}")
    try:
        for alias in ("champion", "candidate"):
            mv = client.get_model_version_by_alias(model_name, alias)
            print(f"registry:   {model_name}@{alias} = v{mv.version}")
    except Exception:
        pass
    return experiment_id


if __name__ == "__main__":
    main(*sys.argv[1:])
