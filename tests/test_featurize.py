"""Feature transfer on real components: the featurize job runs a registered backbone over a real
dataset version on a local[2] SparkSession; a head trains on the features dataset through the
training job and is registered composed with its backbone in a real sqlite MLflow store."""

from __future__ import annotations

import io

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from pipelines.config import FeaturizeConfig

pytestmark = [pytest.mark.spark, pytest.mark.timeout(900)]

BACKBONE = "models:/fashion-mnist-classifier@champion"


def featurize(spark, fashion_small, registry, out, *overrides):
    from pipelines.featurize import run_featurize

    cfg = load_config(FeaturizeConfig, "featurize", [
        f"source.root={fashion_small.root}", f"source.name={fashion_small.name}", f"backbone={BACKBONE}",
        f"output.root={out}", "output.name=fashion-features", "output.row_group_size_mb=0.01", *registry,
        *overrides])
    return run_featurize(spark, cfg)


def rows_of(url: str, split: str, column: str) -> dict[str, np.ndarray]:
    """path -> stored vector (or tensor bytes) of one split, read with pyarrow."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{url.replace('file:', '', 1)}/data/{split}", columns=[column, "path"])
    return dict(zip(table.column("path").to_pylist(), table.column(column).to_pylist()))


@pytest.fixture(scope="module")
def features(spark, fashion_small, registry, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    return featurize(spark, fashion_small, registry, out, "layers=[conv2, dense]")


def test_the_features_dataset_reconciles_and_records_its_lineage(spark, fashion_small, registry, features):
    import mlflow
    import tensorflow as tf

    from deepspark.datasets import open_dataset
    from pipelines.features.models import extractor

    source = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    manifest = features.manifest
    assert manifest["modality"] == "features"
    totals = manifest["totals"]
    assert totals["inputs_in"] == sum(source.rows(s) for s in source.manifest["splits"]) == features.inputs_in
    assert totals["rows_written"] + totals["quarantined"] == totals["inputs_in"]
    assert manifest["counts"] == source.manifest["counts"]  # every row keeps its split and label
    lineage = manifest["lineage"]
    assert lineage["source"] == {"dataset": source.name, "version": source.version, "dataset_id": source.dataset_id,
                                 "url": source.url}
    assert lineage["backbone"]["uri"] == "models:/fashion-mnist-classifier/1"  # the alias, pinned
    assert [f["name"] for f in lineage["layers"]] == ["conv2", "dense"]
    assert [f["size"] for f in lineage["layers"]] == [64, 128] and manifest["spec"]["shape"] == [192]

    # The stored vectors are the backbone's layers, pooled, computed by hand on the same rows.
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    backbone = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1").unwrap_python_model().keras_model
    stored = rows_of(features.url, "test", "features")
    tensors = rows_of(source.url, "test", "image")
    paths = sorted(stored)[:40]
    x = np.stack([np.frombuffer(tensors[p], np.uint8).reshape(28, 28, 1) for p in paths])
    conv = tf.keras.Model(backbone.inputs, backbone.get_layer("conv2").output)(x).numpy().mean(axis=(1, 2))
    dense = tf.keras.Model(backbone.inputs, backbone.get_layer("dense").output)(x).numpy()
    got = np.stack([np.frombuffer(stored[p], np.float32) for p in paths])
    np.testing.assert_allclose(got, np.concatenate([conv, dense], axis=1), rtol=1e-4, atol=1e-5)
    assert extractor(backbone, ["dense"]).trainable is False


def test_a_head_trains_on_features_and_registers_composed_with_its_backbone(spark, features, registry):
    """The registered model takes raw PNG bytes; its probabilities are the backbone's features
    then the head's, computed by hand; it is a model of the source modality."""
    import mlflow
    import tensorflow as tf
    from PIL import Image

    from training.config import TrainConfig
    from training.job import run_job

    result = run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={features.url.rsplit('/', 2)[0]}", "data.name=fashion-features", *registry,
        "epochs=2", "optimizer.batch_size=16", "max_eval_rows=100", "model.name=linear",
        "model.params={layer: dense}", "registry.model_name=fashion-head", "horovod.num_proc=2"]))
    assert result.model_version == 1
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    registered = mlflow.pyfunc.load_model("models:/fashion-head/1")
    classifier = registered.unwrap_python_model()
    assert classifier.record.modality == "image" and classifier.record.spec.shape == (28, 28, 1)

    images = (np.random.default_rng(0).random((12, 28, 28)) * 255).astype(np.uint8)
    payloads = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    out = registered.predict(payloads)
    backbone = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1").unwrap_python_model().keras_model
    head = classifier.keras_model.layers[-1]  # the registered model is backbone features, then the head
    assert isinstance(head, tf.keras.Model) and head.name == "linear_head"
    vectors = tf.keras.Model(backbone.inputs, backbone.get_layer("dense").output)(images[..., None]).numpy()
    width = 64 + 128
    full = np.zeros((len(images), width), np.float32)
    full[:, 64:] = vectors
    by_hand = head(full).numpy()
    assert list(out["predicted_label"]) == [classifier.record.labels[i] for i in by_hand.argmax(axis=1)]
    np.testing.assert_allclose(out["probability"], by_hand.max(axis=1), rtol=1e-4)


