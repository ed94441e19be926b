"""DeepSpark on a cluster of real hosts (tests/multihost.py): a Spark standalone master, two
worker hosts, a driver host in client mode, moto's S3 server and a basic-auth MLflow server whose
artifacts live in that store, each on its own network namespace with its own addresses. The jobs
run as the README's cluster section writes them: raw files in s3:// to a dataset in s3://,
Horovod ranks on both worker hosts over gloo on the data network, predictions to s3://."""

from __future__ import annotations

import json
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


def s3(cluster):
    """The store as the test machine sees it (the root namespace is on the bridges)."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=cluster.s3_endpoint.split("//")[1], scheme="http", region="us-east-1",
                             access_key=cluster.aws["AWS_ACCESS_KEY_ID"],
                             secret_key=cluster.aws["AWS_SECRET_ACCESS_KEY"])


def upload(fs, local: Path, bucket_path: str) -> int:
    count = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{bucket_path}/{path.relative_to(local).as_posix()}") as out:
            out.write(path.read_bytes())
        count += 1
    return count


def test_every_component_runs_on_its_own_host(cluster):
    state = json.loads(cluster.hosts.run("driver", ["python3", "-c", (
        f"import urllib.request; print(urllib.request.urlopen('{cluster.master_ui}/json/').read().decode())")]).stdout)
    assert sorted(w["host"] for w in state["workers"] if w["state"] == "ALIVE") == ["198.18.0.21", "198.18.0.22"]
    assert cluster.mlflow_get("/api/2.0/mlflow/experiments/search?max_results=1") == 401  # anonymous
    # Nothing listens on the driver's own loopback: each service is reached on its host only.
    probe = "import socket; socket.create_connection(('127.0.0.1', 9000), timeout=2)"
    assert cluster.hosts.run("driver", ["python3", "-c", probe]).returncode != 0


def test_etl_training_and_inference_across_hosts_on_the_object_store(cluster, pyfiles, tmp_path):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from pipelines.images.demo_data import write_raw_folder

    fs = s3(cluster)
    for bucket in ("raw", "datasets", "predictions"):
        cluster.make_bucket(bucket)
    write_raw_folder(tmp_path / "raw", limit=200)
    sent = upload(fs, tmp_path / "raw", "raw/fashion")  # 400 PNGs and the generator's _COMPLETE marker
    tracking = [f"tracking.uri={cluster.mlflow.url}", "tracking.experiment=multihost"]
    work = tmp_path / "driver-cwd"
    work.mkdir()

    out, _ = cluster.submit(PROJECT / "jobs" / "etl.py", ["input.path=s3://raw/fashion", "output.root=s3://datasets",
                                                        "output.name=fm", "output.row_group_size_mb=0.05", *tracking],
                            pyfiles, work)
    assert sent == 401 and "inputs in 400 = rows written 400 + quarantined 0" in out, ours(out)
    assert fs.get_file_info("datasets/fm/_LATEST").size > 0  # published in the store

    # Ranks on both worker hosts, gloo on the data network; the interfaces' counters say which.
    data_before, mgmt_before = cluster.bytes_sent("w1", "data0"), cluster.bytes_sent("w1", "eth0")
    out, _ = cluster.submit(PROJECT / "jobs" / "train.py", ["data.root=s3://datasets", "data.name=fm", "epochs=2",
                                                          "steps_per_epoch=5", "optimizer.batch_size=16",
                                                          "max_eval_rows=200", "horovod.num_proc=2",
                                                          "horovod.nics=[data0]", "registry.model_name=fm-hosts",
                                                          *tracking], pyfiles, work)
    assert "with 2 Horovod ranks" in out, ours(out)
    data_sent = cluster.bytes_sent("w1", "data0") - data_before
    mgmt_sent = cluster.bytes_sent("w1", "eth0") - mgmt_before
    gradients = 2 * 5 * 2 * 4 * 100_000  # epochs x steps x (reduce-scatter + gather) x float32 x ~100 k weights
    assert data_sent > gradients, (data_sent, mgmt_sent)

    client = MlflowClient(cluster.mlflow.url)
    experiment = client.get_experiment_by_name("multihost")
    run = client.search_runs([experiment.experiment_id], "tags.`deepspark.job` = 'train'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]  # rank 0 over HTTP
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server ...
    stored = [f.path for f in fs.get_file_info(pafs.FileSelector("mlflow/artifacts", recursive=True))]
    assert any(p.endswith(f"{run.info.run_id}/artifacts/model/MLmodel") for p in stored)  # ... from the store

    out, _ = cluster.submit(PROJECT / "jobs" / "batch_inference.py", ["input.path=s3://raw/fashion/test",
                                                                    "output.path=s3://predictions/fm",
                                                                    "model_uri=models:/fm-hosts@champion", *tracking],
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


def ours(output: str) -> str:
    """The project's own log lines of a job's output (Spark's INFO lines left out)."""
    return "\n".join(line for line in output.splitlines() if " INFO org." not in line and " INFO " in line
                     or "Error" in line or "scored" in line or "inputs in" in line)
