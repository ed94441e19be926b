"""Distributed training end to end: real local[2] Spark, real Horovod ranks over gloo, real
Petastorm readers, a real sqlite MLflow store. Tiny step counts keep each run short."""

from __future__ import annotations

import pytest

from deepspark.config import ConfigError, load_config
from training.config import TrainConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def config(dataset, store: list[str], *extra: str) -> TrainConfig:
    return load_config(TrainConfig, "train", [
        f"data.root={dataset.root}", f"data.name={dataset.name}", *store,
        "epochs=2", "steps_per_epoch=4", "optimizer.batch_size=16", "max_eval_rows=200", *extra,
    ])


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def runs_of(experiment: str = "deepspark"):
    c = client()
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def trained(spark, fashion_small, tmp_path_factory):
    """One 2-rank training run shared by the assertions below."""
    from training.job import run_job

    tmp = tmp_path_factory.mktemp("train")
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}"]
    result = run_job(spark, config(fashion_small, store))
    return result, store


def test_two_ranks_make_exactly_one_finished_run(trained):
    result, _ = trained
    runs = runs_of()
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert result.num_proc == 2
    assert run.data.params["resolved.num_proc"] == "2"
    assert run.data.params["optimizer.batch_size"] == "16"  # the resolved config, as params
    assert run.data.tags["dataset.name"] == "fashion-small"


def test_per_epoch_metrics_dataset_and_artifacts(trained):
    result, _ = trained
    c = client()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "input_stall_share"):
        assert [m.step for m in c.get_metric_history(result.run_id, key)] == [0, 1], key
    run = c.get_run(result.run_id)
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test["test_accuracy"])
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name.startswith("fashion-small@v")
    artifacts = {a.path for a in c.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/confusion_matrix.png"}
    checkpoints = {a.path for a in c.list_artifacts(result.run_id, "checkpoints")}
    assert {"checkpoints/epoch-0000.json", "checkpoints/epoch-0001.tar"} <= checkpoints
    assert sum(map(sum, result.confusion)) == 200  # max_eval_rows test images, each counted once


def test_registered_model_has_signature_and_predicts(trained, fashion_small):
    """The registered model takes raw file bytes (its signature says so), carries its modality
    record, and predicts a label per file; a bad file gets its quarantine reason."""
    import mlflow
    import pandas as pd

    result, _ = trained
    version = client().get_model_version_by_alias("fashion-mnist-classifier", "candidate")
    assert int(version.version) == result.model_version
    model_uri = "models:/fashion-mnist-classifier@champion"
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict() == [{"type": "binary", "required": True}]
    model = mlflow.pyfunc.load_model(model_uri)
    record = model.unwrap_python_model().record
    assert (record.modality, record.spec.shape, record.spec.dtype) == ("image", (28, 28, 1), "uint8")
    files = sorted((fashion_small.root.parent / "raw" / "test" / "Bag").iterdir())[:3]
    out = model.predict(pd.DataFrame({"content": [f.read_bytes() for f in files] + [b""]}))
    assert list(out.columns) == ["predicted_label", "probability", "reason"]
    assert set(out["predicted_label"][:3]) <= set(record.labels) and out["reason"][:3].isna().all()
    assert out["predicted_label"][3] is None and out["reason"][3] == "empty_file"


def test_champion_gate_both_ways(trained, spark, fashion_small):
    from training.job import run_job

    result, store = trained
    worse = run_job(spark, config(fashion_small, store, "epochs=1", "steps_per_epoch=1",
                                  "optimizer.learning_rate=0.00001"))
    c = client()
    assert worse.test["test_accuracy"] < result.test["test_accuracy"]
    assert int(c.get_model_version_by_alias("fashion-mnist-classifier", "candidate").version) == worse.model_version
    assert int(c.get_model_version_by_alias("fashion-mnist-classifier", "champion").version) == result.model_version
    forced = run_job(spark, config(fashion_small, store, "epochs=1", "steps_per_epoch=1",
                                   "optimizer.learning_rate=0.00001", "registry.gate_min_delta=-1.0"))
    assert int(c.get_model_version_by_alias("fashion-mnist-classifier", "champion").version) == forced.model_version


def rank_pids(rank: int) -> list[int]:
    """Processes Horovod started for a rank (they carry HOROVOD_RANK in their environment)."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in env and b"HOROVOD_GLOO_TIMEOUT_SECONDS=60" in env:
            found.append(int(pid))
    return found


def test_sigkilled_rank_fails_clearly_then_resumes_from_its_weights_and_optimizer(spark, fashion_small, mlflow_store):
    """SIGKILL rank 1 (a real process) once epoch 0 is checkpointed; the job fails naming the run to
    resume; the resumed run's next epoch has the loss the uninterrupted run had (restored weights and
    optimizer state), far from a fresh model's."""
    import os
    import signal
    import threading
    import time

    from training.job import TrainingFailed, run_job

    steps = ["epochs=3", "steps_per_epoch=40", "horovod.num_proc=2"]
    whole = run_job(spark, config(fashion_small, mlflow_store, *steps, "registry.enabled=false"))
    uninterrupted = [m.value for m in sorted(client().get_metric_history(whole.run_id, "loss"), key=lambda m: m.step)]

    def kill_rank_1_after_epoch_0() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = [r for r in runs_of() if r.info.run_id != whole.run_id]
            if runs and client().get_metric_history(runs[0].info.run_id, "loss"):
                for pid in rank_pids(1):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_after_epoch_0, daemon=True)
    killer.start()
    with pytest.raises(TrainingFailed, match="resume with resume=") as failure:
        run_job(spark, config(fashion_small, mlflow_store, *steps, "registry.enabled=false"))
    killer.join()
    run_id = str(failure.value).split("resume=")[1].split(":")[0]
    c = client()
    assert c.get_run(run_id).info.status == "FAILED"
    done = [m.step for m in c.get_metric_history(run_id, "loss")]
    assert done and done[-1] < 2, "the kill came too late to interrupt training"

    resumed = run_job(spark, config(fashion_small, mlflow_store, *steps, "registry.enabled=false", f"resume={run_id}"))
    assert resumed.run_id == run_id
    assert len(runs_of()) == 2  # the uninterrupted run and this one: the resume made no new run
    assert c.get_run(run_id).info.status == "FINISHED"
    history = {m.step: m.value for m in c.get_metric_history(run_id, "loss")}
    assert sorted(history) == [0, 1, 2]
    first_resumed = done[-1] + 1
    fresh = uninterrupted[0]  # a model trained from scratch for one epoch
    # Within 15 % (threaded input and 2 ranks are not bit-reproducible: 0 % and 5.5 % seen); a fresh
    # model lands near the first epoch's loss instead (+190 % with the restore removed).
    assert history[first_resumed] == pytest.approx(uninterrupted[first_resumed], rel=0.15)
    assert abs(history[first_resumed] - fresh) > 3 * abs(history[first_resumed] - uninterrupted[first_resumed])