def test_an_unknown_layer_fails_before_any_task_naming_the_key(spark, fashion_small, registry, tmp_path):
    before = spark.sparkContext.statusTracker().getJobIdsForGroup()
    with pytest.raises(ConfigError, match=r"layers: the backbone 'convnet' has no layer 'conv9' \(has .*dense"):
        featurize(spark, fashion_small, registry, tmp_path, "layers=[conv9]")
    assert spark.sparkContext.statusTracker().getJobIdsForGroup() == before
    assert not (tmp_path / "fashion-features").exists() or not list((tmp_path / "fashion-features").glob("v=*"))


def test_a_backbone_of_another_input_fails_naming_the_key(spark, fashion_small, registry, tmp_path):
    import tensorflow as tf

    inputs = tf.keras.Input((32, 32, 3), dtype="uint8")
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(tf.keras.layers.Flatten()(inputs)))
    path = tmp_path / "other.keras"
    model.save(path)
    with pytest.raises(ConfigError, match=r"backbone: .*takes uint8 \(32, 32, 3\), but dataset fashion-small"):
        featurize(spark, fashion_small, registry, tmp_path, f"backbone={path}")


def test_a_search_chooses_the_feature_layer(spark, features, registry):
    """The layer is a searchable choice: one features dataset, one head per layer, the winner
    registered composed with the backbone."""
    import mlflow

    from training.selection.config import SelectConfig
    from training.selection.job import run_job

    result = run_job(spark, load_config(SelectConfig, "select_models", [
        f"data.root={features.url.rsplit('/', 2)[0]}", "data.name=fashion-features", *registry, "epochs=1",
        "model.name=linear", "search.method=grid", "search.space={model.params.layer: {choice: [conv2, dense]}}",
        "execution.method=task", "optimizer.batch_size=16", "max_eval_rows=100", "registry.model_name=fashion-search"]))
    assert sorted(row["params"]["model.params.layer"] for row in result.leaderboard) == ["conv2", "dense"]
    won = next(row for row in result.leaderboard if row["trial"] == result.winner)["params"]["model.params.layer"]
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    winner = mlflow.pyfunc.load_model("models:/fashion-search/1").unwrap_python_model()
    assert winner.record.modality == "image"
    head_input = winner.keras_model.layers[-1].get_layer("layer")  # the head reads the winning layer's part
    assert (head_input.offset, head_input.size) == ({"conv2": (0, 64), "dense": (64, 128)}[won])


def test_the_etl_refuses_the_features_modality_naming_the_key(spark, etl_overrides):
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl

    with pytest.raises(ConfigError, match="modality: features datasets are not made from raw inputs"):
        run_etl(spark, load_config(EtlConfig, "etl", [*etl_overrides, "modality=features"]))


def test_rows_whose_features_are_not_finite_are_quarantined_and_counted(spark, fashion_small, registry, tmp_path):
    """A backbone whose `big` layer overflows float32 exactly on the brighter images: those rows
    are quarantined with the reason, the others written, and the counts reconcile with the
    source, row for row as computed by hand."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    from deepspark.datasets import open_dataset

    inputs = tf.keras.Input((28, 28, 1), dtype="uint8")
    x = tf.keras.layers.Flatten()(tf.keras.layers.Rescaling(1.0)(inputs))
    big = tf.keras.layers.Dense(1, use_bias=False, kernel_initializer=tf.keras.initializers.Constant(1e34),
                                name="big")(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, activation="softmax", name="out")(big))
    path = tmp_path / "overflowing.keras"
    model.save(path)
    result = featurize(spark, fashion_small, registry, tmp_path, f"backbone={path}")
    assert [f["name"] for f in result.manifest["lineage"]["layers"]] == ["big"]  # the layer feeding the output

    source = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    sums = {p: int(np.frombuffer(t, np.uint8).astype(np.float64).sum())
            for split in source.manifest["splits"] for p, t in rows_of(source.url, split, "image").items()}
    limit = float(np.finfo(np.float32).max)
    overflow = {p for p, total in sums.items() if total * 1e34 > limit}
    borderline = {p for p, total in sums.items() if abs(total * 1e34 - limit) < 1e-3 * limit}  # float32 rounding
    assert 0 < len(overflow) < len(sums)
    totals = result.manifest["totals"]
    assert totals["quarantine_by_reason"] == {"non_finite_features": totals["quarantined"]}
    assert totals["rows_written"] + totals["quarantined"] == totals["inputs_in"] == len(sums)
    quarantine = pq.read_table(f"{result.url.replace('file:', '', 1)}/quarantine").to_pylist()
    assert {row["path"] for row in quarantine} - borderline == overflow - borderline
    assert len(quarantine) == totals["quarantined"]
    assert {row["reason"] for row in quarantine} == {"non_finite_features"}


def test_a_missing_source_dataset_fails_naming_the_key(spark, fashion_small, registry, tmp_path):
    with pytest.raises(ConfigError, match=r"source.name: 'nope' under .*no complete version"):
        featurize(spark, fashion_small, registry, tmp_path, "source.name=nope")
