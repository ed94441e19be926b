"""Several model versions scored in one pass: real local[2] Spark, a real sqlite registry holding
two versions trained by the real training job, exactly once per (input, model version)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepspark.config import ConfigError, load_config
from inference.config import BatchInferenceConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]

NAME = "fashion-mnist-classifier"


@pytest.fixture(scope="module")
def two_versions(spark, registry, fashion_small):
    """The module's registry (v1, champion) plus a second, differently trained version (v2)."""
    from training.config import TrainConfig
    from training.job import run_job

    run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={fashion_small.root}", f"data.name={fashion_small.name}", *registry, "epochs=1",
        "steps_per_epoch=3", "optimizer.batch_size=16", "max_eval_rows=100", "seed=7", "registry.gate_min_delta=1.0",
    ]))
    return registry


def infer(spark, store, folder: Path, out: Path, *extra: str):
    from inference.job import run_inference

    return run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *store, f"input.path={folder}", f"output.path={out}", *extra]))


BOTH = f"model_uris=[models:/{NAME}/1, models:/{NAME}@candidate]"


def test_two_models_one_pass_one_row_per_model_exactly_once(spark, two_versions, raw_copy, tmp_path):
    from inference.state import read_table

    out = tmp_path / "out"
    first = infer(spark, two_versions, raw_copy, out, BOTH)
    assert first.per_model == {1: (400, 3, 0), 2: (400, 3, 0)}
    assert first.counts.hashed == 403 and 0 < first.model_loads <= 4  # 2 models x 2 workers at most, once each
    assert first.disagreement is not None and first.disagreement.compared == 400
    predictions = read_table(spark, str(out))
    assert predictions.count() == 800
    assert predictions.select("path", "model_version").distinct().count() == 800
    assert sorted(r[0] for r in predictions.select("model_version").distinct().collect()) == [1, 2]
    from pyspark.sql import functions as F

    disagree = (predictions.groupBy("path").agg(F.countDistinct("predicted_label").alias("labels"))
                .where("labels > 1").count())
    assert disagree == first.disagreement.differing
    assert read_table(spark, str(out), "quarantine").count() == 6
    assert "models disagree on" in first.summary()

    again = infer(spark, two_versions, raw_copy, out, BOTH)
    assert again.commit is None and again.counts.skipped == 403 and again.per_model == {}

    shutil.copy(next((raw_copy / "Coat").iterdir()), raw_copy / "Coat" / "copy-new.png")
    more = infer(spark, two_versions, raw_copy, out, BOTH)
    assert more.per_model == {1: (1, 0, 0), 2: (1, 0, 0)} and more.counts.skipped == 403
    assert read_table(spark, str(out)).count() == 802


def test_a_model_added_later_scores_everything_the_other_already_has(spark, two_versions, raw_copy, tmp_path):
    out = tmp_path / "out"
    alone = infer(spark, two_versions, raw_copy, out, f"model_uri=models:/{NAME}/1")
    assert (alone.scored, alone.quarantined) == (400, 3)
    both = infer(spark, two_versions, raw_copy, out, BOTH)
    # v1 hashes and recognises every file it committed (not scored twice); v2 scores them all
    assert both.per_model == {1: (0, 0, 403), 2: (400, 3, 0)}
    from inference.state import read_table

    counts = {r[0]: r[1] for r in read_table(spark, str(out)).groupBy("model_version").count().collect()}
    assert counts == {1: 400, 2: 400}


def test_one_version_named_twice_is_scored_once(spark, two_versions, raw_copy, tmp_path):
    result = infer(
        spark, two_versions, raw_copy, tmp_path / "out", f"model_uris=[models:/{NAME}/1, models:/{NAME}@champion]"
    )
    assert result.per_model == {1: (400, 3, 0)} and result.disagreement is None  # @champion is v1


@pytest.fixture(scope="module")
def foreign_versions(two_versions, tmp_path_factory):
    """v1's Keras model registered again, really: as `other` v1 (another registered model), and
    as this model's v3 with a different label vocabulary (so it preprocesses and labels unlike v1)."""
    import dataclasses

    import mlflow

    from deepspark.serving import log_classifier

    mlflow.set_tracking_uri(next(o.split("=", 1)[1] for o in two_versions if o.startswith("tracking.uri=")))
    # The training job's experiment (the store's artifact root), by id: set_experiment() would
    # leave a process-wide active experiment behind for later tests.
    experiment = mlflow.MlflowClient().get_experiment_by_name("deepspark").experiment_id
    v1 = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    relabelled = dataclasses.replace(v1.record, labels=tuple(reversed(v1.record.labels)))
    assert relabelled != v1.record
    for name, record in (("other", v1.record), (NAME, relabelled)):
        with mlflow.start_run(experiment_id=experiment, run_name=f"registered again as {name}"):
            log_classifier(v1.keras_model, record, name, str(tmp_path_factory.mktemp("again")))
    return two_versions


def test_versions_of_different_models_are_refused_before_any_task(spark, foreign_versions, raw_copy, tmp_path):
    with pytest.raises(ConfigError, match="model_uris: 'models:/other@x' does not resolve"):
        infer(spark, foreign_versions, raw_copy, tmp_path / "out", f"model_uris=[models:/{NAME}/1, models:/other@x]")
    with pytest.raises(
        ConfigError, match="models:/other/1 and models:/fashion-mnist-classifier/1 are different registered models"
    ):
        infer(spark, foreign_versions, raw_copy, tmp_path / "out", f"model_uris=[models:/{NAME}/1, models:/other/1]")
    with pytest.raises(
        ConfigError, match=f"models:/{NAME}/3 preprocesses its inputs differently from models:/{NAME}/1"
    ):
        infer(spark, foreign_versions, raw_copy, tmp_path / "out", f"model_uris=[models:/{NAME}/1, models:/{NAME}/3]")
    assert not (tmp_path / "out").exists()
