"""Model builders: one contract for the built-in models and a user's own.

A builder is a function `build(record: ModalityRecord, **params) -> tf.keras.Model`: a fresh,
uncompiled model that takes the dataset's stored tensor as it is (`record.spec`: shape, dtype) and
outputs probabilities over `record.labels`; `record` also holds the preprocessing rules and the
fitted state (a text vocabulary). Training configs name one with `model.builder`
("package.module:function", or a name registered under the entry-point group
`deepspark.model_builders`) or with `model.name` (the dataset modality's catalogue: convnet, cnn,
...), and pass it `model.params`.

The driver builds the model once before any task and checks it against the dataset (`checked`).
A builder from the user's own code (not installed, not this project's) travels with the job: to
the executors as a zip (`SparkContext.addPyFile`) and into the registered model (MLflow's
`code_paths`), so the model loads where that code is not installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import io
import os
import site
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from deepspark.config import ConfigError
from deepspark.modality import Modality, ModalityRecord
from deepspark.plugins import Registry, load_reference

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

BUILDER_GROUP = "deepspark.model_builders"
# This project's own packages reach executors and models as the project does (installed, or
# dist/deepspark.zip with --py-files), never as a user's code.
OWN_PACKAGES = frozenset({"deepspark", "pipelines", "training", "inference", "jobs", "scheduling"})


def registry(modality: Modality) -> Registry:
    """The builders a dataset of this modality can name: its catalogue and the installed ones."""
    return Registry("model builder", BUILDER_GROUP,
                    {name: f"{modality.models_module}:{name}" for name in modality.models})


def reference(builder: str | None, name: str | None, modality: Modality, prefix: str = "model") -> tuple[str, str]:
    """(the builder's `module:attr` reference, the config key that chose it): `builder` if set,
    else `name`, else the modality's default model."""
    if builder and name:
        raise ConfigError(f"{prefix}.builder={builder!r} and {prefix}.name={name!r}: set one of them")
    key, value = (f"{prefix}.builder", builder) if builder else (f"{prefix}.name", name or modality.default_model)
    return registry(modality).reference(value, key), key


def short_name(ref: str) -> str:
    """What a run is called after: the builder's function name."""
    return ref.rpartition(":")[2].rpartition(".")[2]


def build(ref: str, record: ModalityRecord, params: Mapping[str, Any], key: str = "model.builder") -> Any:
    """A fresh model from the builder `ref` with `params`; parameters it does not take fail
    naming `model.params`, before it runs."""
    builder = load_reference(ref, key)
    if not callable(builder):
        raise ConfigError(f"{key}: {ref!r} is not a function (got {type(builder).__name__})")
    try:
        inspect.signature(builder).bind(record, **params)
    except TypeError as exc:
        raise ConfigError(f"model.params: {ref} does not take {dict(params)} ({exc})") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    return builder(record, **params)


def checked(ref: str, record: ModalityRecord, params: Mapping[str, Any], key: str) -> Any:
    """Build once on the driver and check the model against the dataset: one input of the stored
    tensor's shape and dtype, one output as wide as the labels. Errors name `key`."""
    try:
        model = build(ref, record, params, key)
    except ConfigError:
        raise
    except Exception as exc:  # the user's code failed: say whose and with which params
        raise ConfigError(f"{key}: {ref}(record, **{dict(params)}) raised {type(exc).__name__}: {exc}") from exc
    spec = record.spec
    inputs, outputs = list(getattr(model, "inputs", None) or []), list(getattr(model, "outputs", None) or [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(f"{key}: {ref} built a model with {len(inputs)} input(s) and {len(outputs)} output(s); "
                          "it must take one tensor and output one probability vector")
    shape, dtype = tuple(inputs[0].shape[1:]), inputs[0].dtype.name
    if shape != tuple(spec.shape) or dtype != spec.dtype:
        raise ConfigError(f"{key}: {ref} takes {dtype} {shape}, but the dataset stores `{spec.column}` as "
                          f"{spec.dtype} {tuple(spec.shape)}")
    width = outputs[0].shape[-1]
    if width != len(record.labels):
        raise ConfigError(f"{key}: {ref} outputs {width} values, but the dataset has {len(record.labels)} labels "
                          f"({', '.join(record.labels)})")
    return model


def initial_weights(source: str, model: Any, record: ModalityRecord, key: str = "model.init_from") -> list[Any]:
    """The weights of `source` (a registered model, or a Keras model or weights file on any
    storage pyarrow.fs reaches) for `model`, a fresh model of the architecture to train; raises
    naming `key` when the source is missing or its tensors' shapes differ from the model's."""
    import tensorflow as tf

    from deepspark import filesystem

    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith("models:/"):
            import mlflow.pyfunc

            try:
                loaded = mlflow.pyfunc.load_model(source).unwrap_python_model().keras_model
            except Exception as exc:
                raise ConfigError(f"{key}: {source!r} does not load as a DeepSpark registered model ({exc})") from None
            weights = loaded.get_weights()
        else:
            if not source.endswith((".keras", ".h5")):
                raise ConfigError(f"{key}: {source!r} is neither models:/... nor a .keras, .h5 or .weights.h5 file")
            try:
                local = filesystem.local_copy(source, tmp)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}: cannot read {source!r} ({exc})") from None
            if source.endswith(".weights.h5"):
                target = tf.keras.models.clone_model(model)
                try:
                    target.load_weights(local)
                except ValueError as exc:
                    raise ConfigError(f"{key}: {source!r} does not fit the model ({exc})") from None
                weights = target.get_weights()
            else:
                weights = tf.keras.models.load_model(local, compile=False,
                                                     custom_objects=record.plugin.custom_objects()).get_weights()
    expected, got = [w.shape for w in model.get_weights()], [w.shape for w in weights]
    if expected != got:
        first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        raise ConfigError(f"{key}: {source!r} holds {len(got)} weight tensors, the model {len(expected)}; "
                          f"tensor {first} is {got[first] if first < len(got) else 'missing'} there and "
                          f"{expected[first] if first < len(expected) else 'absent'} in the model")
    return weights


def user_code(ref: str) -> str | None:
    """The folder of the package (or the file of the module) a builder comes from, when it is the
    user's own code: not this project's, not installed, not the standard library."""
    top = ref.partition(":")[0].split(".")[0]
    if top in OWN_PACKAGES:
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    path = os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin
    path = os.path.realpath(path)
    installed = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["stdlib"]]
    if any(path.startswith(os.path.realpath(p) + os.sep) for p in installed):
        return None
    if not os.path.exists(path):  # imported from an archive (spark-submit --py-files): unpack it
        return _unpack(path, top)
    return path


def _unpack(path: str, top: str) -> str:
    """The package `top` out of the zip that `path` lies in, in a new folder."""
    archive = path[: path.index(".zip") + len(".zip")]
    target = tempfile.mkdtemp(prefix="deepspark-user-code-")
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m == f"{top}.py" or m.startswith(f"{top}/")]
        zf.extractall(target, members)
    return os.path.join(target, top if any(m.startswith(f"{top}/") for m in members) else f"{top}.py")


