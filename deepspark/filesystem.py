"""Listing and reading input files from Python, on the driver and in Spark's Python workers.

One layer, `pyarrow.fs`, reaches the schemes the project claims from Python: local disks
(`file:`), HDFS (`hdfs:`, through libhdfs and the Hadoop CLASSPATH) and the object stores Arrow
ships (`s3:`, `gs:`). Reading small files here costs a few microseconds each, where Spark's
`binaryFile` source pays a JVM open and an Arrow round trip to the Python worker per file; a
listing is one call per folder, not one py4j call per file. Schemes Arrow does not reach
(`s3a:`, `abfs:`, ...) stay on the JVM: `reaches(url)` is False for them and callers fall back to
Spark's own readers. Paths go in and come out in Spark's `path` form (`file:/a/b.png`,
`hdfs://nn:8020/a/b.png`), so rows from either route join with each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

ARROW_SCHEMES = ("file", "hdfs", "viewfs", "s3", "gs", "gcs")


@dataclass(frozen=True)
class Location:
    """A file system and the prefix that turns its paths back into Spark's URL form."""

    fs: "pafs.FileSystem"
    prefix: str  # "file:" for local paths, "hdfs://nn:8020" for HDFS, "s3://" for buckets

    def url(self, path: str) -> str:
        return self.prefix + path


def _split(url: str) -> tuple[str, str]:
    """(the file-system key: scheme://authority, path) of a URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return "file:", parsed.path or url
    return f"{parsed.scheme}://{parsed.netloc}", parsed.path


@lru_cache(maxsize=16)
def _filesystem(key: str) -> "Location":
    """One file system per scheme and authority per process (a worker reuses its HDFS client)."""
    import pyarrow.fs as pafs

    if key == "file:":
        return Location(pafs.LocalFileSystem(), "file:")
    scheme = key.split(":", 1)[0]
    if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        return Location(_s3_at(os.environ["AWS_ENDPOINT_URL"]), "s3://")
    fs, _ = pafs.FileSystem.from_uri(key + "/")
    return Location(fs, key if scheme in ("hdfs", "viewfs") else f"{scheme}://")


def _s3_at(endpoint: str) -> "pafs.FileSystem":
    """An S3-compatible store at `AWS_ENDPOINT_URL` (pyarrow 10 does not read that variable);
    credentials from the environment as the AWS SDK finds them."""
    import pyarrow.fs as pafs

    parsed = urlparse(endpoint)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https", region=region)


def location(url: str) -> tuple[Location, str]:
    """The file system holding `url` and the path within it; raises if Arrow cannot reach it."""
    key, path = _split(url)
    scheme = key.split(":", 1)[0]
    if scheme not in ARROW_SCHEMES:
        raise ValueError(f"pyarrow.fs does not reach {scheme}: URLs ({url})")
    loc = _filesystem(key)
    if loc.prefix.endswith("://") and scheme != "file":  # object stores: the bucket is part of the path
        path = urlparse(url).netloc + path
    return loc, path


def s3_for_fsspec() -> None:
    """Let fsspec (so Petastorm: its resolver, its metadata writer, its readers) reach `s3://`
    through pyarrow's S3 client where s3fs is not installed (s3fs pins botocore against the pinned
    stack). Call before handing an s3:// URL to Petastorm, in each process."""
    import importlib.util

    import fsspec

    if importlib.util.find_spec("s3fs") is None:
        fsspec.register_implementation("s3", _arrow_s3(), clobber=True)


@lru_cache(maxsize=1)
def _arrow_s3() -> "type":
    from fsspec.implementations.arrow import ArrowFSWrapper

    class ArrowS3Wrapper(ArrowFSWrapper):  # type: ignore[misc]
        """fsspec's view of `location("s3://")`: built from the environment, so Petastorm's
        resolver can make one from a URL alone (on the driver and in every worker)."""

        protocol = "s3"

        def __init__(self, **kwargs: object) -> None:
            super().__init__(_filesystem("s3://").fs, **kwargs)

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return path.split("://", 1)[-1].rstrip("/")

    return ArrowS3Wrapper


def reaches(url: str) -> bool:
    """Whether this process can list and read `url` through pyarrow.fs (for HDFS: libhdfs loads)."""
    try:
        location(url)
        return True
    except Exception:  # unknown scheme, libhdfs or credentials missing: the JVM route remains
        return False


