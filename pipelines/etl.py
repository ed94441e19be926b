"""The ETL on Spark, one driver for every modality: raw inputs -> a versioned Petastorm dataset
plus a quarantine table.

Raw inputs (files or text records, `deepspark.inputs`) get a split and a label on the driver's
terms (`deepspark.layout.RowLabeller`); the modality fits its state on the train split (a text
vocabulary, by a Spark job; nothing for images and audio); a pandas function preprocesses every
input into the modality's stored tensor or a quarantine reason in bounded Arrow batches; every
split becomes a Petastorm dataset under a staging folder that is published as
`<root>/<name>/v=<n>/` by one rename. Inputs in = rows written + rows quarantined is checked
against what landed on disk before publishing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from deepspark import layout
from deepspark.config import ConfigError, config_to_yaml
from deepspark.datasets import DATA_DIR, QUARANTINE_DIR, SPLIT, build_manifest, write_manifest
from deepspark.inputs import MALFORMED_DETAIL, RawInputs, RecordColumns, open_inputs, payloads, resolve_input
from deepspark.locks import LOCK_FILE, Lease
from deepspark.modality import (
    LABEL,
    LABEL_NAME,
    PATH,
    QUARANTINE_COLUMNS,
    Modality,
    ModalityRecord,
    TensorSpec,
    content_hash,
    get_modality,
    or_reason,
    rules_to_dict,
    unischema,
)
from deepspark.storage import HadoopFS, VersionedLocation, join, to_url
from pipelines.config import EtlConfig, OutputSettings

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import Broadcast
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def processed_ddl(spec: TensorSpec) -> str:
    return f"{spec.row_ddl()}, {SPLIT} string, size long, reason string, detail string"


@dataclass(frozen=True)
class EtlResult:
    """What one ETL run produced; `manifest` is what was written beside the data."""

    version: int
    url: str
    inputs_in: int
    rows_written: int
    quarantined: int
    seconds: float
    manifest: dict = field(repr=False)

    @property
    def inputs_per_second(self) -> float:
        return self.inputs_in / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        reasons = self.manifest["totals"]["quarantine_by_reason"]
        kind = self.manifest["modality"]
        lines = [
            f"{kind} dataset {self.manifest['dataset']} v={self.version} (id {self.manifest['dataset_id']}) at {self.url}",
            f"inputs in {self.inputs_in} = rows written {self.rows_written} + quarantined {self.quarantined}"
            + (f" {reasons}" if reasons else ""),
            "per split: " + ", ".join(f"{s}={sum(c.values())}" for s, c in self.manifest["counts"].items()),
            f"stored tensor: {self.manifest['spec']['column']} {self.manifest['spec']['dtype']} "
            f"{tuple(self.manifest['spec']['shape'])}" + _state_line(self.manifest["state"]),
            f"{self.seconds:.1f} s, {self.inputs_per_second:,.0f} inputs/s",
        ]
        return "\n".join(lines)


def _state_line(state: dict) -> str:
    if "layers" in state:  # a features dataset: what it was computed from
        layers = ", ".join(f"{f['name']} ({f['size']})" for f in state["layers"])
        return f" from {state['backbone']['uri']} at {layers}"
    return f", vocabulary of {len(state['vocabulary'])} tokens fitted on train" if "vocabulary" in state else ""


def _label_row(label_of: layout.RowLabeller, path: str, payload: Any, given_label: str | None,
               given_split: str | None, malformed: str | None) -> tuple[str, str | None, str | None, tuple | None]:
    """(content hash, split, label name, failure) of one raw row, the same for the vocabulary job
    and the processor: a record Spark could not parse fails before its label is looked at."""
    digest = content_hash(payload)
    split, label_name, failure = label_of(path, digest, given_label, given_split)
    return digest, split, label_name, (malformed, MALFORMED_DETAIL) if malformed is not None else failure


def make_processor(modality: Modality, rules: Any, state: dict, spec: TensorSpec,
                   labeller: "Broadcast[layout.RowLabeller]", payload_in_workers: bool = False
                   ) -> Callable[[Iterable["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    """Build, on the driver, the picklable pandas function the executors run: label and split,
    then the modality's preprocessing, one row out per input in."""
    columns = [c.split()[0] for c in processed_ddl(spec).split(", ")]

    def process(batches: Iterable["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from deepspark.spark import lighten_python_worker

        lighten_python_worker()  # this worker's next tasks start without re-reading Spark's jar

        preprocess = modality.preprocessor(rules, state)  # once per task (e.g. a token index)
        label_of = labeller.value
        index = {name: i for i, name in enumerate(label_of.labels)}
        for batch in batches:
            out: dict[str, list] = {c: [] for c in columns}
            for path, size, payload, given_label, given_split, malformed in zip(
                    batch["path"], batch["size"], payloads(batch, payload_in_workers), batch["label_name"],
                    batch["split"], batch["malformed"]):
                digest, split, label_name, failure = _label_row(label_of, path, payload, given_label, given_split,
                                                                malformed)
                stored: bytes | None = None
                label: int | None = None
                if failure is None:
                    tensor, failure = preprocess(payload)
                    if tensor is not None:  # a plug-in's tensor off its spec is a row's failure too
                        stored, failure = or_reason(lambda t: modality.encode(t, spec), tensor)
                    if stored is not None and label_name is not None:  # no failure: labelled
                        label = index[label_name]
                reason, detail = failure if failure else (None, None)
                for column, value in zip(columns, (stored, label, label_name, path, digest, split, size, reason, detail)):
                    out[column].append(value)
            frame = pd.DataFrame(out, columns=columns)
            frame[LABEL] = frame[LABEL].astype("Int32")
            frame["size"] = frame["size"].astype("int64")
            yield frame

    return process


def _check_inputs(cfg: EtlConfig, fs: HadoopFS, modality: Modality) -> tuple[str, str, bool, float]:
    """Driver-side checks before any task: the input exists, its kind and layout are understood."""
    if not modality.input_kinds:
        raise ConfigError(f"modality: {cfg.modality} datasets are not made from raw inputs (features: "
                          "jobs/featurize.py writes them from a dataset version)")
    root, kind = resolve_input(fs, cfg.input.path, "input.path", cfg.input.format, "records" in modality.input_kinds)
    if cfg.input.labels_csv and not fs.exists(to_url(cfg.input.labels_csv)):
        raise ConfigError(f"input.labels_csv: {cfg.input.labels_csv!r} does not exist")
    top = fs.list_dir_names(root) if kind == "files" else []
    if cfg.input.split_mode == "folders" and not set(top) & set(layout.SPLITS):
        raise ConfigError(f"input.split_mode=folders but {root} has no {'/'.join(layout.SPLITS)} folders (has {top})")
    from_folders = cfg.input.split_mode == "folders" or (
        cfg.input.split_mode == "auto" and bool(set(top) & set(layout.SPLITS))
    )
    carve = cfg.input.val_from_train if from_folders and "val" not in top else 0.0
    return root, kind, from_folders, carve


def _layout(spark: "SparkSession", cfg: EtlConfig, root: str, from_folders: bool) -> layout.Layout:
    csv_labels = None
    if cfg.input.labels_csv:
        labels = spark.read.option("header", "true").csv(to_url(cfg.input.labels_csv))
        missing = {"path", "label"} - set(labels.columns)
        if missing:
            raise ConfigError(f"input.labels_csv: {cfg.input.labels_csv!r} lacks columns {sorted(missing)}")
        csv_labels = {row["path"]: row["label"] for row in labels.select("path", "label").collect()}
    return layout.Layout(root, from_folders, csv_labels)


def _label_vocabulary(cfg: EtlConfig, inputs: RawInputs, layout_: layout.Layout | None) -> list[str]:
    """Label names: fixed by config, else every name the layout or the label column holds."""
    if cfg.input.labels:
        return list(cfg.input.labels)
    if layout_ is not None:
        found = layout_.vocabulary(path for path, _, _ in inputs.listing)
    else:
        from pyspark.sql import functions as F

        found = sorted(r[0] for r in inputs.frame.select(LABEL_NAME).where(F.col(LABEL_NAME).isNotNull())
                       .distinct().collect())
    if not found:
        raise ConfigError(f"input.path: no labelled {cfg.modality} inputs under {cfg.input.path!r}")
    return found


def _fit(spark: "SparkSession", modality: Modality, rules: Any, inputs: RawInputs,
         labeller: "Broadcast[layout.RowLabeller]") -> dict:
    """The modality's state, fitted on the train split only (valid labels, parseable records)."""
    if type(modality).fit is Modality.fit:
        return {}

    in_workers = inputs.payload_in_workers  # the closure must not hold the DataFrame

    def train_payloads(batches: Iterable["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from deepspark.spark import lighten_python_worker

        lighten_python_worker()

        label_of = labeller.value
        for batch in batches:
            keep = []
            for row in zip(batch["path"], payloads(batch, in_workers), batch["label_name"],
                           batch["split"], batch["malformed"]):
                _, split, _, failure = _label_row(label_of, *row)
                if split == "train" and failure is None:
                    keep.append(row[1])
            yield pd.DataFrame({"payload": pd.Series(keep, dtype=object)})

    payload_type = "binary" if inputs.kind == "files" else "string"
    return modality.fit(spark, inputs.frame.mapInPandas(train_payloads, f"payload {payload_type}"), rules)


def stratify_records(frame: "DataFrame", seed: int, fractions: dict[str, float]) -> "DataFrame":
    """Records with their stratified split in the `split` column: `layout.stratified_splits` in
    Spark, keyed by the record's content hash (a record's key is split once, so duplicate texts
    never straddle splits; a key's class is the smallest label it comes with). A class's keys in
    the order of their seeded hash (`layout._point`: the first 8 bytes of sha256("<seed>:<key>")),
    the i-th of n at (i + 0.5) / n against the cumulative fractions. Keys without a label keep a
    null split, which the labeller fills with the plain hash split."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    key = F.sha2(F.coalesce(F.col("payload"), F.lit("")), 256)  # = content_hash(payload)
    keyed = frame.withColumn("_key", key)
    classes = (keyed.where(F.col(LABEL_NAME).isNotNull()).groupBy("_key").agg(F.min(LABEL_NAME).alias("_class"))
               .withColumn("_point", F.substring(F.sha2(F.concat(F.lit(f"{seed}:"), F.col("_key")), 256), 1, 16)))
    per_class = Window.partitionBy("_class")
    at = ((F.row_number().over(per_class.orderBy("_point", "_key")) - 1 + 0.5) / F.count("*").over(per_class))
    split = F.lit(list(fractions)[-1])
    cumulative = list(itertools.accumulate(fractions.values()))
    for name, bound in reversed(list(zip(fractions, cumulative))[:-1]):
        split = F.when(at < F.lit(bound), F.lit(name)).otherwise(split)
    strata = classes.select("_key", split.alias("_split"))
    return (keyed.join(strata, "_key", "left").withColumn(SPLIT, F.coalesce(F.col(SPLIT), F.col("_split")))
            .select(*frame.columns))


def _group_stats(processed: "DataFrame") -> list[dict]:
    """Counts and an order-independent content digest per (split, label, reason)."""
    from pyspark.sql import functions as F

    key = F.sha2(F.concat_ws("|", F.col(SPLIT), F.col(LABEL_NAME), F.col("content_hash")), 256)
    part = lambda a, b: F.conv(F.substring(key, a, b), 16, 10).cast("decimal(38,0)")  # noqa: E731
    rows = (
        processed.groupBy(SPLIT, LABEL_NAME, "reason")
        .agg(F.count("*").alias("n"), F.sum(part(1, 15)).alias("h1"), F.sum(part(16, 15)).alias("h2"))
        .collect()
    )
    return [row.asDict() for row in rows]


def row_group_bytes(split_bytes: int, size_mb: float | None, min_groups: int, largest_mb: float = 4.0) -> int:
    """Parquet's row-group threshold for one split: `size_mb` when given, else the largest size up
    to `largest_mb` that still cuts the split into `min_groups` row groups (a small split would
    otherwise be one row group, which only one rank can read)."""
    if size_mb is not None:
        return max(1024, int(size_mb * 1024 * 1024))
    return max(1024, min(int(largest_mb * 1024 * 1024), split_bytes // min_groups))


def _write_splits(spark: "SparkSession", fs: HadoopFS, good: "DataFrame", staging: str, record: ModalityRecord,
                  counts: dict[str, int], output: OutputSettings, seed: int, shuffled: bool) -> None:
    """Every split in one partitioned write, each then a Petastorm dataset at `data/<split>`. Rows
    are in a seeded hash order so row groups mix classes: `shuffled` rows already are (the driver
    ordered the listing), others are range-sorted. Row groups are sized for the train split, the
    one the ranks shard (evaluation reads whole splits)."""
    from contextlib import ExitStack

    from petastorm.etl.dataset_metadata import materialize_dataset
    from pyspark.sql import functions as F

    from deepspark import filesystem

    filesystem.s3_for_fsspec()

    spec = record.spec
    rows = good.select(*spec.data_columns, SPLIT)
    total = sum(counts.values())
    if not shuffled:
        n_files = max(1, -(-total * spec.row_bytes // (output.file_size_mb * 1024 * 1024)))
        order = F.sha2(F.concat_ws("|", F.lit(str(seed)), F.col(PATH)), 256)
        rows = rows.repartitionByRange(n_files, order).sortWithinPartitions(order)
    sharded = counts.get("train", max(counts.values(), default=0))
    block = row_group_bytes(sharded * spec.row_bytes, output.row_group_size_mb, output.min_row_groups)
    data = join(staging, DATA_DIR)
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    # Parquet checks the size only every 100 rows by default (this also paces the row-group
    # check): small rows (token ids) would never make a small dataset more than one row group.
    check, previous = "parquet.page.size.row.check.min", hadoop.get("parquet.page.size.row.check.min")
    # Petastorm's row-group index (row groups per file) is read off the footers here on the driver,
    # as the reconciliation does, where pyarrow.fs reaches the output: Petastorm's own indexing runs
    # a Spark job of one Python task per file for each split (about 0.4 s a split on a small job).
    # materialize_dataset then only adds its Unischema (`use_summary_metadata`: no indexing job).
    on_driver = filesystem.reaches(data)
    with ExitStack() as metadata:  # on exit, each split's Petastorm metadata (keys restored too)
        for split in counts:
            metadata.enter_context(materialize_dataset(spark, join(data, split), unischema(spec, record.modality),
                                                       use_summary_metadata=on_driver))
        hadoop.set("parquet.summary.metadata.level", "NONE")  # no Parquet summary file either way
        hadoop.setInt("parquet.block.size", block)
        hadoop.setInt(check, 10)
        try:
            (rows.write.mode("error").partitionBy(SPLIT)
             .option("maxRecordsPerFile", max(1, output.file_size_mb * 1024 * 1024 // spec.row_bytes))
             # tensors, paths and hashes are unique per row: a dictionary attempt hashes each value
             # for nothing; only the label name repeats
             .option("parquet.enable.dictionary", "false")
             .option(f"parquet.enable.dictionary#{LABEL_NAME}", "true")
             .parquet(data))
        finally:
            hadoop.unset(check) if previous is None else hadoop.set(check, previous)
        for split in counts:
            fs.rename(join(data, f"{SPLIT}={split}"), join(data, split))
            if on_driver:
                _index_row_groups(spark, join(data, split))


def _index_row_groups(spark: "SparkSession", url: str) -> None:
    """Petastorm's row-group index of one split (its `ROW_GROUPS_PER_FILE_KEY` in
    `_common_metadata`, the paths relative to the split), from the footers on the driver."""
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY
    from petastorm.fs_utils import FilesystemResolver
    from petastorm.utils import add_to_dataset_metadata

    from deepspark import filesystem

    groups = {rel: n for rel, (_, n) in filesystem.parquet_footers(url).items()}
    resolver = FilesystemResolver(url, spark.sparkContext._jsc.hadoopConfiguration(),
                                  user=spark.sparkContext.sparkUser())
    dataset = pq.ParquetDataset(resolver.get_dataset_path(), filesystem=resolver.filesystem(), validate_schema=False)
    add_to_dataset_metadata(dataset, ROW_GROUPS_PER_FILE_KEY, json.dumps(groups))


def run_etl(spark: "SparkSession", cfg: EtlConfig) -> EtlResult:
    """Run the whole ETL and publish a new dataset version; raises before publishing on any mismatch.
    Holds the dataset's lease throughout: a second run for the same name fails at once, naming it."""
    started = time.perf_counter()
    fs = HadoopFS(spark)
    modality = get_modality(cfg.modality)
    root, kind, from_folders, val_from_train = _check_inputs(cfg, fs, modality)
    location = VersionedLocation(fs, fs.qualify(to_url(cfg.output.root)), cfg.output.name)
    fs.mkdirs(location.base)
    lease = Lease(fs, join(location.base, LOCK_FILE), uuid.uuid4().hex[:12], cfg.output.lock_ttl_s)
    lease.acquire(cfg.output.force_unlock)
    try:
        return _run_locked(spark, cfg, fs, location, lease, modality, root, kind, from_folders, val_from_train,
                           started)
    finally:
        lease.release()


def _run_locked(spark: "SparkSession", cfg: EtlConfig, fs: HadoopFS, location: VersionedLocation, lease: Lease,
                modality: Modality, root: str, kind: Any, from_folders: bool, val_from_train: float,
                started: float) -> EtlResult:
    """The ETL proper, while this run holds the dataset's lease."""
    from pyspark import StorageLevel

    rules = cfg.rules()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))

    inputs = open_inputs(spark, fs, root, "input.path", kind, cfg.input.glob or modality.default_glob,
                         cfg.files_per_task,
                         RecordColumns(cfg.input.text_column, cfg.input.label_column, cfg.input.split_column,
                                       encoding=cfg.input.encoding),
                         read_in_workers=True, shuffle_seed=cfg.input.seed)
    if kind == "records":  # read, numbered (and stratified) once, not again by each job below
        frame = inputs.frame
        if cfg.input.stratify and cfg.input.split_column is None:
            frame = stratify_records(frame, cfg.input.seed, cfg.input.split_fractions)
        inputs = dataclasses.replace(inputs, frame=frame.persist(StorageLevel.MEMORY_AND_DISK))
    layout_ = _layout(spark, cfg, root, from_folders) if kind == "files" else None
    labels = _label_vocabulary(cfg, inputs, layout_)
    strata = None
    if layout_ is not None and cfg.input.stratify and not from_folders:  # the hash split, per class
        parsed = (layout_.parse(p) for p, _, _ in inputs.listing)
        strata = layout.stratified_splits(((rel, label) for rel, _, label in parsed if rel), cfg.input.seed,
                                          cfg.input.split_fractions)
    labeller = spark.sparkContext.broadcast(layout.RowLabeller(
        tuple(labels), cfg.input.seed, dict(cfg.input.split_fractions), val_from_train, layout_, strata))
    log.info("%s inputs (%s), %d labels in %.1f s", cfg.modality, kind, len(labels), time.perf_counter() - started)
    state = _fit(spark, modality, rules, inputs, labeller)
    record = ModalityRecord(cfg.modality, modality.spec(rules, state), rules_to_dict(rules), state, tuple(labels))
    processor = make_processor(modality, rules, state, record.spec, labeller, inputs.payload_in_workers)
    processed = inputs.frame.mapInPandas(processor, processed_ddl(record.spec)).persist(StorageLevel.MEMORY_AND_DISK)
    read = len(inputs.listing) if kind == "files" else inputs.frame.count()  # counted apart from the UDF
    try:
        version, url, manifest = write_version(
            spark, fs, location, lease, processed, record, read, root, cfg, cfg.output, cfg.input.seed,
            inputs.shuffled, "input.path")
    finally:
        processed.unpersist()
        inputs.frame.unpersist()
    inputs_in = manifest["totals"]["inputs_in"]
    return EtlResult(version, url, inputs_in, manifest["totals"]["rows_written"],
                     manifest["totals"]["quarantined"], time.perf_counter() - started, manifest)


def write_version(spark: "SparkSession", fs: HadoopFS, location: VersionedLocation, lease: Lease,
                  processed: "DataFrame", record: ModalityRecord, inputs_read: int, source: str, cfg: Any,
                  output: OutputSettings, seed: int, shuffled: bool, source_key: str,
                  lineage: dict[str, Any] | None = None) -> tuple[int, str, dict]:
    """Publish `processed` (rows of `processed_ddl(record.spec)`, one per input) as the next
    version under `location`: counts reconcile with `inputs_read` before anything is written and
    with what landed after; splits, quarantine, manifest (with `lineage`) and the job's config are
    written to a staging folder published by one rename, while this run still holds `lease`.
    (version, url, manifest)."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    removed = location.clean_staging(output.stale_staging_hours * 3600)
    if removed:
        log.info("removed %d staging folder(s) left by killed runs: %s", len(removed), removed)
    staging = location.new_staging()
    try:
        stats = _group_stats(processed)
        inputs_in = sum(int(r["n"]) for r in stats)
        if inputs_in != inputs_read:
            raise RuntimeError(f"ETL does not reconcile: {inputs_read} inputs read, {inputs_in} processed")
        log.info("processed and counted in %.1f s", time.perf_counter() - started)
        version = location.next_version()  # once, under the lock
        manifest = build_manifest(output.name, version, record, stats, inputs_in, source,
                                  cfg.model_dump(mode="json"), output.row_group_size_mb)
        if lineage:
            manifest["lineage"] = lineage
        _refuse_empty(output, source_key, source, manifest)
        _write_splits(spark, fs, processed.where(F.col("reason").isNull()), staging, record,
                      {s: sum(c.values()) for s, c in manifest["counts"].items()}, output, seed, shuffled)
        _write_quarantine(processed.where(F.col("reason").isNotNull()), join(staging, QUARANTINE_DIR),
                          manifest["totals"]["quarantined"])
        log.info("wrote splits and quarantine in %.1f s", time.perf_counter() - started)
        _reconcile(spark, staging, manifest)
        _write_manifest(fs, staging, manifest, cfg)
        lease.check()  # a run whose lease was taken over must not publish over its successor
        url = location.publish(staging, version)
    except BaseException:
        fs.delete(staging)
        raise
    return version, url, manifest


def _write_manifest(fs: HadoopFS, staging: str, manifest: dict, cfg: Any) -> None:
    write_manifest(fs, staging, manifest)
    fs.write_text(join(staging, CONFIG_FILE), config_to_yaml(cfg))


def _refuse_empty(output: OutputSettings, key: str, root: str, manifest: dict) -> None:
    """No row to write fails the run before anything is written or published (naming the input and
    what became of its inputs), unless output.allow_empty; a split training reads by default that
    the data did not fill is said in the log at ETL time."""
    totals = manifest["totals"]
    if totals["rows_written"] == 0 and not output.allow_empty:
        reasons = ", ".join(f"{n} {r}" for r, n in totals["quarantine_by_reason"].items()) or "none"
        raise ConfigError(f"{key}: {root} gave no row to write ({totals['inputs_in']} input(s); quarantined: "
                          f"{reasons}); nothing was published (output.allow_empty=true publishes an empty version)")
    missing = [s for s in ("train", "val", "test") if not sum(manifest["counts"].get(s, {}).values())]
    if missing and totals["rows_written"]:
        log.warning("dataset %s has no rows in split(s) %s: training needs train and test (data.train_split, "
                    "data.test_split) and early stopping a val split", output.name, ", ".join(missing))


# Up to this many quarantine rows are collected and written by the driver as one Parquet file (a
# collect of cached rows costs less than a write job's commit protocol); more, by a Spark write.
DRIVER_QUARANTINE_ROWS = 10_000


def _write_quarantine(rows: "DataFrame", url: str, n_rows: int) -> None:
    """The quarantine table: none or few rows (the usual case) as one Parquet file of the very
    schema Spark would write, written directly where pyarrow.fs reaches; else a Spark write."""
    from deepspark import filesystem

    table = rows.select(*QUARANTINE_COLUMNS)
    if n_rows > DRIVER_QUARANTINE_ROWS or not filesystem.reaches(url):
        table.coalesce(1).write.mode("error").parquet(url)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import to_arrow_schema

    collected = [row.asDict() for row in table.collect()] if n_rows else []
    loc, path = filesystem.location(join(url, "part-00000.parquet"))
    loc.fs.create_dir(path.rsplit("/", 1)[0])
    with loc.fs.open_output_stream(path) as out:
        pq.write_table(pa.Table.from_pylist(collected, schema=to_arrow_schema(table.schema)), out)


def _reconcile(spark: "SparkSession", staging: str, manifest: dict) -> None:
    """Count what actually landed on disk (Parquet footers; a Spark count where pyarrow.fs does
    not reach); inputs in must equal rows written + rows quarantined."""
    from deepspark import filesystem

    def rows(url: str) -> int:
        return filesystem.parquet_totals(url)[0] if filesystem.reaches(url) else spark.read.parquet(url).count()

    totals = manifest["totals"]
    written = {s: rows(join(staging, rel)) for s, rel in manifest["splits"].items()}
    quarantined = rows(join(staging, QUARANTINE_DIR))
    expected = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    if written != expected or quarantined != totals["quarantined"] or \
            totals["inputs_in"] != sum(written.values()) + quarantined:
        raise RuntimeError(
            f"ETL does not reconcile: inputs in {totals['inputs_in']}, written {written} (expected {expected}), "
            f"quarantined {quarantined} (expected {totals['quarantined']}); nothing was published"
        )


def run_job(spark: "SparkSession", cfg: EtlConfig) -> EtlResult:
    """The job: one MLflow run around the ETL, with counts, throughput and the manifest logged."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, f"etl-{cfg.modality}:{cfg.output.name}", cfg,
                 tags={"deepspark.job": "etl", "deepspark.modality": cfg.modality}) as run:
        result = run_etl(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.log_metrics({"inputs_in": result.inputs_in, "rows_written": result.rows_written,
                                "quarantined": result.quarantined, "seconds": result.seconds,
                                "inputs_per_second": result.inputs_per_second})
            mlflow.set_tags({"dataset.name": cfg.output.name, "dataset.version": str(result.version),
                             "dataset.id": result.manifest["dataset_id"], "dataset.url": result.url})
            mlflow.log_dict(result.manifest, "dataset/manifest.json")
    return result
