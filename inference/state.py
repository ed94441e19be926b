"""The prediction and quarantine tables, their commit log, and how to read them consistently.

Layout:
  <output>/model_version=<v>/batch=<job id>/part-*.parquet       predictions
  <quarantine>/model_version=<v>/batch=<job id>/part-*.parquet   inputs that could not be scored
  <output>/_drift/model_version=<v>/batch=<job id>/part-*.parquet the run's drift against the reference
  <output>/_log/<n>.json                                          commit n: every live batch of both
  <output>/_LOCK                                                  the running job's lease
A run writes its batches under their final names, then commits by creating the next log file
(exclusive create: one commit point for both tables). Readers open the newest log entry and read
exactly the batches it lists (`read_table`), so a run's predictions, quarantine and drift appear
together, and a full refresh swaps the old batches for the new ones in one step: readers see the
old complete output or the new one, never neither. Batches no log entry lists (a killed run's)
and batches dropped by a full refresh or by `compact` (many small batches rewritten as one) are
deleted once neither the two newest entries nor any entry younger than `output.retain_hours`
lists them, so a reader that opened an entry in that window can still finish. An output written
before the log existed is adopted as it stands (its folders count as committed).

The committed rows are also the incremental state: every row carries its source file's size and
modification time, so a run skips a listed file whose (path, size, mtime) is committed without
reading it, and hashes only the rest.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from deepspark.locks import LOCK_FILE, ConcurrentRunError
from deepspark.storage import HadoopFS, join, to_url

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

LOG = "_log"
KEY = ["path", "content_hash"]
SOURCE = ["source", "source_size", "source_modified"]  # the input file a row came from, as listed
TABLES = ("predictions", "quarantine", "drift")
SCORED = ("predictions", "quarantine")  # the tables holding one row per input (the incremental state)
DRIFT = "_drift"  # the drift table's folder under the output (Spark and Hive skip names starting with _)
KEEP_LOG_ENTRIES = 20
_ENTRY = re.compile(r"^(\d{20})\.json$")
_BATCH = re.compile(r"^batch=(.+)$")

__all__ = ["ConcurrentRunError", "Snapshot", "PredictionStore", "read_table", "read_tables", "read_commit"]


@dataclass(frozen=True)
class Snapshot:
    """One commit: the live batches of each table per model version."""

    number: int = 0
    batches: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {t: {} for t in TABLES})
    job_id: str | None = None
    committed_at: float | None = None

    def live(self, table: str, version: int | None = None) -> list[tuple[int, str]]:
        """(model version, batch name) pairs of a table, optionally of one model version."""
        return [(int(v), b) for v, names in sorted(self.batches.get(table, {}).items(), key=lambda kv: int(kv[0]))
                if version is None or int(v) == version for b in names]

    def with_batches(self, version: int, added: dict[str, list[str]], replace: bool) -> dict[str, dict[str, list[str]]]:
        out = {t: {v: list(names) for v, names in self.batches.get(t, {}).items()} for t in TABLES}
        for table in TABLES:
            names = [] if replace else out[table].get(str(version), [])
            names = names + added.get(table, [])
            if names:
                out[table][str(version)] = names
            else:
                out[table].pop(str(version), None)
        return out

    def to_json(self) -> str:
        return json.dumps({"number": self.number, "batches": self.batches, "job_id": self.job_id,
                           "committed_at": self.committed_at}, indent=1, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PredictionStore:
    fs: HadoopFS
    url: str  # predictions (holds the log and the lock)
    quarantine_url: str

    @classmethod
    def open(cls, fs: HadoopFS, path: str, quarantine_path: str | None = None) -> "PredictionStore":
        url = fs.qualify(to_url(path))
        return cls(fs, url, fs.qualify(to_url(quarantine_path or path.rstrip("/") + "_quarantine")))

    @property
    def lock_url(self) -> str:
        return join(self.url, LOCK_FILE)

    def table_url(self, table: str) -> str:
        return {"predictions": self.url, "drift": join(self.url, DRIFT)}.get(table, self.quarantine_url)

    def batch_url(self, table: str, version: int, job_id: str) -> str:
        return join(self.table_url(table), f"model_version={version}", f"batch={job_id}")

    def _entries(self) -> list[int]:
        log = join(self.url, LOG)
        if not self.fs.exists(log):
            return []
        names = self.fs.list_file_names(log)
        return sorted(int(m.group(1)) for m in map(_ENTRY.match, names) if m)

    def current(self) -> Snapshot:
        """The newest commit. Before the first: the batch folders an output written before the
        commit log holds (its runs committed by renaming them into place), else nothing."""
        entries = self._entries()
        if not entries:
            return Snapshot(0, self._folders())
        return self._entry(entries[-1])

    def begin(self) -> None:
        """Call before a run writes its first batch (holding the lock). An output with no log
        entry gets entry 0, listing the batch folders it holds now: none for a new output, its own
        for one written before the log. A batch written after it stays invisible to readers until
        a commit lists it, also when the first run ever is killed before committing."""
        if not self._entries():
            self.fs.create_exclusive(self._entry_url(0), Snapshot(0, self._folders(), "adopted", time.time()).to_json())

    def _entry(self, number: int) -> Snapshot:
        data = json.loads(self.fs.read_text(self._entry_url(number)))
        return Snapshot(data["number"], data["batches"], data.get("job_id"), data.get("committed_at"))

    def _folders(self) -> dict[str, dict[str, list[str]]]:
        """Every batch folder on disk, per table and model version."""
        found: dict[str, dict[str, list[str]]] = {t: {} for t in TABLES}
        for table in TABLES:
            for version_dir in self.fs.list_dir_names(self.table_url(table)):
                if version_dir.startswith("model_version="):
                    names = self.fs.list_dir_names(join(self.table_url(table), version_dir))
                    batches = [m.group(1) for m in map(_BATCH.match, names) if m]
                    if batches:
                        found[table][version_dir.split("=", 1)[1]] = batches
        return found

    def _entry_url(self, number: int) -> str:
        return join(self.url, LOG, f"{number:020d}.json")

    def committed(self, spark: "SparkSession", version: int, columns: Iterable[str],
                  snapshot: Snapshot | None = None) -> "DataFrame | None":
        """Columns of both scored tables' committed rows for one model version (None when there are none)."""
        from pyspark.sql import functions as F

        snap = snapshot or self.current()
        frames = []
        for table in SCORED:
            urls = [self.batch_url(table, v, b) for v, b in snap.live(table, version)]
            if urls:
                rows = spark.read.parquet(*urls)
                # Rows written before the metadata columns existed: null metadata, never skipped unread.
                types = {"source": "string", "source_size": "long", "source_modified": "long"}
                frames.append(rows.select(*[c if c in rows.columns else F.lit(None).cast(types[c]).alias(c)
                                            for c in columns]))
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])

    def committed_table(self, version: int, columns: Iterable[str], snapshot: Snapshot | None = None
                        ) -> "pa.Table | None":
        """`committed`'s rows read by the driver through pyarrow (not by a Spark job: the hourly no-op run's
        check costs a file read, not a job); None when pyarrow does not reach the output."""
        import pyarrow as pa

        from deepspark import filesystem

        if not (filesystem.reaches(self.url) and filesystem.reaches(self.quarantine_url)):
            return None
        snap = snapshot or self.current()
        urls = [self.batch_url(table, v, b) for table in SCORED for v, b in snap.live(table, version)]
        types = {"source": pa.string(), "source_size": pa.int64(), "source_modified": pa.int64(),
                 "path": pa.string(), "content_hash": pa.string()}
        return filesystem.read_parquet(urls, list(columns), types)

    def commit(self, job_id: str, added: Mapping[int, dict[str, list[str]]], replace: bool,
               base: Snapshot) -> Snapshot:
        """Make a run's batches visible, every model version's and both tables at once: create log
        entry base+1. `added`: model version -> table -> batch names; with `replace`, each listed
        version's earlier batches leave. Fails if another commit got there first (the lock should
        make that impossible)."""
        batches = base.batches
        for version, tables in added.items():
            batches = Snapshot(base.number, batches).with_batches(version, tables, replace)
        snap = Snapshot(base.number + 1, batches, job_id, time.time())
        if not self.fs.create_exclusive(self._entry_url(snap.number), snap.to_json()):
            raise ConcurrentRunError(f"{self.url}: commit {snap.number} was made by another run; nothing of "
                                     f"job {job_id} was committed")
        return snap

    def compact(self, spark: "SparkSession", version: int, job_id: str, base: Snapshot,
                before_commit: "Callable[[], None]" = lambda: None, rows_per_file: int = 1_000_000
                ) -> Snapshot | None:
        """Rewrite one model version's live batches of each table as one batch (`<job_id>-compact`)
        and swap them in with one commit; readers see the same rows before and after. None when no
        table has more than one batch. Call only while holding the lock."""
        if all(len(base.live(t, version)) <= 1 for t in TABLES):
            return None
        self.begin()  # the compacted batch must stay invisible until its commit
        added: dict[str, list[str]] = {}
        for table in TABLES:
            live = base.live(table, version)
            if len(live) <= 1:
                added[table] = [b for _, b in live]
                continue
            name = f"{job_id}-compact"
            rows = spark.read.parquet(*[self.batch_url(table, v, b) for v, b in live])
            files = max(1, -(-rows.count() // rows_per_file))
            rows.coalesce(files).write.parquet(self.batch_url(table, version, name))
            added[table] = [name]
        before_commit()  # e.g. the lease check
        return self.commit(job_id, {version: added}, replace=True, base=base)

    def vacuum(self, retain_s: float) -> list[str]:
        """Delete batches no log entry kept lists (killed runs' and replaced ones) and old log
        entries. Kept: the two newest entries and every entry younger than `retain_s`, so a reader
        that opened an entry in that window can finish. Call only while holding the lock; does
        nothing before the first commit (an output from before the log keeps its folders)."""
        entries = self._entries()
        if not entries:
            return []
        now = time.time()
        kept = [self._entry(n) for n in entries]
        kept = [snap for i, snap in enumerate(kept)
                if i >= len(kept) - 2 or (snap.committed_at or 0) >= now - retain_s]
        keep = {(t, v, b) for snap in kept for t in TABLES for v, b in snap.live(t)}
        removed = []
        for table, versions in self._folders().items():
            for version, names in versions.items():
                for name in names:
                    if (table, int(version), name) not in keep:
                        self.fs.delete(self.batch_url(table, int(version), name))
                        removed.append(self.batch_url(table, int(version), name))
                folder = join(self.table_url(table), f"model_version={version}")
                if not self.fs.list_dir_names(folder):
                    self.fs.delete(folder)
        oldest_kept = kept[0].number
        for number in entries[:-KEEP_LOG_ENTRIES]:
            if number < oldest_kept:
                self.fs.delete(self._entry_url(number))
        return removed


def read_table(spark: "SparkSession", path: str, table: str = "predictions", model_version: int | None = None,
               quarantine_path: str | None = None) -> "DataFrame":
    """The current committed predictions (or quarantine) of an output folder, consistently: the
    batches of its newest commit, never a half-committed run. `model_version` narrows to one.
    To read both tables as of the same commit, use `read_tables`."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, not {table!r}")
    store = PredictionStore.open(HadoopFS(spark), path, quarantine_path)
    frame = _read(spark, store, store.current(), table, model_version)
    if frame is None:
        raise FileNotFoundError(f"{store.url}: no committed {table}"
                                + (f" for model version {model_version}" if model_version else ""))
    return frame


def read_tables(spark: "SparkSession", path: str, model_version: int | None = None,
                quarantine_path: str | None = None) -> tuple["DataFrame | None", "DataFrame | None", int]:
    """(predictions, quarantine, commit number), both as of the same newest commit (None for a
    table that commit holds nothing of). Spark lists a DataFrame's files when it is created, so
    both stay on that commit's batches while later runs commit."""
    store = PredictionStore.open(HadoopFS(spark), path, quarantine_path)
    snap = store.current()
    return (_read(spark, store, snap, "predictions", model_version),
            _read(spark, store, snap, "quarantine", model_version), snap.number)


def _read(spark: "SparkSession", store: PredictionStore, snap: Snapshot, table: str,
          model_version: int | None) -> "DataFrame | None":
    urls = [store.batch_url(table, v, b) for v, b in snap.live(table, model_version)]
    if not urls:
        return None
    # basePath: Spark adds model_version (and batch) from the folder names, as for the whole folder
    return spark.read.option("basePath", store.table_url(table)).parquet(*urls).drop("batch")


@dataclass(frozen=True)
class Commit:
    """The tables of one commit, read together (None for a table it holds nothing of)."""

    number: int
    predictions: "DataFrame | None"
    quarantine: "DataFrame | None"
    drift: "DataFrame | None"


def read_commit(spark: "SparkSession", path: str, model_version: int | None = None,
                quarantine_path: str | None = None) -> Commit:
    """Every table as of the newest commit: the predictions, the quarantine and the drift of the
    runs that commit holds, so a scheduler reading predictions reads the drift judged on them."""
    store = PredictionStore.open(HadoopFS(spark), path, quarantine_path)
    snap = store.current()
    return Commit(snap.number, *(_read(spark, store, snap, t, model_version) for t in TABLES))
