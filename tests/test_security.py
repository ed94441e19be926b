"""What leaves the driver: the ranks get an allow-list of its environment (MLflow's credentials
yes, anything else no), and the loopback/UI defaults follow the effective master."""

from __future__ import annotations

from training.distributed import rank_environment


def test_ranks_receive_only_the_environment_they_need():
    driver = {"PATH": "/usr/bin", "PYSPARK_PYTHON": "/venv/bin/python", "HOROVOD_GLOO_TIMEOUT_SECONDS": "60",
              "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_USERNAME": "team",
              "MLFLOW_TRACKING_PASSWORD": "s3cret", "CUDA_VISIBLE_DEVICES": "0", "LC_ALL": "C.UTF-8",
              "GITHUB_TOKEN": "ghp_x", "DATABASE_PASSWORD": "pw", "SSH_AUTH_SOCK": "/tmp/agent", "HISTFILE": "~/.h"}
    shipped = rank_environment(driver)
    assert set(shipped) == {"PATH", "PYSPARK_PYTHON", "HOROVOD_GLOO_TIMEOUT_SECONDS", "MLFLOW_TRACKING_URI",
                            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "CUDA_VISIBLE_DEVICES", "LC_ALL"}


def test_local_defaults_keep_the_ui_on_loopback_and_the_progress_bar_for_terminals(monkeypatch):
    import io
    import sys

    from deepspark.spark import LOCAL_DEFAULTS, interactive_defaults

    assert LOCAL_DEFAULTS["spark.ui.enabled"] == "true"
    assert LOCAL_DEFAULTS["spark.driver.bindAddress"] == "127.0.0.1"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert interactive_defaults() == {"spark.ui.showConsoleProgress": "true"}
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert interactive_defaults() == {"spark.ui.showConsoleProgress": "false"}
