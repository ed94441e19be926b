"""The modality seam: image, text and audio are three plug-ins of one small interface.

A modality says what one stored tensor looks like (`TensorSpec`), how raw inputs of its kind
are turned into that tensor or a quarantine reason (`preprocess`, never raising on bad data),
what it fits on the train split (a text vocabulary; nothing for images and audio), how the
stored column is encoded and decoded, and which Keras models take its tensor. The ETL writer,
the training loader, the registered MLflow model and the batch-inference UDF all go through the
same plug-in, so what is trained on is exactly what is served (Petastorm's Unischema idea).

Plug-ins live in `pipelines/<modality>/modality.py` and are found by name (`get_modality`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Sequence, TypeVar

import numpy as np

from deepspark.config import ConfigError
from deepspark.plugins import Registry

if TYPE_CHECKING:
    import pyarrow as pa
    from petastorm.unischema import Unischema
    from pyspark.sql import DataFrame, SparkSession

Failure = tuple[str, str]  # (quarantine reason, detail)
InputKind = Literal["files", "records"]
Preprocess = Callable[[Any], "tuple[np.ndarray | None, Failure | None]"]

# Reasons every modality shares; each plug-in adds its own.
EMPTY = "empty_file"
NO_LABEL = "no_label"
UNREADABLE = "unreadable"

# Columns of every stored row besides the modality's tensor column.
LABEL = "label"
LABEL_NAME = "label_name"
PATH = "path"
CONTENT_HASH = "content_hash"
QUARANTINE_COLUMNS = ("path", "size", "reason", "detail")
QUARANTINE_DDL = "path string, size long, reason string, detail string"

PLUGINS: Mapping[str, str] = {
    "image": "pipelines.images.modality:IMAGE",
    "text": "pipelines.text.modality:TEXT",
    "audio": "pipelines.audio.modality:AUDIO",
    "features": "pipelines.features.modality:FEATURES",
}
MODALITIES = Registry("modality", "deepspark.modalities", PLUGINS)


class BadInput(Exception):
    """An input that cannot become a row; `reason` names the quarantine reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


T = TypeVar("T")


def or_reason(convert: Callable[[Any], T], payload: Any) -> tuple[T | None, Failure | None]:
    """`convert(payload)` that never raises on bad data: (tensor, None) or (None, (reason, detail)).
    One bad input, or a decoder bug, becomes a quarantine row, never a failed job; MemoryError is
    transient (the same input may fit next time), so it fails the task instead."""
    try:
        return convert(payload), None
    except BadInput as bad:
        return None, (bad.reason, bad.detail)
    except MemoryError:
        raise
    except Exception as exc:
        return None, (UNREADABLE, f"{type(exc).__name__}: {exc}")


def preprocess_all(preprocess: Preprocess, payloads: Sequence[Any]
                   ) -> tuple[list[np.ndarray | None], list[Failure | None]]:
    """A batch through one preprocessor: tensors (None where it failed) and failures (None where
    it did not), position by position."""
    results = [preprocess(payload) for payload in payloads]
    return [tensor for tensor, _ in results], [failure for _, failure in results]


def content_hash(data: bytes | str | None) -> str:
    """sha256 of an input's bytes; a text record hashes its UTF-8 encoding, and a null text hashes
    as the empty string (batch inference's Spark-side key, `sha2(coalesce(payload, ''))`, agrees,
    so a null record is scored once, not on every run)."""
    if data is None:
        data = ""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor per row: its column, per-row shape, dtype and encoding. Recorded in the
    manifest and in the registered model."""

    column: str
    shape: tuple[int, ...]
    dtype: str  # a numpy dtype name: uint8, int16, int32
    encoding: str = "raw"  # raw tensor bytes (C order); images may use "png"

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "shape": list(self.shape), "dtype": self.dtype, "encoding": self.encoding}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(data["column"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]),
                   str(data.get("encoding", "raw")))

    def row_ddl(self) -> str:
        """Spark DDL of a written row, in the Unischema's field order."""
        return f"{self.column} binary, {LABEL} int, {LABEL_NAME} string, {PATH} string, {CONTENT_HASH} string"

    @property
    def data_columns(self) -> tuple[str, ...]:
        return (self.column, LABEL, LABEL_NAME, PATH, CONTENT_HASH)


