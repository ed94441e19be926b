"""Heads over a features dataset (builders of the `deepspark.builders` contract), and the
backbone side of feature transfer: the frozen feature extractor the featurize job runs and the
registered model composes with the head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import tensorflow as tf

from deepspark.config import ConfigError
from pipelines.features.modality import layer_slice

if TYPE_CHECKING:
    from deepspark.modality import ModalityRecord

L = tf.keras.layers
POOLING = ("avg", "max")


@tf.keras.utils.register_keras_serializable(package="deepspark")
class FeatureSlice(tf.keras.layers.Layer):
    """(N, width) -> (N, size): the part of the stored vector one backbone layer wrote."""

    def __init__(self, offset: int = 0, size: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset, self.size = int(offset), int(size)

    def call(self, x):  # type: ignore[no-untyped-def]
        return x[:, self.offset : self.offset + self.size]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "offset": self.offset, "size": self.size}


CUSTOM_OBJECTS = {"FeatureSlice": FeatureSlice}


def _features(record: "ModalityRecord", layer: str | None):  # type: ignore[no-untyped-def]
    inputs = tf.keras.Input(shape=record.spec.shape, dtype="float32", name="features")
    part = layer_slice(record, layer)
    x = inputs if part.size == record.spec.shape[0] else FeatureSlice(part.offset, part.size, name="layer")(inputs)
    return inputs, x


def linear(record: "ModalityRecord", layer: str | None = None, dropout: float = 0.0):  # type: ignore[no-untyped-def]
    """Softmax regression on the features of `layer` (default: every recorded layer)."""
    inputs, x = _features(record, layer)
    if dropout:
        x = L.Dropout(float(dropout))(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="linear_head")


def mlp(record: "ModalityRecord", layer: str | None = None, units: int = 128,  # type: ignore[no-untyped-def]
        dropout: float = 0.3):
    """One hidden layer of `units` with `dropout`, on the features of `layer`."""
    inputs, x = _features(record, layer)
    x = L.Dense(int(units), activation="relu")(x)
    x = L.Dropout(float(dropout))(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="mlp_head")


def default_layer(backbone: Any) -> str:
    """The layer feeding the output layer (past any dropout): the usual transfer layer."""
    for layer in reversed(backbone.layers[:-1]):
        if not isinstance(layer, L.Dropout):
            return str(layer.name)
    raise ConfigError("layers: the backbone has no layer before its output to take features from")


def extractor(backbone: Any, layers: Sequence[str], pooling: str = "avg", key: str = "layers"):  # type: ignore[no-untyped-def]
    """The frozen feature extractor: the backbone's input -> each named layer's output, pooled over
    its spatial or time axes (`pooling`) and flattened, concatenated in order as float32."""
    if pooling not in POOLING:
        raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLING)}")
    names = [layer.name for layer in backbone.layers]
    outputs = []
    for name in layers:
        if name not in names:
            raise ConfigError(f"{key}: the backbone {backbone.name!r} has no layer {name!r} (has {', '.join(names)})")
        out = backbone.get_layer(name).output
        if isinstance(out, (list, tuple)):
            raise ConfigError(f"{key}: layer {name!r} has {len(out)} outputs; name a layer with one")
        if len(out.shape) > 2:
            pooled = L.GlobalAveragePooling1D if pooling == "avg" else L.GlobalMaxPooling1D
            out = pooled(name=f"pool_{name}")(L.Reshape((-1, out.shape[-1]), name=f"positions_{name}")(out))
        outputs.append(L.Activation("linear", dtype="float32", name=f"features_{name}")(out))
    joined = outputs[0] if len(outputs) == 1 else L.Concatenate(name="features")(outputs)
    model = tf.keras.Model(backbone.inputs, joined, name=f"{backbone.name}_features")
    model.trainable = False
    return model


def load_backbone(source: str, record: "ModalityRecord", key: str = "backbone"):  # type: ignore[no-untyped-def]
    """The Keras model of a registered model (models:/name/version, as DeepSpark logged it) or of a
    Keras model file on any storage pyarrow.fs reaches; errors name `key`."""
    import tempfile

    from deepspark import filesystem

    if source.startswith("models:/"):
        import mlflow.pyfunc

        try:
            return mlflow.pyfunc.load_model(source).unwrap_python_model().keras_model
        except Exception as exc:
            raise ConfigError(f"{key}: {source!r} does not load as a DeepSpark registered model ({exc})") from None
    if not source.endswith((".keras", ".h5")) or source.endswith(".weights.h5"):
        raise ConfigError(f"{key}: {source!r} is neither models:/... nor a Keras model file (.keras, .h5)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = filesystem.local_copy(source, tmp)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot read {source!r} ({exc})") from None
        return tf.keras.models.load_model(local, compile=False, custom_objects=record.plugin.custom_objects())
