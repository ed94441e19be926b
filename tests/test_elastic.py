"""Elastic training (`horovod.elastic=true`): the checks before launch, and a real run through
horovod.spark.run_elastic on `local[2,4]` whose rank 1 is SIGKILLed mid-epoch. A lost host (no
reset, only silence) is tests/test_multihost.py's."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from deepspark.config import ConfigError, load_config
from training.config import TrainConfig
from training.engines import HOROVOD, SINGLE
from training.job import check_elastic, task_attempts
from training.lost_ranks import unreachable

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def elastic(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, "train", ["horovod.elastic=true", "tracking.enabled=false", *extra])


def test_task_attempts_come_from_the_local_master_or_spark_task_max_failures():
    assert task_attempts("local[2]", {}) == 1  # local mode retries nothing
    assert task_attempts("local[2,4]", {}) == 4
    assert task_attempts("local[*, 3]", {}) == 3
    assert task_attempts("spark://198.18.0.10:7077", {}) == 4  # Spark's default
    assert task_attempts("spark://198.18.0.10:7077", {"spark.task.maxFailures": "1"}) == 1
    assert task_attempts("local-cluster[2,1,1024]", {"spark.task.maxFailures": "3"}) == 3  # retries like a cluster


@pytest.mark.parametrize("extra, engine, attempts, key", [
    ([], HOROVOD, 1, "local[N,F]"),
    (["engine=single"], SINGLE, 4, "engine=single"),
    (["horovod.min_num_proc=3"], HOROVOD, 4, "horovod.min_num_proc=3"),
    (["finetune.freeze_epochs=1", "epochs=3"], HOROVOD, 4, "finetune.freeze_epochs"),
    (["early_stopping.patience=2"], HOROVOD, 4, "early_stopping.patience"),
    (["horovod.backward_passes_per_step=2"], HOROVOD, 4, "horovod.backward_passes_per_step"),
    (["horovod.mixed_precision=true"], HOROVOD, 4, "horovod.mixed_precision"),
])
def test_what_elastic_training_cannot_run_fails_before_launch_naming_the_key(extra, engine, attempts, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_elastic(elastic(*extra), 2, engine, attempts)
    check_elastic(elastic(), 2, HOROVOD, 4)  # the same run, allowed


def test_a_model_search_refuses_elastic_trials():
    from training.selection.config import SelectConfig, trial_config

    search = load_config(SelectConfig, "select_models", ["tracking.enabled=false"])
    with pytest.raises(ConfigError, match="horovod.elastic"):
        trial_config(search, {"horovod.elastic": True}, 0)
    assert not trial_config(search, {}, 0).horovod.elastic


def test_a_host_that_answers_even_with_a_refusal_is_not_unreachable():
    listening = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        assert unreachable([("127.0.0.1", listening.getsockname()[1]), ("127.0.0.1", closed_port)], 2) == set()
    finally:
        listening.close()


# ---- a real elastic run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_1000(spark, tmp_path_factory):
    """1000 train + 1000 test Fashion-MNIST images through the real ETL, in small row groups."""
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl
    from pipelines.images.demo_data import write_raw_folder

    base = tmp_path_factory.mktemp("fashion-1000")
    write_raw_folder(base / "raw", limit=1000)
    run_etl(spark, load_config(EtlConfig, "etl", [
        f"input.path={base / 'raw'}", f"output.root={base / 'datasets'}", "output.name=fm",
        "tracking.enabled=false", "output.row_group_size_mb=0.05"]))
    return base / "datasets"


def rank_processes(rank: int) -> list[int]:
    """This test's Horovod processes for `rank` (HOROVOD_RANK in their environment)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in env and b"HOROVOD_ELASTIC=1" in env:
            found.append(int(pid))
    return found


def logged(db: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric in the run's sqlite store, in the order logged."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT step, value FROM metrics WHERE key = ? ORDER BY timestamp, step",
                                (key,)).fetchall()
    except sqlite3.Error:  # the job is creating its tables
        return []


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rank_killed_mid_epoch_leaves_training_to_the_others_and_costs_no_accuracy(fashion_1000, tmp_path):
    """Two ranks on local[2,4], committing every 5 batches. Once epoch 1 is logged, rank 1 is
    SIGKILLed a moment into epoch 2: the job goes on (one rank, then two again when Spark's retry
    of the task joins), each epoch is logged once, the run records the membership (ranks 2, 1, ...)
    and its test accuracy is within 1 point of the same run uninterrupted."""
    from deepspark.localcluster import spark_submit

    def run(name: str) -> tuple[str, Path]:
        store = tmp_path / name
        args = [f"data.root={fashion_1000}", "data.name=fm", "epochs=6", "steps_per_epoch=30",
                "optimizer.batch_size=16", "horovod.num_proc=2", "horovod.elastic=true",
                "horovod.commit_batches=5", "registry.enabled=false", f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                f"tracking.artifact_root={store / 'artifacts'}"]
        store.mkdir()
        output, _ = spark_submit("local[2,4]", JOBS / "train.py", args, cwd=store, timeout_s=400)
        return output, store / "mlflow.db"

    whole, _ = run("whole")
    killed: list[int] = []

    def kill_rank_1_in_epoch_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(logged(tmp_path / "faulted" / "mlflow.db", "loss")) < 1:
            time.sleep(0.05)
        time.sleep(0.6)  # into epoch 2 (an epoch is ~1.3 s), past a commit or two
        for pid in rank_processes(1):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_rank_1_in_epoch_2, daemon=True)
    killer.start()
    faulted, db = run("faulted")
    killer.join()
    assert killed, "rank 1 was never found to kill"
    ranks = [value for _, value in logged(db, "ranks")]
    assert ranks[:2] == [2, 1], ranks  # the membership the run went through
    # the survivor takes both ranks' rows per batch: the global batch, and so the schedule, unchanged
    assert "elastic: 1 rank(s) x 32 rows per batch, from epoch 2 batch " in faulted, faulted[-4000:]
    assert sorted(step for step, _ in logged(db, "loss")) == list(range(6))  # each epoch once
    accuracy = [float(re.search(r"test accuracy (\d\.\d+)", out).group(1)) for out in (whole, faulted)]  # type: ignore[union-attr]
    assert abs(accuracy[0] - accuracy[1]) <= 0.01, accuracy
