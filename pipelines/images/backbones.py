"""Pretrained Keras Applications backbones as image model builders (`build(record, **params)`):
MobileNetV2, EfficientNetB0 and ResNet50 with a new classification head.

Weights come only from a file the user gives (`model.params.weights`: the backbone's "notop" Keras
weights, local or on any storage pyarrow.fs reaches); nothing is downloaded, and without the key
the backbone starts from random weights. The stored uint8 image is resized, made RGB and
preprocessed the way each backbone expects inside the graph, so the registered model still scores
raw files. The backbone runs in inference mode (`training=False`: batch normalisation keeps its
statistics) and is frozen unless `trainable=true`; `unfreeze_from=<layer name>` trains that layer
and every one after it.

    spark-submit jobs/train.py model.builder=pipelines.images.backbones:mobilenet_v2 \\
      'model.params={weights: /models/mobilenet_v2_1.0_96_no_top.h5, input_size: 96}'
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from deepspark.config import ConfigError

if TYPE_CHECKING:
    from deepspark.modality import ModalityRecord

L = tf.keras.layers
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@tf.keras.utils.register_keras_serializable(package="deepspark")
class CaffePreprocess(tf.keras.layers.Layer):
    """ResNet50's input preprocessing in the graph: RGB in 0..255 -> BGR minus ImageNet's means."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return x[..., ::-1] - tf.constant(CAFFE_MEAN_BGR, dtype=x.dtype)


CUSTOM_OBJECTS = {"CaffePreprocess": CaffePreprocess}

# name -> (the Keras Applications constructor, its preprocessing as layers from 0..255 RGB floats)
APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", lambda: L.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")),
    "efficientnet_b0": ("EfficientNetB0", lambda: L.Rescaling(1.0, name="preprocess")),  # normalises inside
    "resnet50": ("ResNet50", lambda: CaffePreprocess(name="preprocess")),
}


def _weights_file(weights: str, tmp: str) -> str:
    """A local copy of the user's weights file (read through pyarrow.fs), or an error naming the key."""
    from deepspark import filesystem

    try:
        return filesystem.local_copy(weights, tmp)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.params.weights: cannot read {weights!r} ({exc}); backbone weights are never "
                          "downloaded: give the path of the backbone's no-top Keras weights file") from None


def _backbone_model(record: "ModalityRecord", name: str, weights: str | None, input_size: int, trainable: bool,
                    unfreeze_from: str | None, dropout: float, **application: Any) -> Any:
    constructor, preprocess = APPLICATIONS[name]
    backbone = getattr(tf.keras.applications, constructor)(
        include_top=False, weights=None, input_shape=(input_size, input_size, 3), **application)
    if weights:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                backbone.load_weights(_weights_file(weights, tmp))
            except ValueError as exc:
                raise ConfigError(f"model.params.weights: {weights!r} does not fit {constructor} "
                                  f"(input_size={input_size}, {application}): {exc}") from None
    backbone.trainable = trainable or unfreeze_from is not None
    if unfreeze_from is not None:
        names = [layer.name for layer in backbone.layers]
        if unfreeze_from not in names:
            raise ConfigError(f"model.params.unfreeze_from: {constructor} has no layer {unfreeze_from!r} "
                              f"(its last layers: {', '.join(names[-5:])})")
        start = names.index(unfreeze_from)
        for layer in backbone.layers[:start]:
            layer.trainable = False
    inputs = tf.keras.Input(shape=record.spec.shape, dtype="uint8", name="image")
    x = L.Rescaling(1.0, name="to_float")(inputs)  # uint8 -> float32, 0..255
    x = L.Resizing(input_size, input_size, name="resize")(x)
    if record.spec.shape[-1] == 1:
        x = L.Concatenate(name="gray_to_rgb")([x, x, x])
    x = preprocess()(x)
    x = backbone(x, training=False)  # batch normalisation in inference mode, frozen or not
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dropout(dropout, name="head_dropout")(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name=f"{name}_classifier")


def mobilenet_v2(record: "ModalityRecord", weights: str | None = None, input_size: int = 96, alpha: float = 1.0,
                 trainable: bool = False, unfreeze_from: str | None = None, dropout: float = 0.2) -> Any:
    """MobileNetV2 (`alpha`: width multiplier) at `input_size` px with a softmax head."""
    return _backbone_model(record, "mobilenet_v2", weights, input_size, trainable, unfreeze_from, dropout, alpha=alpha)


def efficientnet_b0(record: "ModalityRecord", weights: str | None = None, input_size: int = 96,
                    trainable: bool = False, unfreeze_from: str | None = None, dropout: float = 0.2) -> Any:
    """EfficientNetB0 at `input_size` px with a softmax head (it normalises its input itself)."""
    return _backbone_model(record, "efficientnet_b0", weights, input_size, trainable, unfreeze_from, dropout)


def resnet50(record: "ModalityRecord", weights: str | None = None, input_size: int = 96, trainable: bool = False,
             unfreeze_from: str | None = None, dropout: float = 0.2) -> Any:
    """ResNet50 at `input_size` px (caffe-style preprocessing in the graph) with a softmax head."""
    return _backbone_model(record, "resnet50", weights, input_size, trainable, unfreeze_from, dropout)