@dataclass(frozen=True)
class CodeArchive:
    """The user's package (or module) as a zip in memory, named by its content: it travels inside
    the picklable functions executors run, so it reaches processes Spark did not start itself
    (Horovod's ranks are launched by their Spark task and do not see its `--py-files`)."""

    name: str  # <package>-<digest>.zip
    data: bytes = field(repr=False)

    @classmethod
    def pack(cls, path: str) -> "CodeArchive":
        """A package folder (zipped under its own name) or a single module file."""
        top = os.path.basename(path.rstrip(os.sep))
        if os.path.isfile(path):
            files, root = [path], os.path.dirname(path)
        else:
            files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                           for name in names if "__pycache__" not in folder and not name.endswith(".pyc"))
            root = os.path.dirname(path.rstrip(os.sep))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in files:
                info = zipfile.ZipInfo(os.path.relpath(file, root), date_time=(1980, 1, 1, 0, 0, 0))
                with open(file, "rb") as fh:
                    zf.writestr(info, fh.read())
        data = buffer.getvalue()
        return cls(f"{top.removesuffix('.py')}-{hashlib.sha256(data).hexdigest()[:12]}.zip", data)

    def install(self) -> str:
        """Put the archive on this process's import path (once per process); its file's path."""
        path = os.path.join(tempfile.gettempdir(), "deepspark-user-code", self.name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}.part"
            with open(partial, "wb") as out:
                out.write(self.data)
            os.replace(partial, path)  # whole or absent, whichever process writes it
        if path not in sys.path:
            sys.path.insert(0, path)
            importlib.invalidate_caches()
        return path


def ship_to_executors(spark: "SparkSession", archive: CodeArchive) -> None:
    """Put the user's code on the executors' Python path for this SparkContext, as `--py-files`
    would (Spark's own Python workers: model selection's hoppers and tasks, inference)."""
    if archive.name not in {os.path.basename(f) for f in spark.sparkContext.listFiles}:
        spark.sparkContext.addPyFile(archive.install())
