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
