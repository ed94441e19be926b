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
