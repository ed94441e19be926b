"""`make ui` as a new user meets it: the real MLflow UI server started by `python -m deepspark.ui`
over a real sqlite store, the URL it prints loaded in a fresh headless Chromium (Debian's), and
what the page renders read back from the DOM after its scripts ran."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from deepspark.localcluster import free_port

pytestmark = pytest.mark.browser

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, in a closed network: no sandbox, no GPU, and none of Chromium's own background traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_NAME = "train-image:fashion-mnist"


def rendered_text(url: str) -> str:
    """The page's visible text after its scripts ran, in a browser with no stored preferences."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is not installed: `make setup-test` (scripts/setup.sh --with-browser) installs it")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", done.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A store with the demo's experiment and one training run, served by `python -m deepspark.ui`
    from the project folder's point of view (data/mlflow/ under its working directory)."""
    import mlflow

    from deepspark.tracking import DEFAULT_ARTIFACTS, DEFAULT_DB, TrackingSettings, ensure_experiment

    home = tmp_path_factory.mktemp("ui")
    store = home / DEFAULT_DB  # where `python -m deepspark.ui` run in `home` looks
    store.parent.mkdir(parents=True)
    previous = mlflow.get_tracking_uri()
    try:
        experiment_id = ensure_experiment(TrackingSettings(uri=f"sqlite:///{store}",
                                                           artifact_root=str(home / DEFAULT_ARTIFACTS)))
        with mlflow.start_run(experiment_id=experiment_id, run_name=RUN_NAME, tags={"deepspark.job": "train"}):
            mlflow.log_metric("test_accuracy", 0.9319)
    finally:
        mlflow.set_tracking_uri(previous)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deepspark.ui", "--port", str(port)], cwd=home,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=open(home / "ui.log", "w"), text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("open ", 1)[1].strip()  # the line a user copies
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start:\n{(home / 'ui.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url, f"http://127.0.0.1:{port}", experiment_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_the_printed_url_opens_on_the_training_runs_in_model_training_mode(ui):
    url, base, experiment_id = ui
    assert url == f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    page = rendered_text(url)
    assert RUN_NAME in page and "1 matching run" in page  # the runs table, with the run in it
    assert "Model registry" in page  # model-training mode's navigation
    assert "Token Usage" not in page and "Observability" not in page  # not the GenAI overview


def test_the_experiment_alone_opens_on_the_genai_overview(ui):
    """Why the URL carries the mode: the same experiment, tag and all, opened by its plain URL in a
    fresh browser lands on the GenAI traces overview without the runs."""
    _, base, experiment_id = ui
    page = rendered_text(f"{base}/#/experiments/{experiment_id}")
    assert "Token Usage" in page and RUN_NAME not in page
