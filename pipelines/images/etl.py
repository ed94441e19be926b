"""Image ETL on Spark: raw files -> a versioned Petastorm dataset plus a quarantine table.

Spark's `binaryFile` source reads the files; a pandas function decodes, validates and
resizes them in bounded Arrow batches; every split becomes a Petastorm dataset under a
staging folder that is published as `<root>/<name>/v=<n>/` by one rename. Files in =
rows written + rows quarantined is checked against what landed on disk before publishing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterator

from deepspark.config import ConfigError, config_to_yaml
from deepspark.datasets import MANIFEST
from deepspark.schemas import images as schema
from deepspark.storage import HadoopFS, VersionedLocation, join, to_url
from pipelines.images import layout
from pipelines.images.config import EtlImagesConfig
from pipelines.images.transforms import NO_LABEL, ImageRules

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import Broadcast
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"
SPLIT = "split"
PROCESSED_DDL = f"{schema.ROW_DDL}, {SPLIT} string, size long, reason string, detail string"


@dataclass(frozen=True)
class EtlResult:
    """What one ETL run produced; `manifest` is what was written beside the data."""

    version: int
    url: str
    files_in: int
    rows_written: int
    quarantined: int
    seconds: float
    manifest: dict = field(repr=False)

    @property
    def images_per_second(self) -> float:
        return self.files_in / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        reasons = self.manifest["totals"]["quarantine_by_reason"]
        lines = [
            f"dataset {self.manifest['dataset']} v={self.version} (id {self.manifest['dataset_id']}) at {self.url}",
            f"files in {self.files_in} = rows written {self.rows_written} + quarantined {self.quarantined}"
            + (f" {reasons}" if reasons else ""),
            "per split: " + ", ".join(f"{s}={sum(c.values())}" for s, c in self.manifest["counts"].items()),
            f"{self.seconds:.1f} s, {self.images_per_second:,.0f} images/s",
        ]
        return "\n".join(lines)


def make_decoder(
    rules: ImageRules,
    spec: schema.ImageSpec,
    vocabulary: list[str],
    layout_: "Broadcast[layout.Layout]",
    seed: int,
    fractions: dict[str, float],
    val_from_train: float = 0.0,
) -> Callable[[Iterator["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    """Build, on the driver, the picklable pandas function the executors run."""
    label_index = {name: i for i, name in enumerate(vocabulary)}
    carve = {"train": 1.0 - val_from_train, "val": val_from_train}
    columns = [c.split()[0] for c in PROCESSED_DDL.split(", ")]

    def decode_batches(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from pipelines.images.transforms import assign_split, content_hash, decode_or_reason

        parse = layout_.value.parse
        for batch in batches:
            out: dict[str, list] = {c: [] for c in columns}
            for path, size, content in zip(batch["path"], batch["length"], batch["content"]):
                rel, split, label_name = parse(path)
                split = split or assign_split(rel or path, seed, fractions)
                if split == "train" and val_from_train:
                    split = assign_split(rel or path, seed + 1, carve)
                image = label = None
                if label_name is None:
                    failure = (NO_LABEL, f"layout gives no label for {rel or path!r}")
                elif label_name not in label_index:
                    failure = (NO_LABEL, f"label {label_name!r} not in the vocabulary")
                else:
                    pixels, failure = decode_or_reason(content, rules)
                    if pixels is not None:
                        image, label = schema.encode_pixels(pixels, spec), label_index[label_name]
                reason, detail = failure if failure else (None, None)
                for column, value in zip(columns, (
                    image, label, label_name, path, content_hash(content),
                    split, size, reason, detail,
                )):
                    out[column].append(value)
            frame = pd.DataFrame(out, columns=columns)
            frame[schema.LABEL] = frame[schema.LABEL].astype("Int32")
            frame["size"] = frame["size"].astype("int64")
            yield frame

    return decode_batches


def _check_inputs(cfg: EtlImagesConfig, fs: HadoopFS) -> tuple[str, bool, float]:
    """Driver-side checks before any task: the input exists, the layout is understood."""
    root = fs.qualify(to_url(cfg.input.path))
    if not fs.is_dir(root):
        raise ConfigError(f"input.path: {cfg.input.path!r} is not a folder ({root})")
    if cfg.input.labels_csv and not fs.exists(to_url(cfg.input.labels_csv)):
        raise ConfigError(f"input.labels_csv: {cfg.input.labels_csv!r} does not exist")
    top = fs.list_dir_names(root)
    if cfg.input.split_mode == "folders" and not set(top) & set(layout.SPLITS):
        raise ConfigError(f"input.split_mode=folders but {root} has no {'/'.join(layout.SPLITS)} folders (has {top})")
    from_folders = cfg.input.split_mode == "folders" or (
        cfg.input.split_mode == "auto" and bool(set(top) & set(layout.SPLITS))
    )
    carve = cfg.input.val_from_train if from_folders and "val" not in top else 0.0
    return root, from_folders, carve


def read_image_files(spark: "SparkSession", root: str, glob: str, files_per_task: int) -> "DataFrame":
    """(path, length, content) of every matching file below `root`, about `files_per_task`
    small files per task (Spark's default open cost would make one task per ~32 files)."""
    max_bytes = 128 * 1024 * 1024
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(max_bytes))
    spark.conf.set("spark.sql.files.openCostInBytes", str(max(1, max_bytes // files_per_task)))
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", glob)
        .load(root)
        .select("path", "length", "content")
    )


def _layout(spark: "SparkSession", cfg: EtlImagesConfig, root: str, from_folders: bool) -> layout.Layout:
    csv_labels = None
    if cfg.input.labels_csv:
        labels = spark.read.option("header", "true").csv(to_url(cfg.input.labels_csv))
        missing = {"path", "label"} - set(labels.columns)
        if missing:
            raise ConfigError(f"input.labels_csv: {cfg.input.labels_csv!r} lacks columns {sorted(missing)}")
        csv_labels = {row["path"]: row["label"] for row in labels.select("path", "label").collect()}
    return layout.Layout(root, from_folders, csv_labels)


def _empty_files(spark: "SparkSession", listing: list[tuple[str, int]]) -> "DataFrame":
    """Spark's file index skips 0-byte files; they come back here as quarantine rows."""
    from pipelines.images.transforms import EMPTY

    rows = [(None, None, None, path, None, None, 0, EMPTY, "0 bytes") for path, size in listing if size == 0]
    return spark.createDataFrame(rows, PROCESSED_DDL)


def _vocabulary(cfg: EtlImagesConfig, layout_: layout.Layout, paths: list[str]) -> list[str]:
    if cfg.input.labels:
        return list(cfg.input.labels)
    vocabulary = layout_.vocabulary(paths)
    if not vocabulary:
        raise ConfigError(f"input.path: no labelled image files under {cfg.input.path!r} matching {cfg.input.glob!r}")
    return vocabulary


def _group_stats(processed: "DataFrame") -> list[dict]:
    """Counts and an order-independent content digest per (split, label, reason)."""
    from pyspark.sql import functions as F

    key = F.sha2(F.concat_ws("|", F.col(SPLIT), F.col(schema.LABEL_NAME), F.col(schema.CONTENT_HASH)), 256)
    part = lambda a, b: F.conv(F.substring(key, a, b), 16, 10).cast("decimal(38,0)")  # noqa: E731
    rows = (
        processed.groupBy(SPLIT, schema.LABEL_NAME, "reason")
        .agg(F.count("*").alias("n"), F.sum(part(1, 15)).alias("h1"), F.sum(part(16, 15)).alias("h2"))
        .collect()
    )
    return [row.asDict() for row in rows]


def _build_manifest(cfg: EtlImagesConfig, spec: schema.ImageSpec, vocabulary: list[str], stats: list[dict],
                    files_in: int, version: int, source: str) -> dict:
    good = sorted((r for r in stats if r["reason"] is None), key=lambda r: (r[SPLIT], r[schema.LABEL_NAME]))
    counts: dict[str, dict[str, int]] = {}
    for r in good:
        counts.setdefault(r[SPLIT], {})[r[schema.LABEL_NAME]] = int(r["n"])
    by_reason: dict[str, int] = {}
    for r in stats:
        if r["reason"] is not None:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + int(r["n"])
    digest_input = json.dumps(
        {"image": spec.to_dict(), "labels": vocabulary,
         "groups": [[r[SPLIT], r[schema.LABEL_NAME], int(r["n"]), str(r["h1"]), str(r["h2"])] for r in good]},
        sort_keys=True,
    )
    return {
        "dataset": cfg.output.name,
        "version": version,
        "dataset_id": hashlib.sha256(digest_input.encode()).hexdigest()[:16],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "image": spec.to_dict(),
        "labels": vocabulary,
        "splits": {s: f"{DATA_DIR}/{s}" for s in sorted(counts)},
        "counts": counts,
        "totals": {
            "files_in": files_in,
            "rows_written": sum(int(r["n"]) for r in good),
            "quarantined": sum(by_reason.values()),
            "quarantine_by_reason": dict(sorted(by_reason.items())),
        },
        "schema": {"columns": schema.ROW_DDL, "petastorm_unischema": schema.unischema(spec)._name},
        "row_group_size_mb": cfg.output.row_group_size_mb,
        "quarantine": QUARANTINE_DIR,
        "config": cfg.model_dump(mode="json"),
    }


def _write_split(spark: "SparkSession", rows: "DataFrame", url: str, spec: schema.ImageSpec, n_rows: int,
                 cfg: EtlImagesConfig, seed: int) -> None:
    """One split as a Petastorm dataset, rows in a seeded hash order so row groups mix classes."""
    from petastorm.etl.dataset_metadata import materialize_dataset
    from pyspark.sql import functions as F

    n_files = max(1, -(-n_rows * spec.raw_bytes // (cfg.output.file_size_mb * 1024 * 1024)))
    order = F.sha2(F.concat_ws("|", F.lit(str(seed)), F.col(schema.PATH)), 256)
    ordered = rows.select(*schema.DATA_COLUMNS).repartitionByRange(n_files, order).sortWithinPartitions(order)
    with materialize_dataset(spark, url, schema.unischema(spec)):  # restores the Hadoop conf on exit
        block_bytes = max(1024, int(cfg.output.row_group_size_mb * 1024 * 1024))
        spark.sparkContext._jsc.hadoopConfiguration().setInt("parquet.block.size", block_bytes)
        ordered.write.mode("error").parquet(url)


def _write_manifest(fs: HadoopFS, staging: str, manifest: dict, cfg: EtlImagesConfig) -> None:
    fs.write_text(join(staging, MANIFEST), json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    fs.write_text(join(staging, CONFIG_FILE), config_to_yaml(cfg))


def run_etl(spark: "SparkSession", cfg: EtlImagesConfig) -> EtlResult:
    """Run the whole ETL and publish a new dataset version; raises before publishing on any mismatch."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    started = time.perf_counter()
    fs = HadoopFS(spark)
    root, from_folders, val_from_train = _check_inputs(cfg, fs)
    spec = schema.ImageSpec(cfg.image.height, cfg.image.width, cfg.image.channels, cfg.image.encoding)
    location = VersionedLocation(fs, fs.qualify(to_url(cfg.output.root)), cfg.output.name)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))

    listing = fs.list_files(root, cfg.input.glob)
    files_in = len(listing)
    layout_ = _layout(spark, cfg, root, from_folders)
    vocabulary = _vocabulary(cfg, layout_, [path for path, _ in listing])
    log.info("listed %d files, %d labels in %.1f s", files_in, len(vocabulary), time.perf_counter() - started)
    decoder = make_decoder(cfg.image.rules(), spec, vocabulary, spark.sparkContext.broadcast(layout_),
                           cfg.input.seed, dict(cfg.input.split_fractions), val_from_train)
    files = read_image_files(spark, root, cfg.input.glob, cfg.files_per_task)
    processed = files.mapInPandas(decoder, PROCESSED_DDL).unionByName(_empty_files(spark, listing))
    processed = processed.persist(StorageLevel.MEMORY_AND_DISK)
    removed = location.clean_staging(cfg.output.stale_staging_hours * 3600)
    if removed:
        log.info("removed %d staging folder(s) left by killed runs: %s", len(removed), removed)
    staging = location.new_staging()
    try:
        stats = _group_stats(processed)
        log.info("decoded and validated in %.1f s", time.perf_counter() - started)
        version = (location.versions() or [0])[-1] + 1
        manifest = _build_manifest(cfg, spec, vocabulary, stats, files_in, version, root)
        good = processed.where(F.col("reason").isNull())
        for split, per_class in manifest["counts"].items():
            _write_split(spark, good.where(F.col(SPLIT) == split), join(staging, DATA_DIR, split), spec,
                         sum(per_class.values()), cfg, cfg.input.seed)
        (processed.where(F.col("reason").isNotNull()).select(*schema.QUARANTINE_COLUMNS)
         .coalesce(1).write.mode("error").parquet(join(staging, QUARANTINE_DIR)))
        log.info("wrote splits and quarantine in %.1f s", time.perf_counter() - started)
        _reconcile(spark, staging, manifest)
        _write_manifest(fs, staging, manifest, cfg)
        published_version, url = location.publish(staging)
        if published_version != version:
            raise RuntimeError(f"version race: expected v={version}, published v={published_version}")
    except BaseException:
        fs.delete(staging)
        raise
    finally:
        processed.unpersist()
    return EtlResult(version, url, files_in, manifest["totals"]["rows_written"],
                     manifest["totals"]["quarantined"], time.perf_counter() - started, manifest)


def _reconcile(spark: "SparkSession", staging: str, manifest: dict) -> None:
    """Count what actually landed on disk; files in must equal rows written + rows quarantined."""
    totals = manifest["totals"]
    written = {s: spark.read.parquet(join(staging, rel)).count() for s, rel in manifest["splits"].items()}
    quarantined = spark.read.parquet(join(staging, QUARANTINE_DIR)).count()
    expected = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    if written != expected or quarantined != totals["quarantined"] or \
            totals["files_in"] != sum(written.values()) + quarantined:
        raise RuntimeError(
            f"ETL does not reconcile: files in {totals['files_in']}, written {written} (expected {expected}), "
            f"quarantined {quarantined} (expected {totals['quarantined']}); nothing was published"
        )


def run_job(spark: "SparkSession", cfg: EtlImagesConfig) -> EtlResult:
    """The job: one MLflow run around the ETL, with counts, throughput and the manifest logged."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, f"etl-images:{cfg.output.name}", cfg, tags={"deepspark.job": "etl_images"}) as run:
        result = run_etl(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.log_metrics({"files_in": result.files_in, "rows_written": result.rows_written,
                                "quarantined": result.quarantined, "seconds": result.seconds,
                                "images_per_second": result.images_per_second})
            mlflow.set_tags({"dataset.name": cfg.output.name, "dataset.version": str(result.version),
                             "dataset.id": result.manifest["dataset_id"], "dataset.url": result.url})
            mlflow.log_dict(result.manifest, "dataset/manifest.json")
    return result
