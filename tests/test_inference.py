"""Batch inference from the registry as Spark UDFs: real local[2] Spark, a real sqlite MLflow
registry with a model trained by the real training job."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from inference.config import BatchInferenceConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def registry(spark, fashion_small, tmp_path_factory) -> list[str]:
    """A registry holding one briefly trained champion; returns the tracking overrides."""
    from training.config import TrainConfig
    from training.job import run_job

    tmp = tmp_path_factory.mktemp("registry")
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}"]
    run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={fashion_small.root}", f"data.name={fashion_small.name}", *store,
        "epochs=1", "steps_per_epoch=10", "optimizer.batch_size=16", "max_eval_rows=100",
    ]))
    return store


@pytest.fixture()
def raw_copy(fashion_small, tmp_path) -> Path:
    """The small Fashion-MNIST test folder plus three bad files, in a folder this test owns."""
    folder = tmp_path / "incoming"
    shutil.copytree(fashion_small.root.parent / "raw" / "test", folder)
    whole = next((folder / "Bag").iterdir()).read_bytes()
    (folder / "Bag" / "broken.png").write_bytes(whole[: len(whole) // 2])
    (folder / "Bag" / "empty-ish.jpg").write_bytes(b"not a jpeg at all")
    (folder / "Bag" / "zero.png").write_bytes(b"")
    return folder


def infer(spark, registry, folder: Path, out: Path, *extra: str):
    from inference.job import run_inference

    cfg = load_config(BatchInferenceConfig, "batch_inference", [
        *registry, f"input.path={folder}", f"output.path={out}", "tracking.enabled=true", *extra])
    return run_inference(spark, cfg)


def table(spark, out: Path):
    return spark.read.parquet(str(out))


def test_end_to_end_from_a_raw_folder(spark, registry, raw_copy, tmp_path):
    out = tmp_path / "predictions"
    result = infer(spark, registry, raw_copy, out)
    assert result.inputs == 403 and result.scored == 400 and result.quarantined == 3 and result.already_scored == 0
    assert 1 <= result.model_loads <= 2  # once per Python worker, not per batch or task
    rows = table(spark, out)
    assert rows.count() == 400
    first = rows.first()
    assert first.model_name == "fashion-mnist-classifier" and first.model_version == 1 and first.model_run_id
    assert len(first.top_k_labels) == 3 and first.predicted_label == first.top_k_labels[0]
    assert abs(sum(first.top_k_probabilities)) <= 1.0 + 1e-5
    quarantine = spark.read.parquet(str(out) + "_quarantine").collect()
    assert sorted(r.reason for r in quarantine) == ["empty_file", "not_an_image", "truncated"]
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0


def test_second_run_scores_only_new_files_and_rerun_after_crash_is_exactly_once(spark, registry, raw_copy, tmp_path, monkeypatch):
    from inference import state

    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    for i in range(5):
        shutil.copy(raw_copy / "Coat" / sorted(p.name for p in (raw_copy / "Coat").iterdir())[0],
                    raw_copy / "Coat" / f"new-{i}.png")
    second = infer(spark, registry, raw_copy, out)
    assert (second.scored, second.quarantined, second.already_scored) == (5, 0, 403)

    for i in range(3):
        (raw_copy / "Bag" / f"late-{i}.png").write_bytes((raw_copy / "Coat" / "new-0.png").read_bytes())
    original_commit = state.Table.commit

    def crash(self, job_id, version):
        raise RuntimeError("executor lost during commit (simulated)")

    monkeypatch.setattr(state.Table, "commit", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        infer(spark, registry, raw_copy, out)
    monkeypatch.setattr(state.Table, "commit", original_commit)
    assert table(spark, out).count() == 405  # nothing of the crashed run is visible
    third = infer(spark, registry, raw_copy, out)
    assert third.scored == 3
    rows = table(spark, out)
    assert rows.count() == rows.select("path", "content_hash").distinct().count() == 408  # no duplicates, no gaps


def test_full_refresh_rescores_without_duplicates(spark, registry, raw_copy, tmp_path):
    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    again = infer(spark, registry, raw_copy, out, "full_refresh=true")
    assert again.scored == 400 and again.already_scored == 0
    assert table(spark, out).count() == 400
    assert {r.job_id for r in table(spark, out).select("job_id").distinct().collect()} == {again.job_id}


def test_concurrent_run_is_refused(spark, registry, raw_copy, tmp_path):
    import json
    import os
    import socket

    from inference.state import ConcurrentRunError

    out = tmp_path / "predictions"
    out.mkdir()
    (out / "_LOCK").write_text(json.dumps({"job_id": "other", "host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(ConcurrentRunError, match="locked by job other"):
        infer(spark, registry, raw_copy, out)
    assert infer(spark, registry, raw_copy, out, "force_unlock=true").scored == 400


@pytest.mark.parametrize("uri,message", [
    ("models:/fashion-mnist-classifier@nope", "does not resolve"),
    ("models:/no-such-model@champion", "does not resolve"),
    ("models:/fashion-mnist-classifier/99", "does not resolve"),
    ("runs:/abc/model", "is not models:/"),
])
def test_model_uri_errors_before_any_task(spark, registry, raw_copy, tmp_path, uri, message):
    with pytest.raises(ConfigError, match=f"model_uri: .*{message}"):
        infer(spark, registry, raw_copy, tmp_path / "out", f"model_uri={uri}")
    assert not (tmp_path / "out").exists()


def test_alias_is_resolved_to_one_concrete_version(spark, registry, raw_copy, tmp_path):
    result = infer(spark, registry, raw_copy, tmp_path / "out", "model_uri=models:/fashion-mnist-classifier/1")
    assert result.model == "models:/fashion-mnist-classifier/1"
    assert {r.model_version for r in table(spark, tmp_path / "out").select("model_version").distinct().collect()} == {1}


def test_dataset_input_and_shape_mismatch(spark, registry, fashion_small, tmp_path):
    from inference.job import run_inference

    base = [*registry, "input.path=null", f"input.dataset_root={fashion_small.root}", f"output.path={tmp_path / 'p'}"]
    result = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference",
                                              [*base, f"input.dataset={fashion_small.name}"]))
    assert result.scored == result.inputs > 0 and result.accuracy is not None

    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl

    run_etl(spark, load_config(EtlConfig, "etl", [
        f"input.path={fashion_small.root.parent / 'raw'}", f"output.root={fashion_small.root}", "output.name=big",
        "tracking.enabled=false", "image.height=32", "image.width=32"]))
    with pytest.raises(ConfigError, match="input.dataset: big v=1 holds"):
        run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [*base, "input.dataset=big"]))


def test_inference_preprocessing_matches_the_etl_tensor(spark, registry, fashion_small):
    """The same file through the registered model's preprocessing and through the ETL gives
    identical tensors, and the pyfunc predicts on raw file bytes."""
    import mlflow.pyfunc
    import pandas as pd
    from petastorm import make_reader

    from deepspark.datasets import open_dataset

    dataset = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    model = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1")
    classifier = model.unwrap_python_model()
    with make_reader(dataset.split_url("test"), reader_pool_type="dummy", num_epochs=1) as reader:
        rows = [next(reader) for _ in range(20)]
    files = [Path(r.path.replace("file:", "", 1)).read_bytes() for r in rows]
    tensors, failures = classifier.preprocess(files)
    assert failures == [None] * 20
    stored = dataset.record.plugin.decode([r.image for r in rows], dataset.spec)
    assert np.array_equal(np.stack(tensors), stored)
    served = model.predict(pd.DataFrame({"content": files + [b"not an image"]}))
    expected = classifier.probabilities(stored).argmax(axis=1)
    assert list(served["predicted_label"][:20]) == [dataset.labels[i] for i in expected]
    assert served["predicted_label"][20] is None and served["reason"][20] == "not_an_image"
