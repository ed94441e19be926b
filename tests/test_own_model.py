"""A user's own model end to end: a builder from a package outside the project (with a custom
Keras layer) trained on 2 real Horovod ranks, registered in a real sqlite MLflow store, then scored
where that package is not importable: by `mlflow.pyfunc.load_model` in a fresh process, and by a
fresh `spark-submit` of batch inference. Both must give the predictions of the model in the
training process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepspark.config import load_config
from training.config import TrainConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent
NAME = "acme-classifier"
PREDICT = """
import json, sys
try:
    import acme_models  # noqa: F401
    sys.exit("acme_models is importable here; the test would prove nothing")
except ImportError:
    pass
import mlflow.pyfunc
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
paths = json.loads(sys.argv[3])
out = model.predict([open(p, "rb").read() for p in paths])
print(json.dumps({"labels": list(out["predicted_label"]), "probabilities": list(out["probability"])}))
"""


def test_a_users_builder_trains_registers_and_scores_without_its_package(spark, fashion_small, user_package,
                                                                          tmp_path):
    import mlflow
    import mlflow.pyfunc

    from training.job import run_job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TrainConfig, "train", [
        f"data.root={fashion_small.root}", f"data.name={fashion_small.name}", f"tracking.uri={uri}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}", "epochs=1", "steps_per_epoch=4", "optimizer.batch_size=16",
        "max_eval_rows=100", "horovod.num_proc=2", "model.builder=acme_models:build", "model.params={width: 12}",
        f"registry.model_name={NAME}"])
    result = run_job(spark, cfg)
    assert result.model_version == 1 and result.num_proc == 2
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.data.params["resolved.model_builder"] == "acme_models:build"
    assert run.info.run_name.startswith("train:build:")

    raw = sorted((fashion_small.root.parent / "raw" / "test").glob("*/*.png"))[:: 10][:30]
    folder = tmp_path / "to-score"
    for path in raw:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    paths = sorted(str(p) for p in folder.glob("*/*.png"))
    mlflow.set_tracking_uri(uri)
    here = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict([open(p, "rb").read() for p in paths])
    assert here["predicted_label"].notna().all()

    # A fresh process without the package on its path (it is not installed: only the model's copy).
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run([sys.executable, "-c", PREDICT, uri, f"models:/{NAME}/1", json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["labels"] == list(here["predicted_label"])
    assert fresh["probabilities"] == pytest.approx(list(here["probability"]), abs=1e-6)

    # Batch inference in a fresh spark-submit: its Python workers load the model from the registry.
    from deepspark.localcluster import spark_submit

    out = tmp_path / "predictions"
    spark_submit("local[2]", PROJECT / "jobs" / "batch_inference.py",
                 [f"model_uri=models:/{NAME}/1", f"input.path={folder}", f"output.path={out}", f"tracking.uri={uri}"],
                 cwd=tmp_path, timeout_s=600)
    from inference.state import read_table

    scored = {r.path.replace("file:", "", 1): r.predicted_label for r in read_table(spark, str(out), "predictions").collect()}
    assert scored == dict(zip(paths, here["predicted_label"]))