def list_file_status(url: str, name_matches: Callable[[str], bool]) -> list[tuple[str, int, int]]:
    """(path, size, modification ms) of every file below `url` whose name matches, sorted; folders
    and files whose names start with `_` or `.` (Spark's and Hadoop's bookkeeping) are skipped,
    0-byte files are kept (Spark's file index would drop them)."""
    import pyarrow.fs as pafs

    loc, root = location(url)
    root = root.rstrip("/") or "/"
    found = []
    for info in loc.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/")) or not name_matches(info.base_name):
            continue
        found.append((loc.url(info.path), int(info.size), int(info.mtime_ns // 1_000_000)))
    return sorted(found)


def read_all(urls: Iterable[str], sizes: Sequence[int] | None = None) -> list[bytes]:
    """The whole content of each file, in order. An I/O error propagates (the Spark task fails and
    is retried): a file that cannot be read now is not a bad input. A listed size of 0 is read as
    empty without opening the file."""
    out = []
    for i, url in enumerate(urls):
        if sizes is not None and sizes[i] == 0:
            out.append(b"")
            continue
        loc, path = location(url)
        with loc.fs.open_input_file(path) as handle:
            out.append(handle.read())
    return out


def read_bytes(url: str) -> bytes:
    """One file's whole content."""
    loc, path = location(url)
    with loc.fs.open_input_stream(path) as handle:
        return handle.read()


def write_atomic(url: str, data: bytes) -> None:
    """Write a file that readers see whole or not at all: written beside under a unique name, then
    moved onto its name (an atomic rename on local and NFS disks and HDFS; an object store's move
    is a copy whose new object appears whole). Its folder is created if needed."""
    import uuid

    loc, path = location(url)
    loc.fs.create_dir(path.rpartition("/")[0], recursive=True)
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    with loc.fs.open_output_stream(staging) as out:
        out.write(data)
    loc.fs.move(staging, path)


def is_file(url: str) -> bool:
    import pyarrow.fs as pafs

    loc, path = location(url)
    return loc.fs.get_file_info(path).type == pafs.FileType.File


def delete_file(url: str) -> None:
    """Remove one file; nothing if it is already gone."""
    loc, path = location(url)
    try:
        loc.fs.delete_file(path)
    except FileNotFoundError:
        pass


def file_names(url: str) -> list[str]:
    """The names of the files directly in a folder (none if it does not exist), sorted."""
    import pyarrow.fs as pafs

    loc, path = location(url)
    return sorted(i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if i.type == pafs.FileType.File)


def local_copy(url: str, folder: str) -> str:
    """A copy of one file (local or on any file system this layer reaches) in a local `folder`, for
    readers that take only a local path (Keras' model and weights loaders); its path."""
    local = os.path.join(folder, os.path.basename(url.rstrip("/")) or "file")
    data = read_bytes(url)
    with open(local, "wb") as out:
        out.write(data)
    return local


def parquet_footers(url: str) -> dict[str, tuple[int, int]]:
    """(rows, row groups) of each Parquet file below `url`, by its path relative to `url`, from
    the footers alone: no Spark job, no data page read."""
    import pyarrow.parquet as pq

    prefix = url.rstrip("/") + "/"
    found = {}
    for path, _, _ in list_file_status(url, lambda name: name.endswith(".parquet")):
        loc, inner = location(path)
        with loc.fs.open_input_file(inner) as handle:
            meta = pq.ParquetFile(handle).metadata
        found[path[len(prefix):] if path.startswith(prefix) else path] = (meta.num_rows, meta.num_row_groups)
    return found


def read_parquet(urls: Iterable[str], columns: Sequence[str], types: "Mapping[str, pa.DataType]") -> "pa.Table":
    """`columns` of every Parquet file below each folder in `urls`, read by this process through
    pyarrow (no Spark job): the driver's way to read a small table. A column a file lacks (written
    before it existed) comes back null, typed by `types`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, types[c]) for c in columns])
    parts = []
    for url in urls:
        for path, _, _ in list_file_status(url, lambda name: name.endswith(".parquet")):
            loc, inner = location(path)
            with loc.fs.open_input_file(inner) as handle:
                held = pq.ParquetFile(handle)
                present = [c for c in columns if c in held.schema_arrow.names]
                table = held.read(columns=present)
            parts.append(pa.table({c: table[c].cast(types[c]) if c in present else pa.nulls(len(table), types[c])
                                   for c in columns}, schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def parquet_totals(url: str) -> tuple[int, int]:
    """(rows, row groups) of the Parquet files below `url`: what a dataset holds."""
    footers = parquet_footers(url).values()
    return sum(rows for rows, _ in footers), sum(groups for _, groups in footers)
