"""Paths, URLs and atomic publishing on any Hadoop-compatible file system.

Datasets are published as `<root>/<name>/v=<n>/`: everything is written under
`<root>/<name>/_staging/` first and appears under its final name by one rename,
so a killed job leaves the previous version readable and current. The `_LATEST`
pointer names the newest complete version; readers fall back to the highest
`v=<n>` folder if the pointer is missing. One ETL run at a time holds `<root>/<name>/_LOCK`
(`deepspark.locks.Lease`) and numbers its version once, under it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

VERSION_DIR = re.compile(r"^v=(\d+)$")
LATEST_POINTER = "_LATEST"
STAGING_DIR = "_staging"


def to_url(path_or_url: str) -> str:
    """A local path becomes an absolute file:// URL; URLs with a scheme pass through."""
    parsed = urlparse(path_or_url)
    if parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
        if parsed.scheme == "file":
            return "file://" + os.path.abspath(parsed.path)
        return path_or_url.rstrip("/")
    return "file://" + os.path.abspath(os.path.expanduser(path_or_url))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def local_path(url: str) -> Path | None:
    """The local path behind a file:// URL, or None for remote file systems."""
    parsed = urlparse(url)
    return Path(parsed.path) if parsed.scheme == "file" else None


def glob_matcher(pattern: str) -> "Callable[[str], bool]":
    """Hadoop GlobFilter semantics for file names: * ? [...] and {a,b} alternatives."""
    def expand(p: str) -> list[str]:
        match = re.search(r"\{([^{}]*)\}", p)
        if not match:
            return [p]
        return [x for alt in match.group(1).split(",") for x in expand(p[: match.start()] + alt + p[match.end():])]

    regexes = [re.compile(fnmatch.translate(p)) for p in expand(pattern)]
    return lambda name: any(r.match(name) for r in regexes)




def s3_object(url: str) -> tuple[str, str] | None:
    """(bucket, key) of an s3:// or s3a:// URL; None for other schemes."""
    parsed = urlparse(url)
    return (parsed.netloc, parsed.path.lstrip("/")) if parsed.scheme in ("s3", "s3a") else None


class S3Conditional:
    """Exclusive create, heartbeat and move of small files on S3 through the store's conditional
    writes (If-None-Match / If-Match, which AWS S3 and most S3-compatible stores honour): S3A's
    create-if-absent is a check then a write and its rename a copy then a delete, so two writers
    could both win there. boto3 finds the endpoint (AWS_ENDPOINT_URL) and credentials itself."""

    LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412")

    def __init__(self) -> None:
        import boto3

        self.client = boto3.client("s3")

    def _refused(self, exc: Exception, url: str) -> bool:
        """True when a condition failed; raises naming the store when it cannot do conditions."""
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in self.LOST:
            return True
        if code in ("NotImplemented", "501"):
            raise OSError(f"{url}: this S3 store does not support conditional writes (If-None-Match/If-Match), "
                          "which locks and commit logs need; keep this output on HDFS or a local disk") from exc
        raise exc

    def create_exclusive(self, url: str, body: bytes) -> bool:
        bucket, key = s3_object(url) or ("", "")
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except Exception as exc:
            if self._refused(exc, url):
                return False
            raise

    def rewrite(self, url: str) -> bool:
        """Write a file's own content again (a new modification time), unless it changed since read."""
        bucket, key = s3_object(url) or ("", "")
        try:
            current = self.client.get_object(Bucket=bucket, Key=key)
            self.client.put_object(Bucket=bucket, Key=key, Body=current["Body"].read(), IfMatch=current["ETag"])
            return True
        except Exception as exc:
            if self._refused(exc, url):
                return False
            raise

    def move(self, src: str, dst: str) -> bool:
        """Copy `src` to a `dst` that does not exist, then delete `src` only if it is still what was
        copied: of two movers of the same file both may copy, but a file that changed in between
        (a new lock) is never deleted. False if `src` is gone, changed, or `dst` exists."""
        bucket, key = s3_object(src) or ("", "")
        try:
            current = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if self._refused(exc, src):
                return False
            raise
        if not self.create_exclusive(dst, current["Body"].read()):
            return False
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=current["ETag"])
            return True
        except Exception as exc:
            if self._refused(exc, src):
                return False
            raise


