"""Feature transfer's first half (Vista): a frozen backbone over a dataset version on Spark,
written as a new `features` dataset version.

The driver resolves the backbone once (a registered model pinned to its version, or a Keras model
file), checks it takes the source dataset's stored tensor, cuts it at the named layers (errors name
`layers`, listing the backbone's) and ships that extractor to the executors once. Each Python
worker loads it once and runs it over batches of Arrow rows of every split; rows keep their split,
label, path and content hash, a row whose features are not finite is quarantined with the reason.
The version is published like the ETL's (`pipelines.etl.write_version`): rows read = rows written +
quarantined, atomically, with its lineage (source version, backbone version, layers) in the
manifest. Heads then train on it with `jobs/train.py` and `jobs/select_models.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from deepspark.config import ConfigError
from deepspark.datasets import SPLIT, DatasetRef, open_dataset
from deepspark.locks import LOCK_FILE, Lease
from deepspark.modality import CONTENT_HASH, LABEL, LABEL_NAME, PATH, ModalityRecord
from deepspark.storage import HadoopFS, VersionedLocation, join, to_url
from pipelines.config import FeaturizeConfig
from pipelines.etl import EtlResult, processed_ddl, write_version

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

NON_FINITE = "non_finite_features"


def backbone_source(uri: str, key: str = "backbone") -> tuple[str, str | None]:
    """(the backbone pinned: models:/name/<version> for a registered model, else the file URL;
    the builder it was logged with, if any)."""
    if not uri.startswith("models:/"):
        return uri, None
    import mlflow

    from deepspark.serving import BUILDER_KEY, RECORD_FILE, resolve

    name, version, _ = resolve(uri, key)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}/artifacts/{RECORD_FILE}", dst_path=tmp)
        except Exception:
            raise ConfigError(f"{key}: {uri!r} ({name} v{version}) was not logged by DeepSpark's training job") from None
        with open(path) as fh:
            refs = json.load(fh).get(BUILDER_KEY)
    builder = refs if isinstance(refs, str) or refs is None else refs[0]
    return f"models:/{name}/{version}", builder


def plan(cfg: FeaturizeConfig, source: DatasetRef, workdir: str) -> tuple[ModalityRecord, str]:
    """On the driver, before any task: the features record (its state is the lineage) and the
    extractor saved as a Keras file in `workdir`."""
    from pipelines.features.modality import FEATURES, FeatureRules
    from pipelines.features.models import default_layer, extractor, load_backbone

    src = source.record
    pinned, builder = backbone_source(cfg.backbone)
    backbone = load_backbone(pinned, src)
    inputs = list(backbone.inputs)
    shape = tuple(inputs[0].shape[1:]) if len(inputs) == 1 else None
    if shape != tuple(src.spec.shape) or inputs[0].dtype.name != src.spec.dtype:
        took = f"{inputs[0].dtype.name} {shape}" if shape is not None else f"{len(inputs)} inputs"
        raise ConfigError(f"backbone: {cfg.backbone!r} takes {took}, but dataset {source.name} v={source.version} "
                          f"stores `{src.spec.column}` as {src.spec.dtype} {tuple(src.spec.shape)}")
    layers = list(cfg.layers) or [default_layer(backbone)]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers: {layers} names a layer twice")
    model = extractor(backbone, layers, cfg.pooling)
    offset, parts = 0, []
    for name in layers:
        size = int(model.get_layer(f"features_{name}").output.shape[-1])
        parts.append({"name": name, "offset": offset, "size": size})
        offset += size
    state = {
        "layers": parts,
        "pooling": cfg.pooling,
        "backbone": {"uri": pinned, "requested": cfg.backbone, "builder": builder},
        "source": src.to_dict(),
    }
    record = ModalityRecord(FEATURES.name, FEATURES.spec(FeatureRules(), state), {}, state, src.labels)
    path = os.path.join(workdir, "extractor.keras")
    model.save(path)
    return record, path


@functools.lru_cache(maxsize=2)
def _extractor_on_worker(shipped_as: str, modality: str, builder: str | None, threads: int) -> Any:
    """The extractor, loaded once per Python worker (Spark reuses workers across tasks)."""
    import importlib

    import tensorflow as tf
    from pyspark import SparkFiles

    from deepspark.modality import get_modality
    from deepspark.spark import freeze_heap

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # a reused worker initialised TensorFlow already
        pass
    if builder:  # its module registers the backbone's custom layers
        importlib.import_module(builder.partition(":")[0])
    model = tf.keras.models.load_model(SparkFiles.get(shipped_as), compile=False,
                                       custom_objects=get_modality(modality).custom_objects())
    freeze_heap()
    return model


def make_featurizer(record: ModalityRecord, shipped_as: str, batch_size: int, threads: int
                    ) -> Callable[[Iterable["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]:
    """The picklable Arrow function executors run (`mapInArrow`): stored tensors -> feature
    vectors, one row out per row in. Arrow end to end: the tensors are read from the input
    column's buffer and the vectors written as one buffer, with no Python object per row (a
    vector of a wide layer is tens of KB)."""
    source = ModalityRecord.from_dict(record.state["source"])
    builder = record.state["backbone"].get("builder")
    columns = [c.split()[0] for c in processed_ddl(record.spec).split(", ")]
    width = int(record.spec.shape[0])

    def featurize(batches: Iterable["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import numpy as np
        import pyarrow as pa

        from deepspark.spark import lighten_python_worker

        lighten_python_worker()
        plugin = source.plugin
        for batch in batches:
            n = batch.num_rows
            features = np.zeros((0, width), np.float32)
            if n:  # an empty batch loads no model
                model = _extractor_on_worker(shipped_as, source.modality, builder, threads)
                tensors = plugin.decode_arrow(batch.column(source.spec.column), source.spec)
                features = np.concatenate([np.asarray(model.predict_on_batch(tensors[i : i + batch_size]),
                                                      dtype=np.float32) for i in range(0, n, batch_size)])
            finite = np.isfinite(features).all(axis=1)
            kept = np.ascontiguousarray(features[finite])
            offsets = np.zeros(n + 1, np.int32)
            np.cumsum(np.where(finite, width * 4, 0), out=offsets[1:])
            vectors = pa.Array.from_buffers(pa.binary(), n, [
                None if finite.all() else pa.array(finite).buffers()[1], pa.py_buffer(offsets), pa.py_buffer(kept)])
            names = batch.schema.names
            yield pa.RecordBatch.from_arrays([
                vectors,
                pa.array(np.asarray(batch.column(names.index(LABEL))), pa.int32(), mask=~finite),
                batch.column(names.index(LABEL_NAME)),
                batch.column(names.index(PATH)),
                batch.column(names.index(CONTENT_HASH)),
                batch.column(names.index(SPLIT)),
                pa.array(np.full(n, source.spec.row_bytes, np.int64)),
                pa.array([None if ok else NON_FINITE for ok in finite], pa.string()),
                pa.array([None if ok else f"{int((~np.isfinite(f)).sum())} of {width} values"
                          for f, ok in zip(features, finite)], pa.string()),
            ], names=columns)

    return featurize


def _source_rows(spark: "SparkSession", source: DatasetRef) -> "DataFrame":
    """Every split of the source version with its split name, stored tensor and identity."""
    from functools import reduce

    from pyspark.sql import functions as F

    column = source.record.spec.column
    parts = [spark.read.parquet(source.split_url(split))
             .select(column, LABEL, LABEL_NAME, PATH, CONTENT_HASH, F.lit(split).alias(SPLIT))
             for split in source.manifest["splits"]]
    return reduce(lambda a, b: a.unionByName(b), parts)


def run_featurize(spark: "SparkSession", cfg: FeaturizeConfig) -> EtlResult:
    """Featurize and publish a new version of `output.name`, holding its lease throughout."""
    from pyspark import StorageLevel

    from deepspark.tracking import tracking_uri

    started = time.perf_counter()
    if cfg.backbone.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg.tracking))
    try:
        source = open_dataset(spark, cfg.source.root, cfg.source.name, cfg.source.version)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ConfigError(f"source.name: {cfg.source.name!r} under {cfg.source.root!r}: {exc}") from None
    fs = HadoopFS(spark)
    location = VersionedLocation(fs, fs.qualify(to_url(cfg.output.root)), cfg.output.name)
    with tempfile.TemporaryDirectory(prefix="deepspark-featurize-") as workdir:
        record, extractor_path = plan(cfg, source, workdir)
        with open(extractor_path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:16]
        shipped_as = f"deepspark-extractor-{digest}.keras"
        if shipped_as not in {os.path.basename(f) for f in spark.sparkContext.listFiles}:
            target = os.path.join(workdir, shipped_as)
            os.rename(extractor_path, target)
            spark.sparkContext.addFile(target)
        log.info("backbone %s cut at %s in %.1f s", record.state["backbone"]["uri"],
                 [f["name"] for f in record.state["layers"]], time.perf_counter() - started)
        fs.mkdirs(location.base)
        lease = Lease(fs, join(location.base, LOCK_FILE), uuid.uuid4().hex[:12], cfg.output.lock_ttl_s)
        lease.acquire(cfg.output.force_unlock)
        try:
            spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
            rows = _source_rows(spark, source)
            featurizer = make_featurizer(record, shipped_as, cfg.batch_size, cfg.intra_op_threads)
            processed = rows.mapInArrow(featurizer, processed_ddl(record.spec)).persist(StorageLevel.MEMORY_AND_DISK)
            read = sum(source.rows(split) for split in source.manifest["splits"])
            lineage = {"source": {"dataset": source.name, "version": source.version, "dataset_id": source.dataset_id,
                                  "url": source.url},
                       "backbone": record.state["backbone"], "layers": record.state["layers"]}
            try:
                # The source's rows are in its seeded order already (classes mixed in every row group),
                # and featurizing keeps it: no shuffle to order them again.
                version, url, manifest = write_version(
                    spark, fs, location, lease, processed, record, read, source.url, cfg, cfg.output, 0, True,
                    "source.name", lineage)
            finally:
                processed.unpersist()
        finally:
            lease.release()
    return EtlResult(version, url, manifest["totals"]["inputs_in"], manifest["totals"]["rows_written"],
                     manifest["totals"]["quarantined"], time.perf_counter() - started, manifest)


def run_job(spark: "SparkSession", cfg: FeaturizeConfig) -> EtlResult:
    """The job: one MLflow run around the featurization, with counts and lineage logged."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, f"featurize:{cfg.source.name}->{cfg.output.name}", cfg,
                 tags={"deepspark.job": "featurize", "deepspark.modality": "features"}) as run:
        result = run_featurize(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.log_metrics({"inputs_in": result.inputs_in, "rows_written": result.rows_written,
                                "quarantined": result.quarantined, "seconds": result.seconds,
                                "inputs_per_second": result.inputs_per_second})
            lineage = result.manifest["lineage"]
            mlflow.set_tags({"dataset.name": cfg.output.name, "dataset.version": str(result.version),
                             "dataset.id": result.manifest["dataset_id"], "dataset.url": result.url,
                             "source.dataset": f"{lineage['source']['dataset']}@v{lineage['source']['version']}",
                             "backbone": lineage["backbone"]["uri"]})
            mlflow.log_dict(result.manifest, "dataset/manifest.json")
    return result
