"""The image models, builders of the `deepspark.builders` contract: `build(record, **params)`.
Every model takes the stored uint8 tensor (H, W, C) and normalises inside the graph, so training,
the registered model and inference see the same input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from deepspark.modality import ModalityRecord


def _normalise(inputs):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    return tf.keras.layers.Rescaling(1.0 / 255, name="normalise")(inputs)


def convnet(record: "ModalityRecord", filters: Sequence[int] = (32, 64), dense: int = 128,  # type: ignore[no-untyped-def]
            dropout: float = 0.5):
    """Keras' classic mnist_cnn: a 3x3 convolution per entry of `filters`, max-pooling, a dense
    layer of `dense` units and `dropout` before the output."""
    import tensorflow as tf

    L = tf.keras.layers
    inputs = tf.keras.Input(shape=record.spec.shape, dtype="uint8", name="image")
    x = _normalise(inputs)
    for i, width in enumerate(filters, 1):  # named layers: feature transfer picks them by name
        x = L.Conv2D(int(width), 3, activation="relu", name=f"conv{i}")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Dropout(0.25, name="pool_dropout")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(dense, activation="relu", name="dense")(x)
    x = L.Dropout(dropout, name="dropout")(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="convnet")


def mlp(record: "ModalityRecord", units: int = 128, dropout: float = 0.2):  # type: ignore[no-untyped-def]
    """A small dense network: the kind of model many configurations of train side by side."""
    import tensorflow as tf

    L = tf.keras.layers
    inputs = tf.keras.Input(shape=record.spec.shape, dtype="uint8", name="image")
    x = L.Flatten(name="flatten")(_normalise(inputs))
    x = L.Dense(units, activation="relu", name="dense")(x)
    x = L.Dropout(dropout, name="dropout")(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="mlp")


def resnet_small(record: "ModalityRecord", widths: Sequence[int] = (16, 32, 64)):  # type: ignore[no-untyped-def]
    """Three stages of two residual blocks, one stage per entry of `widths` (filters)."""
    import tensorflow as tf

    L = tf.keras.layers

    def block(x, filters: int, stride: int):  # type: ignore[no-untyped-def]
        shortcut = x
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = L.BatchNormalization()(y)
        y = L.ReLU()(y)
        y = L.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = L.BatchNormalization()(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
            shortcut = L.BatchNormalization()(shortcut)
        return L.ReLU()(L.Add()([y, shortcut]))

    inputs = tf.keras.Input(shape=record.spec.shape, dtype="uint8", name="image")
    x = _normalise(inputs)
    x = L.Conv2D(int(widths[0]), 3, padding="same", use_bias=False)(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    for stage, filters in enumerate(widths):
        x = block(x, int(filters), 1 if stage == 0 else 2)
        x = block(x, int(filters), 1)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="resnet_small")


# The pretrained Keras Applications backbones, by name in the image catalogue too (weights from a file).
from pipelines.images.backbones import CUSTOM_OBJECTS, efficientnet_b0, mobilenet_v2, resnet50  # noqa: E402

__all__ = ["CUSTOM_OBJECTS", "convnet", "efficientnet_b0", "mlp", "mobilenet_v2", "resnet50", "resnet_small"]
