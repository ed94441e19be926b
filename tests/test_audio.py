"""The audio modality end to end on real local[2] Spark: a folder of spoken digits (espeak-ng) and
bad files -> a Petastorm dataset of int16 waveforms -> Horovod training of a CNN whose log-mel
features are in the graph -> the registered model and the batch job scoring raw files identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepspark.config import load_config
from pipelines.audio.demo_data import espeak_available
from pipelines.config import EtlConfig
from tests.conftest import DigitsFolder

pytestmark = [pytest.mark.spark, pytest.mark.skipif(not espeak_available(), reason="needs Debian's espeak-ng")]


@pytest.fixture(scope="module")
def audio_dataset(spark, digits_folder: DigitsFolder, tmp_path_factory):
    from pipelines.etl import run_etl

    out = tmp_path_factory.mktemp("audio-etl")
    result = run_etl(spark, load_config(EtlConfig, "etl", [
        "modality=audio", f"input.path={digits_folder.root}", f"output.root={out}", "output.name=digits",
        "tracking.enabled=false", "input.val_from_train=0.2", "output.row_group_size_mb=0.1"]))
    return result, out


def test_every_file_is_a_row_or_a_quarantine_row_with_its_reason(spark, audio_dataset, digits_folder):
    result, _ = audio_dataset
    assert result.inputs_in == digits_folder.good + len(digits_folder.bad)
    assert result.rows_written == digits_folder.good
    quarantine = spark.read.parquet(f"{result.url}/quarantine").collect()
    assert {r.path.split("/digits/", 1)[1]: r.reason for r in quarantine} == digits_folder.bad
    assert result.manifest["spec"] == {"column": "waveform", "shape": [16000], "dtype": "int16", "encoding": "raw"}
    assert result.manifest["labels"] == ["one", "two", "zero"]
    assert set(result.manifest["counts"]) == {"train", "val", "test"}


def test_stored_waveforms_are_the_decoded_files(spark, audio_dataset, digits_folder):
    from petastorm import make_reader

    from pipelines.audio.transforms import AudioRules, decode_audio

    result, _ = audio_dataset
    with make_reader(f"{result.url}/data/test", reader_pool_type="dummy", num_epochs=1) as reader:
        rows = list(reader)
    assert len(rows) == 12 and all("en-us-nyc" in r.path for r in rows)  # the unseen voice only
    for row in rows[:4]:
        stored = np.frombuffer(row.waveform, np.int16)
        assert np.array_equal(stored, decode_audio(Path(row.path.replace("file:", "", 1)).read_bytes(), AudioRules()))
        assert np.abs(stored).max() > 1000  # speech, not padding


@pytest.mark.slow
def test_trained_model_scores_raw_files_as_the_batch_job_does(spark, audio_dataset, digits_folder, tmp_path):
    import mlflow
    import pandas as pd

    from inference.config import BatchInferenceConfig
    from inference.job import run_inference
    from inference.state import read_table
    from training.config import TrainConfig
    from training.job import run_job

    _, root = audio_dataset
    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    trained = run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={root}", "data.name=digits", *store, "epochs=2", "steps_per_epoch=3",
        "optimizer.batch_size=8", "registry.model_name=digits-classifier"]))
    assert trained.model_version == 1
    scored = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *store, "model_uri=models:/digits-classifier@champion", f"input.path={digits_folder.root / 'train' / 'one'}",
        f"output.path={tmp_path / 'predictions'}"]))
    n_good = len(list((digits_folder.root / "train" / "one").iterdir())) - len(digits_folder.bad)
    assert (scored.scored, scored.quarantined) == (n_good, len(digits_folder.bad))
    rows = read_table(spark, str(tmp_path / "predictions")).select("path", "predicted_label").collect()
    batch = {Path(r.path.replace("file:", "", 1)).name: r.predicted_label for r in rows}

    mlflow.set_tracking_uri(store[0].split("=", 1)[1])
    model = mlflow.pyfunc.load_model("models:/digits-classifier@champion")
    files = sorted(p for p in (digits_folder.root / "train" / "one").iterdir() if p.name in batch)
    served = model.predict(pd.DataFrame({"content": [p.read_bytes() for p in files]}))
    assert list(served["predicted_label"]) == [batch[p.name] for p in files]
    assert model.predict([b""])["reason"][0] == "empty_file"