def test_uneven_shards_finish(spark, fashion_small):
    from deepspark.datasets import open_dataset
    from training.data import ShardSpec, read_row_groups
    from training.job import run_job

    dataset = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    url = dataset.split_url("train")
    shard_rows = [sum(len(y) for _, y in read_row_groups(ShardSpec(url, dataset.spec, "image", rank, 2), None, False))
                  for rank in (0, 1)]
    assert sum(shard_rows) == dataset.rows("train")
    assert shard_rows[0] != shard_rows[1], f"fixture should shard unevenly, got {shard_rows}"
    steps = max(shard_rows) // 16 + 2  # more steps than the smaller shard holds: it must cycle, not hang
    result = run_job(spark, config(fashion_small, ["tracking.enabled=false"], "epochs=1", f"steps_per_epoch={steps}"))
    # Both ranks ran every step (the smaller shard cycled) and were evaluated on every test row.
    assert result.num_proc == 2 and sum(map(sum, result.confusion)) == min(200, dataset.rows("test"))


@pytest.mark.parametrize("override,key", [
    ("horovod.num_proc=3", "horovod.num_proc"),
    ("data.name=missing", "data.name"),
    ("data.test_split=holdout", "data.test_split"),
    ("optimizer.batch_size=100000", "optimizer.batch_size"),
    ("model.name=vgg99", "model.name"),  # valid names depend on the dataset's modality
])
def test_driver_side_errors_name_the_key(spark, fashion_small, override, key):
    from training.job import plan

    cfg = config(fashion_small, ["tracking.enabled=false"], override)
    if override.startswith("optimizer"):
        cfg = cfg.model_copy(update={"steps_per_epoch": None})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan(spark, cfg)



def test_early_stopping_without_a_validation_split_is_refused(spark, fashion_small):
    from training.job import plan

    cfg = config(fashion_small, ["tracking.enabled=false"], "early_stopping.patience=2", "data.val_split=holdout")
    with pytest.raises(ConfigError, match="early_stopping: needs a validation split.*'holdout'"):
        plan(spark, cfg)
    assert plan(spark, config(fashion_small, ["tracking.enabled=false"], "data.val_split=holdout")).num_proc == 2
