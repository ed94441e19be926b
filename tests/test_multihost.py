"""DeepSpark on a cluster of real hosts (tests/multihost.py): a Spark standalone master, two
worker hosts, a driver host in client mode, moto's S3 server and a basic-auth MLflow server whose
artifacts live in that store, each on its own network namespace with its own addresses. The jobs
run as the README's cluster section writes them: raw files in s3:// to a dataset in s3://,
Horovod ranks on both worker hosts over gloo on the data network, predictions to s3://."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import multihost, netns

WHY_NOT = netns.unavailable() or multihost.missing()
pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"no multi-host test bed: {WHY_NOT}")]

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with multihost.MultiHostCluster(tmp_path_factory.mktemp("multihost")) as made:
        yield made


@pytest.fixture(scope="module")
def pyfiles(tmp_path_factory) -> Path:
    from deepspark.packaging import build_pyfiles

    return build_pyfiles(tmp_path_factory.mktemp("dist"))


def test_every_component_runs_on_its_own_host(cluster):
    state = json.loads(cluster.hosts.run("driver", ["python3", "-c", (
        f"import urllib.request; print(urllib.request.urlopen('{cluster.master_ui}/json/').read().decode())")]).stdout)
    assert sorted(w["host"] for w in state["workers"] if w["state"] == "ALIVE") == ["198.18.0.21", "198.18.0.22"]
    assert cluster.mlflow_get("/api/2.0/mlflow/experiments/search?max_results=1") == 401  # anonymous
    # Nothing listens on the driver's own loopback: each service is reached on its host only.
    probe = "import socket; socket.create_connection(('127.0.0.1', 9000), timeout=2)"
    assert cluster.hosts.run("driver", ["python3", "-c", probe]).returncode != 0


@pytest.fixture(scope="module")
def dataset(cluster, pyfiles, tmp_path_factory) -> str:
    """400 Fashion-MNIST PNGs uploaded to s3://raw/fashion and the README's ETL command run on them
    from the driver host (the dataset lands in s3://datasets/fm); returns the job's output."""
    from pipelines.images.demo_data import write_raw_folder

    tmp = tmp_path_factory.mktemp("raw")
    for bucket in ("raw", "datasets", "predictions"):
        cluster.make_bucket(bucket)
    write_raw_folder(tmp / "raw", limit=200)
    sent = cluster.upload(tmp / "raw", "raw/fashion")
    assert sent == 401  # 400 PNGs and the generator's _COMPLETE marker, which the ETL does not take
    out, _ = cluster.submit(PROJECT / "jobs" / "etl.py", ["input.path=s3://raw/fashion", "output.root=s3://datasets",
                                                        "output.name=fm", "output.row_group_size_mb=0.05",
                                                        *tracking(cluster)], pyfiles, tmp)
    return out


def tracking(cluster) -> list[str]:
    return [f"tracking.uri={cluster.mlflow.url}", "tracking.experiment=multihost"]


def test_etl_training_and_inference_across_hosts_on_the_object_store(cluster, pyfiles, dataset, tmp_path,
                                                                     monkeypatch):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    fs = cluster.store_filesystem()
    work = tmp_path / "driver-cwd"
    work.mkdir()

    out = dataset
    assert "inputs in 400 = rows written 400 + quarantined 0" in out, ours(out)
    assert fs.get_file_info("datasets/fm/_LATEST").size > 0  # published in the store

    # Ranks on both worker hosts, gloo on the data network; the interfaces' counters say which.
    data_before, mgmt_before = cluster.bytes_sent("w1", "data0"), cluster.bytes_sent("w1", "eth0")
    out, _ = cluster.submit(PROJECT / "jobs" / "train.py", ["data.root=s3://datasets", "data.name=fm", "epochs=2",
                                                          "steps_per_epoch=5", "optimizer.batch_size=16",
                                                          "max_eval_rows=200", "horovod.num_proc=2",
                                                          "horovod.nics=[data0]", "registry.model_name=fm-hosts",
                                                          *tracking(cluster)], pyfiles, work)
    assert "with 2 Horovod ranks" in out, ours(out)
    data_sent = cluster.bytes_sent("w1", "data0") - data_before
    mgmt_sent = cluster.bytes_sent("w1", "eth0") - mgmt_before
    gradients = 2 * 5 * 2 * 4 * 100_000  # epochs x steps x (reduce-scatter + gather) x float32 x ~100 k weights
    assert data_sent > gradients, (data_sent, mgmt_sent)

    for key, value in cluster.mlflow.client_env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(cluster.mlflow.url)
    experiment = client.get_experiment_by_name("multihost")
    run = client.search_runs([experiment.experiment_id], "tags.`deepspark.job` = 'train'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]  # rank 0 over HTTP
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server ...
    stored = [f.path for f in fs.get_file_info(pafs.FileSelector("mlflow/artifacts", recursive=True))]
    assert any(f"{run.info.run_id}/artifacts/checkpoints/" in p for p in stored), stored  # ... from the store:
    assert any(p.endswith("/MLmodel") for p in stored), stored  # the checkpoints and the registered model

    out, _ = cluster.submit(PROJECT / "jobs" / "batch_inference.py", ["input.path=s3://raw/fashion/test",
                                                                    "output.path=s3://predictions/fm",
                                                                    "model_uri=models:/fm-hosts@champion",
                                                                    *tracking(cluster)],
                            pyfiles, work)
    assert "scored now 200" in out, ours(out)
    written = pq.read_table("predictions/fm", filesystem=fs)
    assert written.num_rows == 200 and len(set(written.column("path").to_pylist())) == 200

    # Credentials travelled only as environment variables: no run, log or shipped file holds one.
    secrets = (cluster.aws["AWS_SECRET_ACCESS_KEY"], cluster.mlflow.password)
    for logged in client.search_runs([experiment.experiment_id]):
        assert not any(s in json.dumps([logged.data.params, logged.data.tags]) for s in secrets)
    assert not any(s in out for s in secrets)
    assert not any(s.encode() in pyfiles.read_bytes() for s in secrets)


def test_an_interface_a_host_lacks_fails_before_launch_naming_the_key(cluster, pyfiles, dataset, tmp_path):
    """Unset, horovod.nics is the driver's interface for spark.driver.host: eth0, which w2 calls
    ens5. The job stops before any run opens or any rank starts, naming the key, the host, what
    it has and what every host shares."""
    code, out, _ = cluster.run_submit(PROJECT / "jobs" / "train.py", ["data.root=s3://datasets", "data.name=fm",
                                                                     "epochs=1", "horovod.num_proc=2",
                                                                     "tracking.experiment=multihost-nics",
                                                                     f"tracking.uri={cluster.mlflow.url}"],
                                      pyfiles, tmp_path)
    assert code != 0
    assert ("horovod.nics (unset: the driver's interface for spark.driver.host 198.18.0.10): interface 'eth0' is "
            "missing on executor host 198.18.0.22") in out, ours(out)
    assert "ens5 198.18.0.22" in out and "every host has: data0" in out
    assert "Horovod ranks" not in out and "View run" not in out  # nothing launched, no run opened


RACE = """
import sys
from deepspark.storage import S3Conditional
store = S3Conditional()
print(" ".join(str(int(store.create_exclusive(f"s3://locks/race/{i}", sys.argv[1].encode()))) for i in range(30)))
"""


def test_exclusive_creates_on_the_store_have_exactly_one_winner(cluster):
    """Two processes on two hosts create the same 30 names at once: the store's conditional write
    (If-None-Match) gives each name to exactly one of them, and the file holds the winner's text."""
    import subprocess
    import sys

    cluster.make_bucket("locks")
    env = cluster.driver_env(tracking=False)
    racers = [subprocess.Popen(["ip", "netns", "exec", cluster.hosts.hosts[host].name, sys.executable, "-c", RACE,
                                host], env=env, stdout=subprocess.PIPE, text=True, cwd=PROJECT)
              for host in ("w1", "w2")]
    won = [[int(bit) for bit in racer.communicate(timeout=120)[0].split()] for racer in racers]
    assert [len(w) for w in won] == [30, 30]
    assert all(a + b == 1 for a, b in zip(*won)), won
    fs = cluster.store_filesystem()
    for i, (w1_won, _) in enumerate(zip(*won)):
        with fs.open_input_stream(f"locks/race/{i}") as handle:
            assert handle.read().decode() == ("w1" if w1_won else "w2")


def test_two_etl_runs_racing_for_one_output_on_the_store_publish_once(cluster, pyfiles, dataset, tmp_path):
    """The README's ETL twice at once into the same s3:// dataset: one holds the lease (created
    with a conditional write) and publishes v=1, the other stops naming the holder."""
    import subprocess

    args = ["input.path=s3://raw/fashion", "output.root=s3://datasets", "output.name=race",
            "output.row_group_size_mb=0.05", "tracking.enabled=false"]
    command = cluster.submit_command(PROJECT / "jobs" / "etl.py", args, pyfiles)
    jobs = [subprocess.Popen(command, cwd=tmp_path, env=cluster.driver_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outcomes = [(job.wait(timeout=600), job.stdout.read()) for job in jobs]  # type: ignore[union-attr]
    assert sorted(code == 0 for code, _ in outcomes) == [False, True], [ours(out) for _, out in outcomes]
    loser = next(out for code, out in outcomes if code != 0)
    assert "s3://datasets/race/_LOCK is locked by job" in loser, ours(loser)
    fs = cluster.store_filesystem()
    assert [i.base_name for i in fs.get_file_info(pafs_selector("datasets/race")) if i.base_name.startswith("v=")] \
        == ["v=1"]


def test_a_model_search_hops_between_hosts_with_its_store_in_the_object_store(cluster, pyfiles, dataset, tmp_path):
    """execution.method=mop across w1 and w2, the models' state between sub-epochs in s3://."""
    cluster.make_bucket("selection")
    out, _ = cluster.submit(PROJECT / "jobs" / "select_models.py", [
        "data.root=s3://datasets", "data.name=fm", "execution.method=mop", "execution.store_root=s3://selection",
        "search.method=grid", "search.space={optimizer.learning_rate: {choice: [0.003, 0.001]}}", "epochs=2",
        "optimizer.batch_size=16",
        "max_eval_rows=200", "registry.model_name=fm-search", *tracking(cluster)], pyfiles, tmp_path)
    assert "model selection (grid, mop): 2 configurations" in out, ours(out)
    stored = [info.path for info in cluster.store_filesystem().get_file_info(pafs_selector_recursive("selection"))]
    # each configuration's marker after each of its 2 x 2 units (epoch x partition) is in the store
    assert len([p for p in stored if "/unit-" in p and p.endswith(".json")]) == 2 * 2 * 2, stored


DETECTION = {"spark.network.timeout": "30s", "spark.network.timeoutInterval": "10s",
             "spark.executor.heartbeatInterval": "3s"}  # Spark notices a silent executor in 30-40 s


def python_rss_mb(cluster, host: str) -> float:
    """The largest Python process on `host` (a Spark Python worker that loaded TensorFlow and the
    model is several hundred MB)."""
    import psutil

    pids = subprocess.run(["ip", "netns", "pids", cluster.hosts.hosts[host].name], capture_output=True,
                          text=True).stdout.split()
    sizes = [0.0]
    for pid in pids:
        try:
            proc = psutil.Process(int(pid))
            if "python" in proc.name():
                sizes.append(proc.memory_info().rss / 2**20)
        except psutil.Error:
            continue
    return max(sizes)


def test_a_tracking_server_restart_mid_training_loses_and_doubles_no_metric(cluster, pyfiles, dataset, tmp_path,
                                                                           monkeypatch):
    """Once rank 0 has logged the first epoch, the tracking server is SIGKILLed and started again
    10 s later on the same stores: MLflow's client retries carry rank 0 over the gap, the job
    finishes, and every epoch's metric is there exactly once."""
    import time

    from mlflow.tracking import MlflowClient

    for key, value in cluster.mlflow.client_env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(cluster.mlflow.url)
    args = ["data.root=s3://datasets", "data.name=fm", "epochs=6", "steps_per_epoch=30", "optimizer.batch_size=16",
            "max_eval_rows=200", "horovod.num_proc=2", "horovod.nics=[data0]", "registry.enabled=false",
            "tracking.experiment=multihost-restart", f"tracking.uri={cluster.mlflow.url}"]
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        job = subprocess.Popen(cluster.submit_command(PROJECT / "jobs" / "train.py", args, pyfiles), cwd=tmp_path,
                               env=cluster.driver_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        run_id = None
        while run_id is None or not client.get_metric_history(run_id, "loss"):
            if job.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no first epoch: {job.poll()=}\n{ours(log.read_text())[-4000:]}")
            time.sleep(1)
            experiment = client.get_experiment_by_name("multihost-restart")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            run_id = runs[0].info.run_id if runs else None
        cluster.restart_mlflow(down_s=10)
        assert job.wait(timeout=600) == 0, ours(log.read_text())[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(6)), [(m.step, m.value) for m in history]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_worker_host_that_dies_mid_inference_has_its_tasks_rerun_and_every_input_scored_once(
        cluster, pyfiles, dataset, tmp_path):
    """Batch inference over 400 PNGs in s3://, four files per task; once a Python worker on w2 has
    loaded TensorFlow, w2's processes are SIGKILLed and its links taken down. Spark loses w2's
    executor with its running tasks and its shuffle output, redoes that work on w1, and the one
    commit holds each input exactly once."""
    import re
    import time

    import pyarrow.parquet as pq

    fs = cluster.store_filesystem()
    log = tmp_path / "inference.log"
    args = ["input.path=s3://raw/fashion", "output.path=s3://predictions/fault", "files_per_task=4",
            "model_uri=models:/fm-hosts@champion", *tracking(cluster)]
    try:
        with log.open("w") as sink:
            job = subprocess.Popen(cluster.submit_command(PROJECT / "jobs" / "batch_inference.py", args, pyfiles,
                                                          DETECTION),
                                   cwd=tmp_path, env=cluster.driver_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while python_rss_mb(cluster, "w2") < 400:  # w2 is scoring
                if job.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"w2 never scored: {job.poll()=}\n{ours(log.read_text())[-4000:]}")
                time.sleep(0.2)
            cluster.hosts.kill_processes("w2")
            cluster.hosts.link_down("w2")
            assert job.wait(timeout=400) == 0, ours(log.read_text())[-6000:]
        finally:
            if job.poll() is None:
                job.kill()
        output = log.read_text()
        assert re.search(r"Lost executor \d+ on 198\.18\.0\.22", output), ours(output)[-4000:]
        # work w2 had done or was doing is redone: its running tasks, or its shuffle output
        assert "ExecutorLostFailure" in output or "FetchFailed" in output, ours(output)[-4000:]
        assert "scored now 400" in output, ours(output)[-4000:]
        entries = sorted(i.path for i in fs.get_file_info(pafs_selector("predictions/fault/_log")))
        assert len(entries) == 2, entries  # the empty entry a first run begins with, and its one commit
        committed = json.loads(fs.open_input_stream(entries[-1]).read())["batches"]["predictions"]
        rows = [pq.read_table(f"predictions/fault/model_version={v}/batch={b}", filesystem=fs)
                for v, batches in committed.items() for b in batches]
        paths = [p for table in rows for p in table.column("path").to_pylist()]
        assert len(paths) == 400 and len(set(paths)) == 400  # every input once
    finally:
        cluster.revive("w2")


def test_an_elastic_run_whose_worker_host_dies_goes_on_with_the_survivor(cluster, pyfiles, dataset, tmp_path,
                                                                           monkeypatch):
    """horovod.elastic=true; after the run's first checkpoint w2's processes are SIGKILLed and its
    links taken down (no reset, only silence). w1's rank fails its collective after
    horovod.peer_timeout_s and restores the last commit; once Spark has lost w2's task the lost-rank
    watch shuts the driver's connections to w2, which answers no more, so Horovod records its
    worker as failed; training goes on with one rank and the job finishes: each epoch logged once,
    the membership (2 ranks, then 1) in the run."""
    import re
    import time

    from mlflow.tracking import MlflowClient

    args = ["data.root=s3://datasets", "data.name=fm", "epochs=6", "steps_per_epoch=30", "optimizer.batch_size=16",
            "max_eval_rows=200", "horovod.num_proc=2", "horovod.nics=[data0]", "horovod.peer_timeout_s=20",
            "horovod.elastic=true", "horovod.commit_batches=5", "registry.enabled=false",
            "tracking.experiment=multihost-elastic", f"tracking.uri={cluster.mlflow.url}"]
    for key, value in cluster.mlflow.client_env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(cluster.mlflow.url)
    log = tmp_path / "train.log"
    try:
        with log.open("w") as sink:
            job = subprocess.Popen(cluster.submit_command(PROJECT / "jobs" / "train.py", args, pyfiles, DETECTION),
                                   cwd=tmp_path, env=cluster.driver_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            run_id = None
            while run_id is None or not client.get_metric_history(run_id, "loss"):
                if job.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no first epoch: {job.poll()=}\n{ours(log.read_text())[-4000:]}")
                time.sleep(0.5)
                experiment = client.get_experiment_by_name("multihost-elastic")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                run_id = runs[0].info.run_id if runs else None
            time.sleep(1)  # into the second epoch
            # links first: a process killed first may get its FIN out, and its peers a reset
            cluster.hosts.link_down("w2")
            cluster.hosts.kill_processes("w2")
            assert job.wait(timeout=500) == 0, ours(log.read_text())[-6000:]
        finally:
            if job.poll() is None:
                job.kill()
        output = log.read_text()
        assert re.search(r"198\.18\.\d\.22 answers no more", output), ours(output)[-4000:]
        assert [m.value for m in client.get_metric_history(run_id, "ranks")][:2] == [2, 1]
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(6))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        cluster.revive("w2")


def test_a_worker_host_that_dies_mid_training_fails_the_job_in_bounded_time_and_resume_finishes(
        cluster, pyfiles, dataset, tmp_path, monkeypatch):
    """w2's processes are SIGKILLed and its links taken down after this run's first checkpoint, so
    w1 gets no reset, only silence. Spark notices within spark.network.timeout, the survivor fails
    after horovod.peer_timeout_s, and the lost-rank watch stops Horovod's driver, which would
    otherwise wait on w2 forever: the job exits with the resume command, and resume=<run id>
    finishes on w1 alone with every epoch logged once. (Last in this module: w2 stays dead.)"""
    import re
    import time

    from mlflow.tracking import MlflowClient

    args = ["data.root=s3://datasets", "data.name=fm", "epochs=6", "steps_per_epoch=30", "optimizer.batch_size=16",
            "max_eval_rows=200", "horovod.num_proc=2", "horovod.nics=[data0]", "horovod.peer_timeout_s=20",
            "registry.enabled=false", "tracking.experiment=multihost-fault", f"tracking.uri={cluster.mlflow.url}"]
    fs = cluster.store_filesystem()

    def first_checkpoints() -> set[str]:
        return {i.path for i in fs.get_file_info(pafs_selector_recursive("mlflow/artifacts"))
                if "checkpoints/epoch-0001" in i.path}

    earlier = first_checkpoints()  # other tests' runs
    log = tmp_path / "train.log"  # a file, not a pipe: nobody reads a pipe while the job runs
    with log.open("w") as sink:
        job = subprocess.Popen(cluster.submit_command(PROJECT / "jobs" / "train.py", args, pyfiles, DETECTION),
                               cwd=tmp_path, env=cluster.driver_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while not first_checkpoints() - earlier:
            if job.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no first checkpoint: {job.poll()=}\n{log.read_text()[-6000:]}")
            time.sleep(1)
        cluster.hosts.kill_processes("w2")
        cluster.hosts.link_down("w2")
        faulted = time.monotonic()
        job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    took = time.monotonic() - faulted
    output = log.read_text()
    assert job.returncode != 0
    # Spark notices (30 s + its 10 s check) + the watch's grace (peer timeout 20 s + 15 s) + unwinding
    assert took < 40 + 35 + 60, took
    found = re.search(r"resume with resume=(\w+)", output)
    assert found, ours(output)
    assert "a rank's host was lost" in output, ours(output)

    out, _ = cluster.submit(PROJECT / "jobs" / "train.py", [*args[:6], "horovod.num_proc=1", *args[7:],
                                                          f"resume={found.group(1)}"], pyfiles, tmp_path)
    for key, value in cluster.mlflow.client_env().items():
        monkeypatch.setenv(key, value)
    history = MlflowClient(cluster.mlflow.url).get_metric_history(found.group(1), "loss")
    assert sorted(m.step for m in history) == list(range(6)), [m.step for m in history]  # each epoch once


def pafs_selector_recursive(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path)


def ours(output: str) -> str:
    """The project's own log lines of a job's output (Spark's INFO lines left out)."""
    return "\n".join(line for line in output.splitlines() if " INFO org." not in line and " INFO " in line
                     or "Error" in line or "scored" in line or "inputs in" in line)
