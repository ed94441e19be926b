"""Loopback only for a local master: the decisions build_session takes before the JVM starts."""

import pytest

from deepspark.spark import is_local, python_environment, submitted_master


@pytest.mark.parametrize("master,local", [("local[2]", True), ("local", True), ("local-cluster[2,1,1024]", True),
                                          ("spark://10.0.0.5:7077", False), ("yarn", False),
                                          ("k8s://https://api:6443", False)])
def test_only_local_masters_are_local(master, local):
    assert is_local(master) is local


def test_a_driver_for_a_remote_master_is_not_pinned_to_loopback(monkeypatch):
    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    python_environment(local=False)
    import os

    assert "SPARK_LOCAL_IP" not in os.environ
    python_environment(local=True)
    assert os.environ["SPARK_LOCAL_IP"] == "127.0.0.1"


def test_without_spark_submit_the_config_decides(monkeypatch):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert submitted_master() is None


def test_a_python_worker_sheds_spark_s_jar_and_its_importer(tmp_path):
    """The jar on the path (and its cached zip importer, which every task's invalidate_caches()
    re-reads) are gone; the rest of the path and imports are untouched. In a subprocess: it
    edits sys.path."""
    import subprocess
    import sys
    import zipfile

    jar = tmp_path / "spark-core_2.12-3.5.7.jar"
    with zipfile.ZipFile(jar, "w") as archive:
        archive.writestr("org/apache/spark/SparkContext.class", b"\xca\xfe")
    code = f"""
import importlib, sys
sys.path.insert(0, {str(jar)!r})
importlib.util.find_spec("nothing_here_at_all")  # caches a zipimporter for the jar
assert {str(jar)!r} in sys.path_importer_cache
before = [p for p in sys.path if not p.endswith(".jar")]
from deepspark.spark import lighten_python_worker
assert lighten_python_worker() == 1 and lighten_python_worker() == 0
assert not [p for p in sys.path_importer_cache if ".jar" in p] and sys.path == before
import json  # imports still work
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_driver_imports_the_installed_pyspark_not_its_source_zips(tmp_path):
    """spark-submit puts pyspark.zip and py4j's zip first on the driver's path, and Python keeps no
    bytecode for a zip's modules: with the installed package they came from also on the path,
    they come off and pyspark is imported from the package. Zips of another Spark installation
    (here a copy elsewhere) stay. In subprocesses: it edits sys.path."""
    import os
    import shutil
    import subprocess
    import sys
    from importlib.util import find_spec

    spec = find_spec("pyspark")
    assert spec is not None and spec.origin is not None
    lib = os.path.join(os.path.dirname(spec.origin), "python", "lib")
    zips = sorted(os.path.join(lib, name) for name in os.listdir(lib) if name.endswith(".zip"))
    assert len(zips) == 2  # pyspark.zip and py4j-*-src.zip
    elsewhere = [shutil.copy(z, tmp_path) for z in zips]
    code = """
import sys
from deepspark.spark import prefer_installed_pyspark
removed = prefer_installed_pyspark()
import pyspark, py4j
print(removed, ".zip" in pyspark.__file__, ".zip" in py4j.__file__)
"""
    for path, expected in ((zips, "2 False False"), (elsewhere, "0 True True")):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.getcwd()])}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr
