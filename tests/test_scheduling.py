"""The Airflow DAG, parsed and run by a real Airflow (its own venv, made and cached by
scripts/setup.sh): its one task spark-submits the real batch inference job, twice (the second
scheduled run finds nothing new)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.airflow]

PROJECT = Path(__file__).resolve().parent.parent
AIRFLOW_VENV = Path(os.environ.get("DEEPSPARK_AIRFLOW_VENV", Path.home() / ".cache/deepspark/airflow-3.3.2"))


def airflow(home: Path, *args: str, variables: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "scheduling"),
           **{f"AIRFLOW_VAR_{k.upper()}": v for k, v in (variables or {}).items()}}
    return subprocess.run([str(AIRFLOW_VENV / "bin" / "airflow"), *args], env=env, cwd=home, capture_output=True,
                          text=True, timeout=900)


def test_the_dag_parses_and_its_task_runs_batch_inference(spark, registry, raw_copy, tmp_path):
    from inference.state import read_table

    assert (AIRFLOW_VENV / "bin" / "airflow").exists(), \
        f"no Airflow in {AIRFLOW_VENV}: run scripts/setup.sh --with-airflow (make test does)"
    home = tmp_path / "airflow"
    home.mkdir()
    assert airflow(home, "db", "migrate").returncode == 0
    parsed = airflow(home, "dags", "reserialize")  # parse the DAG folder into Airflow's database
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    errors = airflow(home, "dags", "list-import-errors")
    assert errors.returncode == 0 and "airflow_dag.py" not in errors.stdout, errors.stdout + errors.stderr
    listed = airflow(home, "dags", "list", "-o", "plain")
    assert "deepspark_batch_inference" in listed.stdout, listed.stdout + listed.stderr

    out = tmp_path / "predictions"
    variables = {"deepspark_home": str(PROJECT), "deepspark_master": "local[1]",
                 "deepspark_args": " ".join([*registry, f"input.path={raw_copy}", f"output.path={out}"])}
    runs = [airflow(home, "dags", "test", "deepspark_batch_inference", day, variables=variables)
            for day in ("2026-11-28", "2026-11-29")]
    for run in runs:
        assert run.returncode == 0 and "new_state=success" in run.stdout + run.stderr, (run.stdout + run.stderr)[-4000:]
    logs = [run.stdout + run.stderr for run in runs]
    assert "scored now 400 + quarantined 3" in logs[0]
    assert "nothing new: no commit" in logs[1]
    assert read_table(spark, str(out)).count() == 400