@lru_cache(maxsize=1)
def _s3() -> S3Conditional:
    """One boto3 client per process for locks and commit logs (a lease beats every ttl/3)."""
    return S3Conditional()


@dataclass(frozen=True)
class HadoopFS:
    """Thin wrapper over the JVM's Hadoop FileSystem for the driver-side bookkeeping."""

    spark: "SparkSession"

    def _fs(self, url: str) -> tuple[Any, Any]:
        jvm: Any = self.spark.sparkContext._jvm  # py4j's gateway (None only before the context starts)
        path = jvm.org.apache.hadoop.fs.Path(url)
        conf = self.spark.sparkContext._jsc.hadoopConfiguration()
        return path.getFileSystem(conf), path

    def qualify(self, url: str) -> str:
        """The fully qualified form Spark reports in its `path` columns."""
        fs, path = self._fs(url)
        return str(fs.makeQualified(path).toString())

    def exists(self, url: str) -> bool:
        fs, path = self._fs(url)
        return bool(fs.exists(path))

    def is_dir(self, url: str) -> bool:
        fs, path = self._fs(url)
        return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())

    def list_dir_names(self, url: str) -> list[str]:
        fs, path = self._fs(url)
        if not fs.exists(path):
            return []
        return sorted(str(status.getPath().getName()) for status in fs.listStatus(path) if status.isDirectory())

    def list_file_names(self, url: str) -> list[str]:
        """Names of the files directly in a folder."""
        fs, path = self._fs(url)
        if not fs.exists(path):
            return []
        return sorted(str(status.getPath().getName()) for status in fs.listStatus(path) if status.isFile())

    def list_files(self, url: str, name_glob: str) -> list[tuple[str, int]]:
        """Every file below `url` whose name matches the Hadoop-style glob, with its size,
        in Spark's `path` format. Unlike Spark's file index this keeps 0-byte files."""
        return [(path, size) for path, size, _ in self.list_file_status(url, name_glob)]

    def list_file_status(self, url: str, name_glob: str) -> list[tuple[str, int, int]]:
        """`list_files` with each file's modification time (ms since the epoch): the metadata an
        incremental run compares before it reads any content."""
        from deepspark import filesystem

        root = self.qualify(url)
        matches = glob_matcher(name_glob)
        if filesystem.reaches(root):  # one call per folder, not a py4j call per file
            return filesystem.list_file_status(root, matches)
        fs, path = self._fs(root)
        it = fs.listFiles(path, True)
        found = []
        while it.hasNext():
            status = it.next()
            name = str(status.getPath().getName())
            if matches(name) and not name.startswith(("_", ".")):
                found.append((str(status.getPath().toString()), int(status.getLen()),
                              int(status.getModificationTime())))
        return sorted(found)

    def dir_ages(self, url: str) -> dict[str, float]:
        """Sub-folder name -> seconds since it was last modified."""
        fs, path = self._fs(url)
        if not fs.exists(path):
            return {}
        now_ms = time.time() * 1000
        return {str(st.getPath().getName()): (now_ms - st.getModificationTime()) / 1000
                for st in fs.listStatus(path) if st.isDirectory()}

    def mkdirs(self, url: str) -> None:
        fs, path = self._fs(url)
        fs.mkdirs(path)

    def delete(self, url: str) -> None:
        fs, path = self._fs(url)
        if fs.exists(path):
            fs.delete(path, True)

    def read_text(self, url: str) -> str:
        fs, path = self._fs(url)
        stream = fs.open(path)
        try:
            jvm: Any = self.spark.sparkContext._jvm
            reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, "UTF-8"))
            lines = []
            line = reader.readLine()
            while line is not None:
                lines.append(line)
                line = reader.readLine()
            return "\n".join(lines)
        finally:
            stream.close()

    def write_text(self, url: str, text: str, overwrite: bool = True) -> bool:
        """Write a small file; with overwrite=False only if it does not exist yet (False if another
        writer won: the file system arbitrates)."""
        from py4j.protocol import Py4JJavaError

        fs, path = self._fs(url)
        try:
            stream = fs.create(path, overwrite)
        except Py4JJavaError as exc:
            if not overwrite and "FileAlreadyExists" in str(exc.java_exception):
                return False
            raise
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        return True

    def file_status(self, url: str) -> tuple[str, int, int]:
        """(qualified path, size, modification ms) of one file."""
        fs, path = self._fs(url)
        status = fs.getFileStatus(path)
        return str(status.getPath().toString()), int(status.getLen()), int(status.getModificationTime())

    def modified_ms(self, url: str) -> int | None:
        """A file's modification time (ms since the epoch, as stamped by whoever last touched it:
        the writer's clock on a local disk), None if absent."""
        local = local_path(url)
        if local is not None:
            try:
                return os.stat(local).st_mtime_ns // 1_000_000
            except FileNotFoundError:
                return None
        fs, path = self._fs(url)
        return int(fs.getFileStatus(path).getModificationTime()) if fs.exists(path) else None

    def touch(self, url: str) -> None:
        """Set a file's modification time to now (a lease's heartbeat; on S3, where S3A cannot set
        times, the file is written again unless it changed)."""
        if s3_object(url) is not None:
            _s3().rewrite(url)
            return
        local = local_path(url)
        if local is not None:
            os.utime(local)
            return
        fs, path = self._fs(url)
        fs.setTimes(path, int(time.time() * 1000), -1)

    def create_exclusive(self, url: str, text: str) -> bool:
        """Create a small file with its whole content only if no file of that name exists; False
        when one does. Atomic where the project claims it: on a local disk the content is written
        to a temporary file and hard-linked to the name (link fails if the name exists); on HDFS
        a file renamed onto an existing name fails. (s3a: a rename is copy + delete, so two writers
        can both win there: on S3 the store's conditional write decides, `S3Conditional`.)"""
        if s3_object(url) is not None:
            return _s3().create_exclusive(url, text.encode("utf-8"))
        local = local_path(url)
        tmp = f"{url}.{uuid.uuid4().hex}.tmp"
        if local is not None:
            tmp_local = local_path(tmp)
            assert tmp_local is not None
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp_local.write_text(text, encoding="utf-8")
            try:
                os.link(tmp_local, local)
                return True
            except FileExistsError:
                return False
            finally:
                tmp_local.unlink(missing_ok=True)
        self.write_text(tmp, text)
        fs, path = self._fs(url)
        _, tmp_path = self._fs(tmp)
        try:
            return bool(fs.rename(tmp_path, path))  # HDFS: false when `url` exists
        finally:
            if fs.exists(tmp_path):
                fs.delete(tmp_path, False)

    def move_file(self, src: str, dst: str) -> bool:
        """Rename a file to a name that does not exist yet; False if `src` is gone (someone else
        moved it first) or `dst` exists."""
        if s3_object(src) is not None and s3_object(dst) is not None:
            return _s3().move(src, dst)
        local, dst_local = local_path(src), local_path(dst)
        if local is not None and dst_local is not None:
            if dst_local.exists():
                return False
            try:  # one atomic rename: of two movers of the same file only one finds it
                os.rename(local, dst_local)
            except FileNotFoundError:
                return False
            return True
        fs, src_path = self._fs(src)
        _, dst_path = self._fs(dst)
        return bool(fs.rename(src_path, dst_path))

    def rename(self, src: str, dst: str) -> None:
        """Rename `src` to `dst`; refuses to move into an existing destination."""
        fs, src_path = self._fs(src)
        _, dst_path = self._fs(dst)
        if fs.exists(dst_path):
            raise FileExistsError(f"cannot publish {src}: {dst} already exists")
        if not fs.rename(src_path, dst_path):
            raise OSError(f"rename {src} -> {dst} failed")

    def replace_text(self, url: str, text: str) -> None:
        """Write a small file so readers see the old or the new content, never a partial one."""
        tmp = f"{url}.{uuid.uuid4().hex}.tmp"
        self.write_text(tmp, text)
        fs, path = self._fs(url)
        _, tmp_path = self._fs(tmp)
        local, tmp_local = local_path(url), local_path(tmp)
        if local is not None and tmp_local is not None:  # POSIX rename replaces atomically
            os.replace(tmp_local, local)
            # Drop the temp file's checksum: the pointer then has no .crc, so Hadoop's checksummed
            # local file system never verifies it against a stale one.
            tmp_local.with_name(f".{tmp_local.name}.crc").unlink(missing_ok=True)
            return
        if fs.exists(path):
            fs.delete(path, False)
        if not fs.rename(tmp_path, path):
            raise OSError(f"rename {tmp} -> {url} failed")


