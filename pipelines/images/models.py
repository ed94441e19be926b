"""The image models. Every model takes the stored uint8 tensor (H, W, C) and normalises
inside the graph, so training, the registered model and inference see the same input."""

from __future__ import annotations

from typing import Callable


def _normalise(inputs):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    return tf.keras.layers.Rescaling(1.0 / 255, name="normalise")(inputs)


def convnet(input_shape: tuple[int, int, int], num_classes: int):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    L = tf.keras.layers
    inputs = tf.keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = _normalise(inputs)
    x = L.Conv2D(32, 3, activation="relu")(x)
    x = L.Conv2D(64, 3, activation="relu")(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Dropout(0.25)(x)
    x = L.Flatten()(x)
    x = L.Dense(128, activation="relu")(x)
    x = L.Dropout(0.5)(x)
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="convnet")


def mlp(input_shape: tuple[int, int, int], num_classes: int):  # type: ignore[no-untyped-def]
    """A small dense network: the kind of model many configurations of train side by side."""
    import tensorflow as tf

    L = tf.keras.layers
    inputs = tf.keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = L.Flatten()(_normalise(inputs))
    x = L.Dense(128, activation="relu")(x)
    x = L.Dropout(0.2)(x)
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="mlp")


def resnet_small(input_shape: tuple[int, int, int], num_classes: int):  # type: ignore[no-untyped-def]
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

    inputs = tf.keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = _normalise(inputs)
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    for stage, filters in enumerate((16, 32, 64)):
        x = block(x, filters, 1 if stage == 0 else 2)
        x = block(x, filters, 1)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="resnet_small")


BUILDERS: dict[str, Callable] = {"convnet": convnet, "mlp": mlp, "resnet_small": resnet_small}
