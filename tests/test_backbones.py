"""Keras Applications backbones as image builders (pipelines/images/backbones.py): weights only from
the user's file (never a download), the backbone frozen and in inference mode, preprocessing in the
graph so the model takes the stored uint8 image, and the saved model loading back. Real Keras, no
Spark; small widths and inputs keep it quick."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from deepspark import builders
from deepspark.config import ConfigError
from deepspark.modality import ModalityRecord, TensorSpec

RECORD = ModalityRecord("image", TensorSpec("image", (28, 28, 1), "uint8"), {}, {}, tuple("abcd"))
MOBILENET = "pipelines.images.models:mobilenet_v2"


def backbone_of(model):
    return next(layer for layer in model.layers if isinstance(layer, tf.keras.Model))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A no-top MobileNetV2 weights file of the user's (random here: nothing may be downloaded)."""
    tf.keras.utils.set_random_seed(3)
    net = tf.keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35_32_no_top.h5"
    net.save_weights(path)
    return path, net.get_weights()


def test_the_backbone_starts_from_the_users_file_and_takes_the_stored_image(weights_file):
    path, expected = weights_file
    model = builders.checked(MOBILENET, RECORD, {"weights": str(path), "input_size": 32, "alpha": 0.35}, "model.name")
    got = backbone_of(model).get_weights()
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    fresh = backbone_of(builders.build(MOBILENET, RECORD, {"input_size": 32, "alpha": 0.35})).get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, expected))  # without the key: random weights


def test_a_missing_or_misfit_weights_file_names_the_key(weights_file, tmp_path):
    with pytest.raises(ConfigError, match=r"model.params.weights: cannot read .*nowhere.h5.*never downloaded"):
        builders.checked(MOBILENET, RECORD, {"weights": str(tmp_path / "nowhere.h5"), "input_size": 32},
                         "model.name")
    with pytest.raises(ConfigError, match=r"model.params.weights: .* does not fit MobileNetV2"):
        builders.checked(MOBILENET, RECORD, {"weights": str(weights_file[0]), "input_size": 32, "alpha": 1.0},
                         "model.name")
    with pytest.raises(ConfigError, match=r"model.params.unfreeze_from: MobileNetV2 has no layer 'block_99'"):
        builders.checked(MOBILENET, RECORD, {"input_size": 32, "alpha": 0.35, "unfreeze_from": "block_99"},
                         "model.name")


def fit_once(model):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8), rng.integers(0, 4, 16)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("params, moved", [
    ({}, set()),  # frozen: only the head learns; batch normalisation keeps its statistics
    ({"unfreeze_from": "block_16_project"}, {"block_16_project", "block_16_project_BN", "Conv_1", "Conv_1_bn"}),
])
def test_only_what_is_unfrozen_trains(params, moved):
    model = builders.checked(MOBILENET, RECORD, {"input_size": 32, "alpha": 0.35, **params}, "model.name")
    backbone = backbone_of(model)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers}
    head = [w.copy() for w in model.get_layer("probabilities").get_weights()]
    fit_once(model)
    changed = {layer.name for layer in backbone.layers
               if any(not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))}
    assert changed == moved
    for layer in backbone.layers:  # batch norm in inference mode: moving statistics stay, trained or not
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            assert np.array_equal(mean, before[layer.name][2]) and np.array_equal(variance, before[layer.name][3])
    assert not np.array_equal(head[0], model.get_layer("probabilities").get_weights()[0])


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet50"])
def test_every_backbone_saves_and_loads_with_its_preprocessing(tmp_path, name):
    model = builders.checked(f"pipelines.images.models:{name}", RECORD, {"input_size": 32}, "model.name")
    x = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert model.get_layer("preprocess") is not None  # the backbone's own preprocessing is in the graph
