"""The registered model: a Keras classifier wrapped with its modality's own preprocessing.

Training logs every model as an MLflow pyfunc of this class, holding the Keras model and the
modality record (modality, stored tensor, rules, fitted state such as a text vocabulary, labels).
So `mlflow.pyfunc.load_model(uri).predict(["a fine film", ...])` scores raw text, and file bytes
for images and audio, with exactly the ETL's preprocessing; batch inference loads the same
object on every Python worker and calls the same methods. There is no second implementation of
the preprocessing to drift from the first.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np
from mlflow.pyfunc.model import PythonModel

from deepspark.config import ConfigError
from deepspark.modality import Failure, ModalityRecord, preprocess_all

KERAS_ARTIFACT = "keras_model"
RECORD_ARTIFACT = "modality"
RECORD_FILE = "modality.json"
REFERENCE_ARTIFACT = "drift_reference"  # deepspark.monitoring.REFERENCE_FILE, captured at registration
BUILDER_KEY = "builder"  # the record file's key naming the model's builder (its `module:attr` reference)
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
INPUT_COLUMN = {"text": "text"}  # images and audio take file bytes in a `content` column


def input_column(modality: str) -> str:
    return INPUT_COLUMN.get(modality, "content")


class ModalityClassifier(PythonModel):
    """Raw inputs -> predicted label and probability; bad inputs get a quarantine reason instead."""

    record: ModalityRecord
    keras_model: Any
    # The logged signature is the schema; MLflow's type-hint validation (and its warning asking
    # for hints at class definition) would add a second one.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts[KERAS_ARTIFACT], context.artifacts[RECORD_ARTIFACT])

    def load(self, keras_path: str, record_path: str) -> "ModalityClassifier":
        """The record file also names the model's builder (models logged before builders existed
        do not): its module is imported first, so the custom layers it registers (Keras'
        register_keras_serializable) deserialise. MLflow has put the user's code, logged with the
        model, on the path already."""
        import importlib

        import tensorflow as tf

        with open(record_path) as fh:
            data = json.load(fh)
        refs = data.get(BUILDER_KEY) or []
        for ref in [refs] if isinstance(refs, str) else refs:  # a composed model names each part's builder
            importlib.import_module(str(ref).partition(":")[0])
        self.record = ModalityRecord.from_dict(data)
        plugin = self.record.plugin
        self.keras_model = tf.keras.models.load_model(keras_path, compile=False, custom_objects=plugin.custom_objects())
        self._preprocess = plugin.preprocessor(self.record.typed_rules(), self.record.state)
        return self

    def preprocess(self, payloads: Sequence[Any]) -> tuple[list[np.ndarray | None], list[Failure | None]]:
        """Raw inputs -> tensors exactly as the ETL made them; failures as (reason, detail)."""
        return preprocess_all(self._preprocess, payloads)

    def probabilities(self, tensors: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities of stored-form tensors, in fixed-size chunks (one compiled graph)."""
        out = [np.asarray(p) for p in _in_chunks(self.keras_model, tensors, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.record.labels)), np.float32)

    def scores(self, tensors: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and penultimate-layer vectors (what drift monitoring compares) in
        one forward pass, in fixed-size chunks; vectors are None for a model whose last layer has
        no single input to read."""
        if getattr(self, "_both", False) is False:
            self._both = with_embeddings(self.keras_model)
        if self._both is None or not len(tensors):
            return self.probabilities(tensors, batch_size), None
        return _split_outputs(_in_chunks(self._both, tensors, batch_size), len(tensors))

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """A DataFrame with a `text` (text) or `content` (file bytes) column, or a list of them ->
        `predicted_label, probability, reason` per input. (No type hints: MLflow would read them
        as a schema of their own; the signature logged with the model is the schema.)"""
        import pandas as pd

        payloads = _payloads(model_input, input_column(self.record.modality))
        tensors, failures = self.preprocess(payloads)
        good = [i for i, t in enumerate(tensors) if t is not None]
        probs = self.probabilities(np.stack([tensors[i] for i in good])) if good else None
        labels: list[str | None] = [None] * len(payloads)
        best: list[float | None] = [None] * len(payloads)
        if probs is not None:
            for row, i in enumerate(good):
                labels[i] = self.record.labels[int(probs[row].argmax())]
                best[i] = float(probs[row].max())
        return pd.DataFrame({"predicted_label": labels, "probability": best,
                             "reason": [f[0] if f else None for f in failures]})


def with_embeddings(keras_model: Any) -> Any:
    """The classifier with a second output: the input of its output layer (the layer named
    `probabilities` that every built-in builder ends with, else the last layer), the embedding
    the classifier decides on. None where that is not one tensor of the same graph."""
    import tensorflow as tf

    try:
        layer = keras_model.get_layer("probabilities")
    except ValueError:
        layer = keras_model.layers[-1]
    try:
        inner = layer.input
        if isinstance(inner, (list, tuple)):
            return None
        return tf.keras.Model(keras_model.inputs, [keras_model.outputs[0], inner])
    except (AttributeError, ValueError):  # a nested or subclassed model: no embedding to read
        return None


def _in_chunks(model: Any, tensors: np.ndarray, batch_size: int) -> list[Any]:
    """`predict_on_batch` over fixed-size chunks (one compiled graph for all but the last)."""
    return [model.predict_on_batch(tensors[start : start + batch_size]) for start in range(0, len(tensors), batch_size)]


def _split_outputs(parts: list[Any], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A two-output model's chunks as (probabilities, embeddings flattened per row)."""
    return (np.concatenate([np.asarray(p) for p, _ in parts]),
            np.concatenate([np.asarray(e) for _, e in parts]).reshape(rows, -1))


def capture_reference(keras_model: Any, record: ModalityRecord, tensors: np.ndarray, batch_size: int = 512) -> Any:
    """The drift reference of `keras_model` on stored-form `tensors` (its test split), in one
    forward pass for probabilities and embeddings, as batch inference scores."""
    from deepspark.monitoring import Reference

    both = with_embeddings(keras_model)
    if both is None:
        probabilities = np.concatenate([np.asarray(p) for p in _in_chunks(keras_model, tensors, batch_size)])
        embeddings = None
    else:
        probabilities, embeddings = _split_outputs(_in_chunks(both, tensors, batch_size), len(tensors))
    statistics = record.plugin.input_statistics(tensors, record.typed_rules(), record.state)
    return Reference.capture(statistics, probabilities, embeddings, record.modality)


def _payloads(model_input: Any, column: str) -> list[Any]:
    """A DataFrame (its input column, else its only column), a Series, an array or a list."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if column in model_input.columns:
            return list(model_input[column])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(f"expected a {column!r} column, got {list(model_input.columns)}")
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return list(model_input)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    return list(model_input)


def resolve(model_uri: str, key: str = "model_uri") -> tuple[str, int, str]:
    """(name, version, run_id) for `models:/name@alias` or `models:/name/version`; raises naming
    `key` when the model, alias or version does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _URI.match(model_uri)
    if not match:
        raise ConfigError(f"{key}: {model_uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient()
    name = match["name"]
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as exc:
        raise ConfigError(f"{key}: {model_uri!r} does not resolve in the registry: {exc.message}") from None
    return name, int(mv.version), mv.run_id or ""  # a version registered from a path has no run


def log_classifier(keras_model: Any, record: ModalityRecord, registered_name: str | None, workdir: str,
                   builder: str | None = None, user_code: str | None = None,
                   reference_inputs: np.ndarray | None = None) -> Any:
    """Log `keras_model` with its modality record as the pyfunc `model` of the active run (and
    register it); the signature names the raw input the model takes. `builder` (the reference
    the model was built from) is imported before the model loads; `user_code` (its package, when
    it is the user's own) travels inside the model (MLflow's code_paths), so the model loads where
    that package is not installed. `reference_inputs` (test-split tensors) make the drift
    reference stored with the model, when the model serves the tensors its dataset holds."""
    import logging
    import os

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from deepspark.builders import user_code as code_of

    served, serving_record, refs = record.plugin.serving_model(keras_model, record, builder)
    artifacts = {}
    if reference_inputs is not None and len(reference_inputs) >= 2 and serving_record.spec == record.spec:
        from deepspark.monitoring import REFERENCE_FILE

        reference_path = os.path.join(workdir, REFERENCE_FILE)
        with open(reference_path, "w") as fh:
            fh.write(capture_reference(served, serving_record, reference_inputs).to_json())
        artifacts[REFERENCE_ARTIFACT] = reference_path
    elif reference_inputs is not None:
        logging.getLogger(__name__).info("no drift reference: the served model takes other inputs than the %s "
                                         "dataset holds", record.modality)
    keras_model, record = served, serving_record
    keras_path = os.path.join(workdir, "model.keras")
    keras_model.save(keras_path)
    record_path = os.path.join(workdir, RECORD_FILE)
    with open(record_path, "w") as fh:
        json.dump({**record.to_dict(), **({BUILDER_KEY: refs[0] if len(refs) == 1 else refs} if refs else {})}, fh)
    code_paths = sorted({p for p in [user_code, *(code_of(r) for r in refs)] if p})
    column = input_column(record.modality)
    signature = ModelSignature(
        # One unnamed column: a plain list of strings (or of file bytes) is a valid input, and so
        # is a one-column DataFrame whatever its column is called.
        inputs=Schema([ColSpec("string" if column == "text" else "binary")]),
        outputs=Schema([ColSpec("string", "predicted_label"), ColSpec("double", "probability"),
                        ColSpec("string", "reason", required=False)]),
    )
    return mlflow.pyfunc.log_model(
        name="model", python_model=ModalityClassifier(), signature=signature,
        artifacts={KERAS_ARTIFACT: keras_path, RECORD_ARTIFACT: record_path, **artifacts},
        registered_model_name=registered_name, pip_requirements=_requirements(),
        metadata={"deepspark.modality": record.modality, **({"deepspark.builder": refs[-1]} if refs else {})},
        code_paths=code_paths or None,
    )


def _requirements() -> list[str]:
    """The pinned stack the model runs on (explicit: MLflow's inference of it loads the model in a
    subprocess, which costs seconds and guesses)."""
    from importlib import metadata

    # tensorflow-cpu or, on a GPU install (`scripts/setup.sh --gpu`), tensorflow: whichever is here
    names = ("tensorflow-cpu", "tensorflow", "numpy", "pandas", "pyarrow", "mlflow", "pillow", "opencv-python-headless",
             "soundfile", "scipy")
    found = []
    for name in names:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found
