"""Text and audio through the same `jobs/*.py` as images, by spark-submit: a profile switches the
modality, data and model keys; only paths and tiny step counts are overridden here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.audio.demo_data import espeak_available

pytestmark = [pytest.mark.spark, pytest.mark.slow]

JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_etl_train_and_batch_inference_by_spark_submit(modality, text_corpus, digits_folder, tmp_path):
    if modality == "audio" and not espeak_available():
        pytest.skip("needs Debian's espeak-ng")
    from deepspark.localcluster import spark_submit

    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    raw = text_corpus.csv if modality == "text" else digits_folder.root
    profile = ["--profile", modality]
    etl, _ = spark_submit("local[2]", JOBS / "etl.py", [*profile, f"input.path={raw}", f"output.root={tmp_path}",
                                                       "output.row_group_size_mb=0.01", *store])
    assert f"{modality} dataset" in etl and "inputs in" in etl
    train, _ = spark_submit("local[2]", JOBS / "train.py", [*profile, f"data.root={tmp_path}", "epochs=1",
                                                           "steps_per_epoch=2", "optimizer.batch_size=8", *store])
    assert re.search(r"test accuracy \d\.\d{4}", train) and "now @champion" in train
    source = ["input.dataset=null", f"input.path={raw}", "input.label_column=category"] if modality == "text" else \
        [f"input.path={raw / 'test'}"]
    infer, _ = spark_submit("local[2]", JOBS / "batch_inference.py", [*profile, *source,
                                                                     f"output.path={tmp_path / 'predictions'}", *store])
    counts = re.search(r"hashed (\d+) = scored now (\d+) \+ quarantined (\d+) \+ already scored 0", infer)
    assert counts, infer[-2000:]
    inputs, scored, quarantined = map(int, counts.groups())
    if modality == "text":
        # two empty texts and the latin-1 record; the 500-character review fits the profile's max_chars
        assert (inputs, scored, quarantined) == (text_corpus.rows, text_corpus.rows - 3, 3)
    else:
        assert (inputs, scored, quarantined) == (12, 12, 0)  # the unseen test voice: 3 digits x 2 speeds x 2 pitches
