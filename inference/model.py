"""Model resolution on the driver and model loading on executors.

The driver turns `models:/<name>@<alias>` into one concrete version once per job (a promotion
mid-job cannot mix versions), downloads it once, reads its modality record (what it takes and
how inputs are preprocessed) and ships it as one zip with `SparkContext.addArchive`. Each Python worker loads
it at most once and reuses it across batches and tasks.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepspark.config import ConfigError
from deepspark.modality import ModalityRecord

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class ResolvedModel:
    """One concrete registered model version and what it was trained on."""

    name: str
    version: int
    run_id: str
    record: ModalityRecord  # modality, stored tensor, preprocessing rules, fitted state, labels
    shipped_as: str  # the archive's name; SparkFiles.get() finds it unpacked on executors

    @property
    def labels(self) -> tuple[str, ...]:
        return self.record.labels

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_and_ship(spark: "SparkSession", model_uri: str, workdir: str) -> ResolvedModel:
    """Resolve once; read the model's modality record (one small file); download the whole model
    and ship it to executors only when this SparkContext has not shipped that version yet."""
    import mlflow

    from deepspark.serving import RECORD_FILE, resolve  # here: executors unpickling this module need no MLflow

    name, version, run_id = resolve(model_uri)
    try:
        record_path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}/artifacts/{RECORD_FILE}", dst_path=os.path.join(workdir, "record"))
    except Exception:
        raise ConfigError(f"model_uri: {model_uri!r} ({name} v{version}) was not logged by DeepSpark's training job "
                          "(it has no modality record)") from None
    with open(record_path) as fh:
        record = ModalityRecord.from_dict(json.load(fh))
    # Named by the source run too: a registry recreated (or a second tracking store in the same
    # SparkContext) can hold another "v1", which must not reuse this one's shipped files or workers.
    # One zip, which executors unpack into a folder of that name (Spark ships a folder with addFile
    # only to a local master).
    shipped = f"deepspark-model-{name}-v{version}-{run_id}.zip"
    already = {os.path.basename(f.rstrip("/")) for f in spark.sparkContext.listArchives}
    if shipped not in already:  # a long-lived SparkContext ships each model version once
        import shutil

        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=os.path.join(workdir, "model"))
        archive = shutil.make_archive(os.path.join(workdir, shipped.removesuffix(".zip")), "zip", root_dir=local)
        spark.sparkContext.addArchive(archive)
    return ResolvedModel(name, version, run_id, record, shipped)


def task_gpu() -> str | None:
    """The GPU address Spark assigned to the running task, if any."""
    from pyspark import TaskContext

    context = TaskContext.get()
    resources = context.resources() if context is not None else {}
    return resources["gpu"].addresses[0] if "gpu" in resources and resources["gpu"].addresses else None


@dataclass(frozen=True)
class OnDevice:
    """A loaded classifier that predicts on one device (a GPU's name, or None for the default)."""

    classifier: Any
    device: str | None

    def probabilities(self, x: Any, batch_size: int) -> Any:
        with self._placed():
            return self.classifier.probabilities(x, batch_size)

    def scores(self, x: Any, batch_size: int) -> Any:
        with self._placed():
            return self.classifier.scores(x, batch_size)

    def _placed(self) -> Any:
        """The device scope the classifier predicts in."""
        import contextlib

        import tensorflow as tf

        return tf.device(self.device) if self.device else contextlib.nullcontext()


def gpu_device(gpu_names: list[str], assigned: str | None) -> str | None:
    """The TensorFlow device for the GPU Spark assigned (its address ends the device's name), the
    first GPU when Spark assigned none, None without GPUs."""
    if not gpu_names:
        return None
    index = next((i for i, name in enumerate(gpu_names) if assigned is not None and name.endswith(f":{assigned}")), 0)
    return f"/GPU:{index}"


@functools.lru_cache(maxsize=4)
def load_on_worker(shipped_as: str, intra_op_threads: int, gpu: str | None = None) -> OnDevice:
    """The registered model (`deepspark.serving.ModalityClassifier`), loaded once per Python
    worker, model version and GPU. All GPUs stay visible (TensorFlow cannot change visibility once
    initialised, and Spark may hand a reused worker a task on another GPU); the model is placed on
    the task's GPU by a device scope instead."""
    import contextlib

    import tensorflow as tf
    from pyspark import SparkFiles

    gpus = tf.config.list_physical_devices("GPU")
    try:  # only possible before TensorFlow initialises; a reused worker already did this
        for found in gpus:
            tf.config.experimental.set_memory_growth(found, True)
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    device = gpu_device([g.name for g in gpus], gpu)
    import mlflow.pyfunc

    from deepspark.spark import freeze_heap

    with tf.device(device) if device else contextlib.nullcontext():
        classifier = mlflow.pyfunc.load_model(SparkFiles.get(shipped_as)).unwrap_python_model()
    freeze_heap()
    return OnDevice(classifier, device)
