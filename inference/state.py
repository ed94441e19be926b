"""The prediction table and its state: incremental, exactly-once, one writer at a time.

Layout under `output.path`:
  model_version=<v>/batch=<job id>/part-*.parquet   committed predictions (what readers see)
  _staging/<job id>/...                               a run's output before its commit
  _LOCK                                               the running job (refuses a second writer)
The state *is* the committed output: a run scores the inputs whose (path, content_hash) are
not yet committed for this model version, writes them under `_staging/`, and commits with
one rename per table. A crash before the rename leaves nothing visible; a rerun scores the
same inputs again, so there are no duplicates and no gaps. Quarantined inputs are committed
the same way in the quarantine table, so they are not retried every run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deepspark.storage import HadoopFS, join

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

LOCK = "_LOCK"
STAGING = "_staging"
KEY = ["path", "content_hash"]


class ConcurrentRunError(RuntimeError):
    """Another run holds the output's lock."""


@dataclass(frozen=True)
class Table:
    fs: HadoopFS
    url: str

    def version_dir(self, version: int) -> str:
        return join(self.url, f"model_version={version}")

    def staging(self, job_id: str) -> str:
        return join(self.url, STAGING, job_id)

    def committed(self, spark: "SparkSession", version: int) -> "DataFrame | None":
        """This model version's committed rows, or None when there are none yet."""
        path = self.version_dir(version)
        if not self.fs.exists(path) or not self.fs.list_dir_names(path):
            return None
        return spark.read.parquet(path)

    def commit(self, job_id: str, version: int) -> str:
        """Move a run's staged output into the table: one rename, visible all at once."""
        target = join(self.version_dir(version), f"batch={job_id}")
        self.fs.mkdirs(self.version_dir(version))
        self.fs.rename(self.staging(job_id), target)
        return target

    def drop_version(self, version: int) -> None:
        self.fs.delete(self.version_dir(version))


@dataclass(frozen=True)
class Lock:
    """`_LOCK` created with overwrite=false: the file system arbitrates between concurrent runs."""

    fs: HadoopFS
    url: str
    job_id: str

    @property
    def path(self) -> str:
        return join(self.url, LOCK)

    def acquire(self, force: bool) -> None:
        owner = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self.fs.mkdirs(self.url)
        if self.fs.exists(self.path):
            held = self._holder()
            if not force and not self._stale(held):
                raise ConcurrentRunError(
                    f"output {self.url} is locked by job {held.get('job_id')} (pid {held.get('pid')} on "
                    f"{held.get('host')}); wait for it, or pass force_unlock=true if that job is gone")
            self.fs.delete(self.path)
        if not self.fs.write_text(self.path, json.dumps(owner), overwrite=False):
            raise ConcurrentRunError(f"output {self.url} was locked by another run just now")

    def release(self) -> None:
        if self._holder().get("job_id") == self.job_id:
            self.fs.delete(self.path)

    def _holder(self) -> dict:
        try:
            return json.loads(self.fs.read_text(self.path))
        except Exception:
            return {}

    @staticmethod
    def _stale(held: dict) -> bool:
        """A lock whose process is gone from this very host is stale; elsewhere we cannot tell."""
        if held.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False
