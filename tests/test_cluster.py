"""Cluster mode: a real Spark standalone master + 2 workers and a real `mlflow server` on
127.0.0.1; every job goes through `spark-submit --master spark://...` with the project's code
shipped as `--py-files dist/deepspark.zip`, from a working directory that is not the checkout."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def submit(standalone_cluster, tmp_path_factory):
    """spark-submit a job (or script) to the cluster from a folder that is not the checkout,
    with the code as --py-files; returns (output, seconds)."""
    from deepspark.localcluster import spark_submit
    from deepspark.packaging import build_pyfiles

    work = tmp_path_factory.mktemp("driver-cwd")
    pyfiles = build_pyfiles(tmp_path_factory.mktemp("dist"))

    def run(script: Path, *args: str, conf: dict[str, str] | None = None) -> tuple[str, float]:
        settings = {"spark.executor.cores": "1", "spark.executor.memory": "2g", "spark.ui.enabled": "false",
                    **(conf or {})}
        return spark_submit(standalone_cluster.master_url, script, args, settings, pyfiles, work, timeout_s=900)

    return run


def write_probe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_cluster_is_up_with_two_workers(standalone_cluster):
    import urllib.request

    with urllib.request.urlopen(f"{standalone_cluster.ui_url}/json/") as resp:
        workers = json.load(resp)["workers"]
    assert [w["state"] for w in workers] == ["ALIVE", "ALIVE"]
    assert sorted(w["cores"] for w in workers) == [1, 1]


def test_executors_import_the_shipped_zip_not_the_checkout(submit, tmp_path):
    probe = write_probe(tmp_path, """
        import json
        from pyspark.sql import SparkSession
        spark = SparkSession.builder.getOrCreate()
        def where(_):
            import os, pipelines.images.transforms as t
            return [(t.__file__, os.getcwd())]
        print("PROBE", json.dumps(spark.sparkContext.parallelize(range(2), 2).mapPartitions(where).collect()))
        spark.stop()
    """)
    output, _ = submit(probe)
    found = json.loads(output.split("PROBE ", 1)[1].splitlines()[0])
    assert len(found) == 2
    for module_file, cwd in found:
        assert "deepspark.zip" in module_file and not module_file.startswith(str(PROJECT / "pipelines")), module_file
        assert not cwd.startswith(str(PROJECT)), cwd


def test_a_submitted_job_runs_on_the_master_spark_submit_names(submit, standalone_cluster, tmp_path):
    """A job's session takes spark-submit's --master and --conf over the config's defaults
    (local[2], loopback driver), so its tasks run in the cluster's executors, not in the driver."""
    probe = write_probe(tmp_path, """
        import json
        from deepspark.spark import SparkSettings, build_session
        spark = build_session(SparkSettings(conf={"spark.sql.shuffle.partitions": "7"}))
        sc = spark.sparkContext
        executors = sc.parallelize(range(2), 2).map(lambda _: __import__("os").getcwd()).collect()
        print("PROBE", json.dumps({"master": sc.master, "executors": executors,
                                   "ui": sc.getConf().get("spark.ui.enabled")}))
        spark.stop()
    """)
    output, _ = submit(probe)
    seen = json.loads(output.split("PROBE ", 1)[1].splitlines()[0])
    assert seen["master"] == standalone_cluster.master_url
    assert all(cwd.startswith(str(standalone_cluster.workdir)) for cwd in seen["executors"]), seen  # a worker's dir
    assert seen["ui"] == "false"  # --conf spark.ui.enabled=false beat the local default "true"


