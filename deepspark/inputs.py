"""Raw inputs of any modality as one Spark DataFrame, for the ETL and for batch inference alike.

Two kinds of input:
- files (images, audio, one-document-per-file text): the driver lists every matching file
  itself (Spark's file index silently skips 0-byte files); with `read_in_workers` the listing is
  distributed and the Python workers read the bytes where they use them (`deepspark.filesystem`),
  otherwise (or for a scheme pyarrow.fs does not reach) Spark's `binaryFile` source reads them;
  labels and splits come from the folder layout (`deepspark.layout`).
- records (text): CSV or JSON Lines files (one file or a folder of them, optionally bz2/gzip
  compressed) read by Spark's own readers; the text, label and optional split come from columns.

Either way every input becomes one row `path, size, payload, label_name, split, malformed` (the
last three null for files), so "inputs in = rows written + rows quarantined" holds for both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from deepspark import filesystem
from deepspark.config import ConfigError
from deepspark.modality import InputKind
from deepspark.spark import frame_from_pandas
from deepspark.storage import HadoopFS, to_url

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

RECORD_GLOB = "*.{csv,CSV,jsonl,JSONL,ndjson,json,JSON}{,.bz2,.gz}"
FILES_DDL = "path string, size long, payload binary, label_name string, split string, malformed string, source string"
GLOB_CHARS = "[]{}*?\\"  # Hadoop glob syntax: an explicit path holding one is expanded by Spark
MALFORMED = "malformed_record"  # quarantine reason of a record line Spark's reader cannot parse
MALFORMED_DETAIL = "Spark's reader could not parse this record"


@dataclass(frozen=True)
class RawInputs:
    """Every input as a row, and how many there are (known before any task for files)."""

    frame: "DataFrame"
    kind: InputKind
    root: str  # the qualified input root (a folder, or the single record file)
    listing: tuple[tuple[str, int, int], ...]  # (path, size, modification ms) of every input file read
    payload_in_workers: bool = False  # `payload` is null: the consumer reads each file (`payloads`)
    shuffled: bool = False  # rows come in a seeded pseudo-random order (row groups mix classes unsorted)


def payloads(batch: "pd.DataFrame", in_workers: bool) -> "Sequence[Any]":
    """The payloads of a batch of input rows: the column itself, or the files' bytes read here in
    the Python worker (one pyarrow.fs open per file, no JVM read, no Arrow hop)."""
    if not in_workers:
        return batch["payload"]
    return filesystem.read_all(batch["path"], batch["size"].tolist())


def record_format(path: str) -> str:
    name = path.lower().removesuffix(".bz2").removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "jsonl"


def resolve_input(fs: HadoopFS, path: str, key: str, fmt: str, accepts_records: bool) -> tuple[str, InputKind]:
    """The qualified root and the kind of input under `path`, checked on the driver before any
    task (errors name `key`): it exists, and a files input is a folder."""
    root = fs.qualify(to_url(path))
    if not fs.exists(root):
        raise ConfigError(f"{key}: {path!r} does not exist ({root})")
    kind = input_kind(fs, root, fmt, accepts_records)
    if kind == "files" and not fs.is_dir(root):
        raise ConfigError(f"{key}: {path!r} is not a folder ({root})")
    return root, kind


def input_kind(fs: HadoopFS, root: str, fmt: str, accepts_records: bool) -> InputKind:
    """`input.format` resolved: records for CSV/JSONL (a file or a folder holding such files)."""
    if fmt in ("csv", "jsonl"):
        return "records"
    if fmt == "files" or not accepts_records:
        return "files"
    if not fs.is_dir(root):
        return "records"
    # Only files directly in the folder: a CSV of labels beside class folders of .txt files, or a
    # JSON somewhere below, does not turn a document folder into records.
    top = [path for path, _ in fs.list_files(root, RECORD_GLOB) if "/" not in path[len(root.rstrip("/")) + 1:]]
    return "records" if top else "files"


def read_files(spark: "SparkSession", root: str | list[str], glob: str, files_per_task: int) -> "DataFrame":
    """(path, length, content) of every matching file below `root` (or of exactly the files in a
    list), about `files_per_task` small files per task (Spark's default open cost would make one
    task per ~32 files)."""
    max_bytes = 128 * 1024 * 1024
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(max_bytes))
    spark.conf.set("spark.sql.files.openCostInBytes", str(max(1, max_bytes // files_per_task)))
    reader = spark.read.format("binaryFile")
    if isinstance(root, str):
        reader = reader.option("recursiveFileLookup", "true").option("pathGlobFilter", glob)
        return reader.load(root).select("path", "length", "content")
    # Explicit paths (an incremental run's candidates): Spark would list more than 32 of them with a
    # distributed job (~1 s here for 400 local files); statting them on the driver takes ~0.15 s.
    # Local files always, remote ones up to a few thousand (one RPC each), are cheaper that way.
    key = "spark.sql.sources.parallelPartitionDiscovery.threshold"
    before = spark.conf.get(key) or "32"  # Spark's default
    if all(p.startswith("file:") for p in root) or len(root) <= 2000:
        spark.conf.set(key, str(max(int(before), len(root) + 1)))
    try:
        return reader.load(root).select("path", "length", "content")
    finally:
        spark.conf.set(key, before)


def list_inputs(fs: HadoopFS, root: str, key: str, kind: InputKind, glob: str) -> tuple[tuple[str, int, int], ...]:
    """(path, size, modification ms) of every input file under a root from `resolve_input`:
    the files themselves, or the CSV/JSONL files holding records."""
    if kind == "files":
        return tuple(fs.list_file_status(root, glob))
    if not fs.is_dir(root):
        return (fs.file_status(root),)
    listing = tuple(fs.list_file_status(root, RECORD_GLOB))
    if not listing:
        raise ConfigError(f"{key}: no CSV or JSON Lines files under {root} (looked for {RECORD_GLOB})")
    return listing


def open_inputs(spark: "SparkSession", fs: HadoopFS, root: str, key: str, kind: InputKind, glob: str,
                files_per_task: int, columns: "RecordColumns | None" = None,
                listing: tuple[tuple[str, int, int], ...] | None = None, whole: bool = True,
                read_in_workers: bool = False, shuffle_seed: int | None = None) -> RawInputs:
    """The rows of every input under a root from `resolve_input` (errors name `key`). `listing`:
    the caller's `list_inputs` (not listed again), or with `whole=False` a subset of it (an
    incremental run's candidates). Every row names the file it came from in `source`.
    `read_in_workers`: files are read by the consumer's Python function (see `payloads`) where
    pyarrow.fs reaches the root, in the order of a seeded hash of their paths with `shuffle_seed`."""
    if listing is None:
        listing = list_inputs(fs, root, key, kind, glob)
    if kind == "files" and read_in_workers and filesystem.reaches(root):
        return _listed_files(spark, root, files_per_task, listing, shuffle_seed)
    if kind == "files":
        return _files(spark, root, glob, files_per_task, listing, whole)
    return _records(spark, root, key, columns or RecordColumns(), listing)


def _files(spark: "SparkSession", root: str, glob: str, files_per_task: int,
           listing: tuple[tuple[str, int, int], ...], whole: bool) -> RawInputs:
    from pyspark.sql import functions as F

    # A subset is read by its paths (Spark lists and reads nothing else), unless one of them holds a
    # glob character Spark would expand; then, like the whole folder, by its root.
    paths = [path for path, size, _ in listing if size > 0]
    by_root = whole or any(ch in path for path in paths for ch in GLOB_CHARS)
    if paths:
        files = read_files(spark, root if by_root else paths, glob, files_per_task).select(
            "path", F.col("length").alias("size"), F.col("content").alias("payload"),
            *(F.lit(None).cast("string").alias(c) for c in ("label_name", "split", "malformed")),
            F.col("path").alias("source"))
        if by_root and not whole:
            files = files.join(spark.createDataFrame([(p,) for p in paths], "path string"), "path", "left_semi")
    else:
        files = spark.createDataFrame([], FILES_DDL)
    empty = [(path, 0, bytearray(), None, None, None, path) for path, size, _ in listing if size == 0]
    if empty:  # Spark's file index skips 0-byte files; they must still come out as quarantine rows
        files = files.unionByName(spark.createDataFrame(empty, FILES_DDL))
    return RawInputs(files, "files", root, listing)


def seeded_order(paths: Sequence[str], seed: int) -> list[int]:
    """Positions of `paths` sorted by a seeded hash: a stable pseudo-random order (the same files
    in the same order on every run), so consecutive rows, and row groups, mix classes."""
    keys = [hashlib.blake2b(f"{seed}|{path}".encode(), digest_size=8).digest() for path in paths]
    return sorted(range(len(paths)), key=keys.__getitem__)


def _listed_files(spark: "SparkSession", root: str, files_per_task: int,
                  listing: tuple[tuple[str, int, int], ...], seed: int | None) -> RawInputs:
    """The driver's listing as rows without bytes, handed to the JVM as Arrow batches (no Python
    worker unpickles it), at most `files_per_task` files per task and at least one task per core."""
    import pandas as pd

    rows_in = listing if seed is None else [listing[i] for i in seeded_order([p for p, _, _ in listing], seed)]
    paths = [p for p, _, _ in rows_in]
    frame = pd.DataFrame({"path": paths, "size": pd.array([s for _, s, _ in rows_in], dtype="int64"),
                          **{c: pd.Series([None] * len(paths), dtype=object)
                             for c in ("payload", "label_name", "split", "malformed")},
                          "source": paths})
    # One partition per core: a Python worker per task costs ~70 ms here, so no smaller tasks.
    rows = frame_from_pandas(spark, frame, FILES_DDL)
    tasks = -(-len(listing) // files_per_task)
    if tasks > spark.sparkContext.defaultParallelism:  # a large listing: more tasks, so a retry redoes less
        rows = rows.repartition(tasks)
    return RawInputs(rows, "files", root, listing, payload_in_workers=True, shuffled=seed is not None)


@dataclass(frozen=True)
class RecordColumns:
    text: str = "text"
    label: str | None = "label"
    split: str | None = None
    label_required: bool = True  # inference scores records without a label column too
    encoding: str = "UTF-8"  # the files' character set (Spark's reader option)
    text_key: str = "input.text_column"
    label_key: str = "input.label_column"
    split_key: str = "input.split_column"


def _records(spark: "SparkSession", root: str, key: str, columns: RecordColumns,
             listing: tuple[tuple[str, int, int], ...]) -> RawInputs:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    formats = {record_format(p) for p, _, _ in listing}
    if len(formats) > 1:
        raise ConfigError(f"{key}: {root} mixes CSV and JSON Lines files; point it at one kind")
    paths = [p for p, _, _ in listing]
    if formats == {"csv"}:
        raw = (spark.read.option("header", "true").option("multiLine", "true").option("escape", '"')
               .option("mode", "PERMISSIVE").option("encoding", columns.encoding).csv(paths))
    else:
        raw = (spark.read.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt_record")
               .option("encoding", columns.encoding).json(paths))
    label = columns.label
    for config_key, column, required in ((columns.text_key, columns.text, True),
                                         (columns.label_key, columns.label, columns.label_required),
                                         (columns.split_key, columns.split, True)):
        if column is not None and column not in raw.columns:
            if not required:  # inference: records without labels are scored, not checked
                label = None
                continue
            raise ConfigError(f"{config_key}: column {column!r} is not in {root} (columns: {sorted(raw.columns)})")
    null = F.lit(None).cast("string")
    malformed = (F.when(F.col("_corrupt_record").isNotNull(), F.lit(MALFORMED)).otherwise(null)
                 if "_corrupt_record" in raw.columns else null)  # an unparseable JSON line
    # The numbering window's shuffle, sized by the files (a file's rows meet in one partition anyway)
    # and the cores, not Spark's 200 default: the frame is persisted, and AQE does not coalesce a
    # cached plan, so every job over it (statistics, vocabulary, writes) would run 200 tasks.
    partitions = max(1, min(len(paths), spark.sparkContext.defaultParallelism))
    file = F.input_file_name()
    # Position within its file: Spark reads a file's splits in offset order, so the monotonic id
    # orders rows as they stand in the file; the path `<file>#<row>` names a record stably.
    row = F.row_number().over(Window.partitionBy("_file").orderBy("_order")) - 1
    frame = (raw.select(F.col(columns.text).cast("string").alias("payload"),
                        (F.col(label).cast("string") if label else null).alias("label_name"),
                        (F.col(columns.split).cast("string") if columns.split else null).alias("split"),
                        malformed.alias("malformed"),
                        file.alias("_file"), F.monotonically_increasing_id().alias("_order"))
             .repartition(partitions, "_file")  # after numbering the scan's rows: their order is the file's
             .withColumn("path", F.concat(F.col("_file"), F.lit("#"), row.cast("string")))
             .select("path", F.coalesce(F.octet_length("payload"), F.lit(0)).cast("long").alias("size"),
                     "payload", "label_name", "split", "malformed", "_file"))
    # `source` = the file as the listing names it: Spark's input_file_name() is the URI form
    # (file:///a%20b.csv where the listing says file:/a b.csv). A left join: no record can vanish.
    uris = spark.createDataFrame([(_uri(spark, p), p) for p in paths], "_uri string, source string")
    frame = (frame.withColumn("_uri", F.regexp_replace("_file", "^file:///", "file:/"))
             .join(F.broadcast(uris), "_uri", "left")
             .withColumn("source", F.coalesce("source", "_uri")).drop("_uri", "_file"))
    return RawInputs(frame, "records", root, listing)


def _uri(spark: "SparkSession", path: str) -> str:
    """A listed path in the form Spark's input_file_name() reports (percent-encoded URI)."""
    jvm: Any = spark.sparkContext._jvm
    return str(jvm.org.apache.hadoop.fs.Path(path).toUri().toString())