@dataclass(frozen=True)
class VersionedLocation:
    """`<root>/<name>/v=<n>/` versions with a `_LATEST` pointer and a staging area."""

    fs: HadoopFS
    root: str
    name: str

    @property
    def base(self) -> str:
        return join(self.root, self.name)

    def versions(self) -> list[int]:
        """Complete versions: only published (renamed) folders match `v=<n>`."""
        found = (VERSION_DIR.match(name) for name in self.fs.list_dir_names(self.base))
        return sorted(int(match.group(1)) for match in found if match)

    def latest(self) -> int | None:
        pointer = join(self.base, LATEST_POINTER)
        if self.fs.exists(pointer):
            text = self.fs.read_text(pointer).strip()
            if text.isdigit() and self.fs.is_dir(self.version_url(int(text))):
                return int(text)
        versions = self.versions()
        return versions[-1] if versions else None

    def version_url(self, version: int) -> str:
        return join(self.base, f"v={version}")

    def resolve(self, version: int | None) -> tuple[int, str]:
        """A given version, or the latest; raises naming the location when absent."""
        chosen = self.latest() if version is None else version
        if chosen is None or not self.fs.is_dir(self.version_url(chosen)):
            raise FileNotFoundError(
                f"dataset {self.name!r}: no {'complete version' if version is None else f'version {version}'}"
                f" under {self.base} (have {self.versions()})"
            )
        return chosen, self.version_url(chosen)

    def clean_staging(self, older_than_s: float) -> list[str]:
        """Delete staging folders left by killed runs (a live run's folder is younger)."""
        staging = join(self.base, STAGING_DIR)
        stale = [name for name, age in self.fs.dir_ages(staging).items() if age > older_than_s]
        for name in stale:
            self.fs.delete(join(staging, name))
        return stale

    def new_staging(self) -> str:
        url = join(self.base, STAGING_DIR, uuid.uuid4().hex)
        self.fs.mkdirs(url)
        return url

    def next_version(self) -> int:
        """The number the next publish takes: ask once, while holding the dataset's lock."""
        return (self.versions() or [0])[-1] + 1

    def publish(self, staging_url: str, version: int) -> str:
        """Move a finished staging folder to `v=<version>` (refused if it exists: on HDFS a rename
        onto a folder would nest inside it) and point `_LATEST` at it. Call holding the lock."""
        final = self.version_url(version)
        self.fs.rename(staging_url, final)
        self.fs.replace_text(join(self.base, LATEST_POINTER), f"{version}\n")
        return final