def encode_raw(tensor: np.ndarray, spec: TensorSpec) -> bytes:
    if tensor.shape != spec.shape or tensor.dtype != np.dtype(spec.dtype):
        raise ValueError(f"expected {spec.dtype} {spec.shape}, got {tensor.dtype} {tensor.shape}")
    return np.ascontiguousarray(tensor).tobytes()


def decode_raw(values: Sequence[bytes], spec: TensorSpec) -> np.ndarray:
    """Stored bytes of a batch -> (N, *shape), one copy."""
    joined = b"".join(values)
    if len(joined) != len(values) * spec.row_bytes:
        raise ValueError(f"raw {spec.column} bytes do not match {spec.dtype} {spec.shape}")
    return np.frombuffer(joined, dtype=spec.dtype).reshape((len(values), *spec.shape))


def decode_raw_arrow(column: "pa.Array | pa.ChunkedArray", spec: TensorSpec) -> np.ndarray:
    """A pyarrow binary column of raw tensors -> (N, *shape) without a Python object per row:
    the values buffer already holds the rows back to back."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if len(chunk) and not np.all(np.diff(offsets) == spec.row_bytes):
            raise ValueError(f"raw {spec.column} bytes do not match {spec.dtype} {spec.shape}")
        values = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        parts.append(values.view(spec.dtype).reshape((len(chunk), *spec.shape)))
    if not parts:
        return np.empty((0, *spec.shape), spec.dtype)
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def unischema(spec: TensorSpec, modality: str = "image") -> "Unischema":
    """The Petastorm Unischema of a dataset written with `spec`."""
    from petastorm.codecs import ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    shape = "x".join(str(d) for d in spec.shape)
    kind = re.sub(r"\W", "_", modality)  # Petastorm names a namedtuple after it: a plug-in's reference has dots
    return Unischema(
        f"DeepSpark_{kind}_{spec.encoding}_{spec.dtype}_{shape}",
        [
            UnischemaField(spec.column, np.bytes_, (), ScalarCodec(BinaryType()), False),
            UnischemaField(LABEL, np.int32, (), ScalarCodec(IntegerType()), False),
            UnischemaField(LABEL_NAME, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(PATH, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(CONTENT_HASH, np.str_, (), ScalarCodec(StringType()), False),
        ],
    )


def rules_to_dict(rules: Any) -> dict[str, Any]:
    return dataclasses.asdict(rules)


class Modality(ABC):
    """One kind of unstructured input. Subclasses are stateless singletons; everything a run
    decides (rules, fitted state) is passed in, so a plug-in pickles to executors as its class."""

    name: ClassVar[str]
    rules_type: ClassVar[type]
    input_kinds: ClassVar[tuple[InputKind, ...]] = ("files",)
    default_glob: ClassVar[str]
    default_model: ClassVar[str]

    def __reduce__(self) -> tuple[type["Modality"], tuple[()]]:
        # Stateless: a plug-in travels to executors as its class (by module and name), built in or
        # a user's registered by entry point or reference alike.
        return type(self), ()

    # --- the stored tensor -------------------------------------------------------------------
    @abstractmethod
    def spec(self, rules: Any, state: Mapping[str, Any]) -> TensorSpec:
        """The stored tensor for these rules and this fitted state."""

    def encode(self, tensor: np.ndarray, spec: TensorSpec) -> bytes:
        return encode_raw(tensor, spec)

    def decode(self, values: Sequence[bytes], spec: TensorSpec) -> np.ndarray:
        return decode_raw(values, spec)

    def decode_arrow(self, column: "pa.Array | pa.ChunkedArray", spec: TensorSpec) -> np.ndarray:
        if spec.encoding != "raw":
            return self.decode(column.to_pylist(), spec)
        return decode_raw_arrow(column, spec)

    # --- preprocessing -----------------------------------------------------------------------
    def rules_from_dict(self, data: Mapping[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(self.rules_type)}
        return self.rules_type(**{k: v for k, v in data.items() if k in fields})

    def fit(self, spark: "SparkSession", train_payloads: "DataFrame", rules: Any) -> dict[str, Any]:
        """State learned from the train split's payloads (column `payload`); none by default."""
        return {}

    @abstractmethod
    def preprocessor(self, rules: Any, state: Mapping[str, Any]) -> Preprocess:
        """Built once per task: one raw input -> (tensor, None) or (None, (reason, detail)). Never
        raises on bad data (a decoder bug becomes an `unreadable` row too); MemoryError propagates,
        since a transient failure must not become a permanent quarantine row."""

    def input_statistics(self, tensors: np.ndarray, rules: Any, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Per-row numbers that describe inputs as stored, which drift monitoring compares with the
        model's test split (`deepspark.monitoring`): by default each tensor's mean and spread. A
        modality names what its users would look at (brightness, length in tokens, loudness)."""
        flat = np.asarray(tensors).reshape(len(tensors), -1).astype(np.float32)
        return {"mean": flat.mean(axis=1), "spread": flat.std(axis=1)}

    # --- models ------------------------------------------------------------------------------
    # The catalogue: model name -> one-line description (no TensorFlow needed). Each name is a
    # builder `<models_module>:<name>` of the `deepspark.builders` contract, build(record, **params).
    models: ClassVar[Mapping[str, str]]
    models_module: ClassVar[str]  # holds the builders and CUSTOM_OBJECTS; imports TensorFlow

    def _models(self) -> Any:
        """The Keras models module, imported only when a model is built or loaded."""
        return importlib.import_module(self.models_module)

    def custom_objects(self) -> dict[str, Any]:
        """Keras layers the saved model needs to load."""
        return dict(getattr(self._models(), "CUSTOM_OBJECTS", {}))

    def serving_model(self, keras_model: Any, record: "ModalityRecord", builder: str | None
                      ) -> "tuple[Any, ModalityRecord, list[str]]":
        """What gets registered for a model trained on this modality's dataset: the Keras model,
        the record it serves with, and the builders whose modules it needs imported to load. As
        trained, by default; a derived modality (features) composes the model it derives from."""
        return keras_model, record, [builder] if builder else []


def get_modality(name: str, key: str = "modality") -> Modality:
    """The plug-in for `name`: a built-in modality, one an installed package registers under the
    entry-point group `deepspark.modalities`, or a `module:attr` reference; errors name `key`."""
    plugin = MODALITIES.load(name, key)
    if not isinstance(plugin, Modality):
        raise ConfigError(f"{key}: {name!r} is not a deepspark.modality.Modality (got {type(plugin).__name__})")
    return plugin


@dataclass(frozen=True)
class ModalityRecord:
    """What a dataset version and a registered model both carry, so that inference needs nothing
    but the model URI: the modality, its stored tensor, its preprocessing rules, its fitted state
    and the label vocabulary."""

    modality: str
    spec: TensorSpec
    rules: Mapping[str, Any]
    state: Mapping[str, Any]
    labels: tuple[str, ...]

    @property
    def plugin(self) -> Modality:
        return get_modality(self.modality)

    def typed_rules(self) -> Any:
        return self.plugin.rules_from_dict(self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "spec": self.spec.to_dict(), "rules": dict(self.rules),
                "state": dict(self.state), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModalityRecord":
        return cls(str(data["modality"]), TensorSpec.from_dict(data["spec"]), dict(data["rules"]),
                   dict(data.get("state") or {}), tuple(data["labels"]))