def test_etl_train_and_inference_through_spark_submit(submit, mlflow_server, fashion_small, tmp_path):
    from mlflow.tracking import MlflowClient

    raw = fashion_small.root.parent / "raw"
    tracking = [f"tracking.uri={mlflow_server.url}", "tracking.experiment=cluster"]
    times = {}
    out, times["etl"] = submit(PROJECT / "jobs" / "etl_images.py", f"input.path={raw}", f"output.root={tmp_path}",
                               "output.name=fm", "output.row_group_size_mb=0.05", *tracking)
    assert "inputs in 800 = rows written 800 + quarantined 0" in out

    out, times["train"] = submit(PROJECT / "jobs" / "train.py", f"data.root={tmp_path}", "data.name=fm", "epochs=2",
                                 "steps_per_epoch=5", "optimizer.batch_size=16", "max_eval_rows=200",
                                 "horovod.nics=[lo]", "registry.model_name=fm-cluster", *tracking)
    assert "with 2 Horovod ranks" in out
    client = MlflowClient(mlflow_server.url)
    run = client.search_runs([client.get_experiment_by_name("cluster").experiment_id],
                             "tags.`deepspark.job` = 'train'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]  # logged by rank 0 over HTTP
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} >= {"checkpoints/epoch-0001.json"}

    out, times["inference"] = submit(PROJECT / "jobs" / "batch_inference.py", f"input.path={raw / 'test'}",
                                     f"output.path={tmp_path / 'predictions'}",
                                     "model_uri=models:/fm-cluster@champion", *tracking)
    assert "scored now 400" in out and "model loaded" in out
    print("standalone wall times (s):", {k: round(v, 1) for k, v in times.items()})
    # The credentials reached the jobs and the ranks only through the environment: no run holds them.
    for logged in client.search_runs([client.get_experiment_by_name("cluster").experiment_id]):
        assert mlflow_server.password not in json.dumps([logged.data.params, logged.data.tags])
        texts = [p for p in artifact_files(client, logged.info.run_id)
                 if p.endswith((".yaml", ".json", ".txt", ".csv", "MLmodel"))]
        assert "config/resolved.yaml" in texts  # the logged config is among what is searched
        for path in texts:
            assert mlflow_server.password not in Path(client.download_artifacts(logged.info.run_id, path,
                                                                                str(tmp_path))).read_text()


def artifact_files(client, run_id: str, folder: str | None = None) -> list[str]:
    """Every artifact file of a run, folders walked (config/resolved.yaml, model/MLmodel, ...)."""
    found: list[str] = []
    for artifact in client.list_artifacts(run_id, folder):
        found += artifact_files(client, run_id, artifact.path) if artifact.is_dir else [artifact.path]
    return found


def test_the_tracking_server_refuses_anonymous_and_wrong_credentials(mlflow_server):
    import base64
    import urllib.error
    import urllib.request

    url = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(user: str | None, password: str = "") -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(None) == 401
    assert status(mlflow_server.username, "wrong") == 401
    assert status(mlflow_server.username, mlflow_server.password) == 200


def test_each_task_and_rank_sees_its_own_gpu_address(submit, tmp_path):
    from deepspark.localcluster import DISCOVERY_SCRIPT

    probe = write_probe(tmp_path, """
        import json
        from pyspark import TaskContext
        from pyspark.sql import SparkSession
        from training.distributed import available_gpu, run_ranks
        spark = SparkSession.builder.getOrCreate()
        def task_gpu(_):
            yield TaskContext.get().resources()["gpu"].addresses
        tasks = spark.sparkContext.parallelize(range(2), 2).mapPartitions(task_gpu).collect()
        ranks = run_ranks(available_gpu, 2, 120, ["lo"])
        print("PROBE", json.dumps({"tasks": tasks, "ranks": ranks}))
        spark.stop()
    """)
    output, _ = submit(probe, conf={"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
                                    "spark.executor.resource.gpu.discoveryScript": str(DISCOVERY_SCRIPT)})
    seen = json.loads(output.split("PROBE ", 1)[1].splitlines()[0])
    assert sorted(a for addresses in seen["tasks"] for a in addresses) == ["0", "1"]
    assert sorted(seen["ranks"]) == ["0", "1"]


def test_the_gpu_check_sees_spark_assign_each_task_a_gpu_and_names_the_cpu_build(submit, tmp_path):
    """scripts/gpu_check.py on the fake-GPU workers: Spark's half works (each task gets its
    address), and on this CPU-only build it exits non-zero naming the fix, not a stack trace."""
    from deepspark.localcluster import DISCOVERY_SCRIPT

    found = tmp_path / "gpu_check.json"
    with pytest.raises(RuntimeError) as failed:
        submit(PROJECT / "scripts" / "gpu_check.py", "--tasks", "2", "--json", str(found),
               conf={"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
                     "spark.executor.resource.gpu.discoveryScript": str(DISCOVERY_SCRIPT)})
    assert "exited 1" in str(failed.value)
    checked = json.loads(found.read_text())
    assert sorted(r["assigned"] for r in checked["reports"]) == ["0", "1"], checked
    assert len(checked["problems"]) == 2
    assert any(p.endswith("(Spark's GPU 0): TensorFlow 2.15.1 sees no GPU; it is the CPU build (run scripts/setup.sh "
                          "--gpu)") for p in checked["problems"]), checked["problems"]


def test_stopping_a_cluster_leaves_no_process_behind(tmp_path):
    from deepspark.localcluster import start_standalone

    cluster = start_standalone(tmp_path, workers=1)
    pids = cluster.pids
    assert all(_alive(pid) for pid in pids)
    cluster.stop()
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
