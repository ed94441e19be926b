"""The features plug-in (Vista's feature transfer): each row is a float32 vector, the pooled
outputs of one or more named layers of a frozen backbone over a source dataset's stored tensor,
laid end to end. A features dataset is written by `jobs/featurize.py`, never from raw files; its
fitted state is the lineage (source record, backbone, layers with their place in the vector).

A head trained on it is registered composed with its backbone (`serving_model`): the registered
model takes the source modality's raw inputs and preprocessing, like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from deepspark.config import ConfigError
from deepspark.modality import Modality, ModalityRecord, Preprocess, TensorSpec

COLUMN = "features"
NOT_RAW = "not_raw_input"


@dataclass(frozen=True)
class FeatureRules:
    """Nothing to choose at preprocessing: the featurize job decides everything (its state)."""


@dataclass(frozen=True)
class FeatureLayer:
    """One backbone layer's pooled output: `size` floats from `offset` in the stored vector."""

    name: str
    offset: int
    size: int


def layers_of(state: Mapping[str, Any]) -> list[FeatureLayer]:
    return [FeatureLayer(str(d["name"]), int(d["offset"]), int(d["size"])) for d in state["layers"]]


def layer_slice(record: ModalityRecord, layer: str | None) -> FeatureLayer:
    """The part of the vector a head reads: `layer` by name, or (None) the whole vector."""
    found = layers_of(record.state)
    if layer is None:
        return FeatureLayer("all", 0, int(record.spec.shape[0]))
    for candidate in found:
        if candidate.name == layer:
            return candidate
    raise ConfigError(f"model.params.layer: {layer!r} is not among the dataset's feature layers "
                      f"({', '.join(f.name for f in found)})")


class FeaturesModality(Modality):
    name = "features"
    rules_type = FeatureRules
    input_kinds = ()  # written by jobs/featurize.py from a dataset version, not from raw inputs
    default_glob = ""
    default_model = "linear"
    models = {
        "linear": "softmax regression on the features (of one layer: model.params.layer)",
        "mlp": "one hidden dense layer with dropout on the features (of one layer: model.params.layer)",
    }
    models_module = "pipelines.features.models"

    def spec(self, rules: FeatureRules, state: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(COLUMN, (sum(f.size for f in layers_of(state)),), "float32")

    def preprocessor(self, rules: FeatureRules, state: Mapping[str, Any]) -> Preprocess:
        def refuse(payload: Any) -> tuple[None, tuple[str, str]]:
            return None, (NOT_RAW, "features come from jobs/featurize.py; the registered model takes raw inputs")

        return refuse

    def serving_model(self, keras_model: Any, record: ModalityRecord, builder: str | None
                      ) -> tuple[Any, ModalityRecord, list[str]]:
        """backbone (truncated at the recorded layers, pooled as featurized) then the head: a model
        of the source modality, so it scores raw inputs with the source's preprocessing."""
        import tensorflow as tf

        from pipelines.features.models import extractor, load_backbone

        state = record.state
        source = ModalityRecord.from_dict(state["source"])
        backbone = load_backbone(str(state["backbone"]["uri"]), source)
        features = extractor(backbone, [f.name for f in layers_of(state)], str(state["pooling"]))
        composed = tf.keras.Model(features.inputs, keras_model(features.outputs[0]), name=f"{keras_model.name}_on_backbone")
        refs = [r for r in (state["backbone"].get("builder"), builder) if r]
        return composed, ModalityRecord(source.modality, source.spec, source.rules, source.state, record.labels), refs


FEATURES = FeaturesModality()
