"""SparkSession construction shared by every job.

Settings given to spark-submit (`--master`, `--conf`) win over the job's config, so the
same job runs unchanged in local mode and on a cluster.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Mapping

from pydantic import Field

from deepspark.config import FrozenModel

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import SparkConf
    from pyspark.sql import DataFrame, SparkSession

# Local mode: the driver and its UI stay on loopback (SPARK_LOCAL_IP, which the UI binds to); the
# UI is on, as Spark's default, and the progress bar shows when a person watches a terminal.
# Tests turn both off through `spark.conf` (tests/conftest.py) or `--conf` (deepspark.localcluster).
LOCAL_DEFAULTS: dict[str, str] = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.driver.memory": "4g",
}


def interactive_defaults() -> dict[str, str]:
    """Spark's console progress bar only for a terminal (not in logs, CI or schedulers)."""
    return {"spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false"}


S3A = "org.apache.hadoop.fs.s3a.S3AFileSystem"


def object_store_defaults(environ: "Mapping[str, str]") -> dict[str, str]:
    """An S3-compatible store named by `AWS_ENDPOINT_URL` (the AWS SDKs' standard variable, which
    boto3 and MLflow read too) for Hadoop's S3A connector and the executors' pyarrow, path-style
    (what such stores serve). No credentials: S3A and pyarrow read them from each host's
    environment or instance profile, so they never enter Spark's conf, its UI or event log."""
    endpoint = environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    return {"spark.hadoop.fs.s3a.endpoint": endpoint, "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https:")).lower(),
            "spark.executorEnv.AWS_ENDPOINT_URL": endpoint}


def s3_through_s3a(spark: "SparkSession") -> None:
    """Plain Spark has no `s3:` file system; where Hadoop's S3A is on the classpath and nothing
    (EMRFS, a core-site.xml) claims `s3:`, `s3://` URLs go through S3A as `s3a://` ones do."""
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[union-attr]
    if hadoop.get("fs.s3.impl") is None and hadoop.getClassByNameOrNull(S3A) is not None:
        hadoop.set("fs.s3.impl", S3A)


class SparkSettings(FrozenModel):
    """How to build the SparkSession when spark-submit did not already decide."""

    master: str = "local[2]"
    app_name: str = "deepspark"
    conf: dict[str, str] = Field(default_factory=dict)


def submitted_conf() -> "SparkConf | None":
    """What spark-submit passed (`--master`, `--conf`), when it launched this driver; None for a
    plain `python` run. spark-submit hands them to its JVM as system properties, which a SparkConf
    reads only once PySpark has joined that JVM: before, SparkConf() is empty and a builder's
    `.master(...)` would silently override `--master`."""
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # joins spark-submit's JVM (PYSPARK_GATEWAY_PORT); starts nothing
    return SparkConf()


def submitted_master() -> str | None:
    """The master spark-submit was given, when it launched this driver."""
    submitted = submitted_conf()
    return submitted.get("spark.master") if submitted is not None and submitted.contains("spark.master") else None


def is_local(master: str) -> bool:
    return master.startswith("local")


def python_environment(local: bool) -> None:
    """Spark's Python workers run this interpreter; a local driver also stays on loopback. A driver
    for a remote master binds as Spark would by default, where executors can reach it."""
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def build_session(settings: SparkSettings, extra_conf: dict[str, str] | None = None) -> "SparkSession":
    """Get or create the SparkSession; spark-submit's master and --conf take precedence, and the
    loopback defaults apply only when the effective master is local."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    submitted = submitted_conf() or SparkConf()
    master = submitted.get("spark.master", settings.master)
    python_environment(is_local(master))
    builder = SparkSession.builder.appName(settings.app_name)
    if not submitted.contains("spark.master"):
        builder = builder.master(settings.master)
    wanted = {**LOCAL_DEFAULTS, **interactive_defaults()} if is_local(master) else interactive_defaults()
    wanted.update(object_store_defaults(os.environ))
    wanted.update(settings.conf)
    wanted.update(extra_conf or {})
    for key, value in wanted.items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    s3_through_s3a(spark)
    return spark


def task_slots(spark: "SparkSession") -> int:
    """Number of tasks Spark can run at once (default parallelism)."""
    return int(spark.sparkContext.defaultParallelism)


def frame_from_pandas(spark: "SparkSession", frame: "pd.DataFrame", schema: str | None = None) -> "DataFrame":
    """A driver-side table (a listing) as a DataFrame through Arrow: the JVM reads the batches as
    they are, with no Python worker unpickling rows (seconds for 100,000 rows), on any master."""
    key = "spark.sql.execution.arrow.pyspark.enabled"
    before = str(spark.conf.get(key, "false"))
    spark.conf.set(key, "true")
    try:
        return spark.createDataFrame(frame, schema) if schema else spark.createDataFrame(frame)
    finally:
        spark.conf.set(key, before)


def prefer_installed_pyspark() -> int:
    """Import pyspark and py4j from the installed package, not from the source zips spark-submit
    puts first on the driver's path, where that package is the one those zips belong to (a pip
    installed PySpark is its own SPARK_HOME); returns how many zips came off the path. Python
    keeps no bytecode for modules imported from a zip, so every job compiled pyspark's sources
    again (about 0.5 s of a small job here). Call before the first pyspark import; a Spark
    installation elsewhere (a cluster's SPARK_HOME) keeps its zips."""
    import importlib.machinery

    zips = [p for p in sys.path if p.endswith(".zip") and os.path.basename(p).startswith(("pyspark", "py4j"))]
    if not zips or "pyspark" in sys.modules:
        return 0
    unzipped = [p for p in sys.path if p not in zips]
    spec = importlib.machinery.PathFinder.find_spec("pyspark", unzipped)
    if spec is None or spec.origin is None or \
            importlib.machinery.PathFinder.find_spec("py4j", unzipped) is None:
        return 0
    home = os.path.join(os.path.dirname(spec.origin), "python", "lib") + os.sep
    ours = [p for p in zips if os.path.abspath(p).startswith(home)]
    for path in ours:
        sys.path.remove(path)
    return len(ours)


def lighten_python_worker() -> int:
    """Take the JVM jars Spark puts on a Python worker's path (spark-core's, 14.7 MB) off it, in
    this worker process; returns how many. PySpark's worker calls `importlib.invalidate_caches()`
    before every task, which re-reads every zip archive an importer is cached for: for the jar
    that is most of a small task's cost. Nothing is imported from it (pyspark comes from the
    installed package or pyspark.zip), so code that runs in Python workers calls this first;
    cheap when repeated."""
    jars = [p for p in sys.path if p.endswith(".jar")]
    for path in jars:
        sys.path.remove(path)
    for cached in [p for p in sys.path_importer_cache if ".jar" in p]:  # the jar's and its folders' importers
        del sys.path_importer_cache[cached]
    return len(jars)


def freeze_heap() -> None:
    """Move everything alive now (TensorFlow, MLflow, a loaded model: ~540,000 objects) out of the
    garbage collector's reach. Spark's Python worker runs a full `gc.collect()` after every task,
    which walked that whole heap each time (0.29 s per task here; 0.0 s once frozen)."""
    import gc

    gc.collect()
    gc.freeze()
