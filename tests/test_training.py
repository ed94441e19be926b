"""Distributed training end to end: real local[2] Spark, real Horovod ranks over gloo, real
Petastorm readers, a real sqlite MLflow store. Tiny step counts keep each run short."""

from __future__ import annotations

import numpy as np
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
    cfg = config(fashion_small, store, "horovod.timeline=true")  # the time breakdown's allreduce and negotiation
    result = run_job(spark, cfg)
    return result, store, cfg


def test_two_ranks_make_exactly_one_finished_run(trained):
    """One run; its params are the whole resolved config (defaults and conf/base included, not
    only what the test set), and config/resolved.yaml holds the same config."""
    import yaml

    result, _, cfg = trained
    runs = runs_of()
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert result.num_proc == 2
    assert run.data.params["resolved.num_proc"] == "2"  # not set by the test: Spark's 2 task slots
    params = {k: v for k, v in run.data.params.items() if not k.startswith("resolved.")}
    dumped = cfg.model_dump(mode="json")
    assert set(params) == set(flat_keys(dumped))
    assert params["optimizer.learning_rate"] == str(dumped["optimizer"]["learning_rate"])  # a default
    assert params["loader.shuffle_buffer"] == str(dumped["loader"]["shuffle_buffer"])
    with open(client().download_artifacts(result.run_id, "config/resolved.yaml")) as fh:
        logged = yaml.safe_load(fh)
    assert logged == dumped
    assert run.data.tags["dataset.name"] == "fashion-small"


def flat_keys(node: dict, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in node.items():
        out += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]  # {}: no leaf
    return out


def evaluated_test_rows(spark, dataset, max_rows: int) -> tuple:
    """The test split's first rows as stored: the rows the training job evaluates."""
    from deepspark.datasets import open_dataset
    from training.data import ShardSpec, strided_rows

    opened = open_dataset(spark, str(dataset.root), dataset.name)
    return strided_rows(ShardSpec(opened.split_url("test"), opened.spec, "image", 0, 1), max_rows)


def registered_probabilities(model_uri: str, tensors):
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().probabilities(tensors)


def test_per_epoch_metrics_dataset_and_artifacts(trained, spark, fashion_small):
    result, *_ = trained
    c = client()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "input_stall_share"):
        assert [m.step for m in c.get_metric_history(result.run_id, key)] == [0, 1], key
    run = c.get_run(result.run_id)
    # The logged test accuracy is the registered model's accuracy on the evaluated test rows,
    # recomputed here from its own predictions (max_eval_rows: the split's first 200 rows as stored).
    xs, ys = evaluated_test_rows(spark, fashion_small, 200)
    predicted = registered_probabilities("models:/fashion-mnist-classifier@candidate", xs).argmax(axis=1)
    assert run.data.metrics["test_accuracy"] == pytest.approx(float((predicted == ys).mean()), abs=1e-6)
    confusion = np.array(result.confusion)
    assert confusion.sum(axis=1).tolist() == np.bincount(ys, minlength=confusion.shape[0]).tolist()
    assert confusion.sum(axis=0).tolist() == np.bincount(predicted, minlength=confusion.shape[0]).tolist()
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name.startswith("fashion-small@v")
    artifacts = {a.path for a in c.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/confusion_matrix.png", "plots/epoch_breakdown.png"}
    checkpoints = {a.path for a in c.list_artifacts(result.run_id, "checkpoints")}
    assert {"checkpoints/epoch-0000.json", "checkpoints/epoch-0001.tar"} <= checkpoints
    assert sum(map(sum, result.confusion)) == 200  # max_eval_rows test images, each counted once


def test_each_epochs_time_is_broken_down_and_the_parts_add_up_to_it(trained):
    from training.remote import BREAKDOWN

    result, *_ = trained
    c = client()
    history = {key: {m.step: m.value for m in c.get_metric_history(result.run_id, key)}
               for key in (*BREAKDOWN, "time_epoch_s")}
    for epoch in (0, 1):
        parts = {key: history[key][epoch] for key in BREAKDOWN}
        total = history["time_epoch_s"][epoch]
        assert abs(sum(parts.values()) - total) <= 0.05 * total, (epoch, parts, total)
        # 2 ranks: the gradients' allreduces are read off Horovod's timeline; validation and the
        # checkpoint are timed; compute is what the training steps spent otherwise.
        assert parts["time_allreduce_s"] > 0 and parts["time_negotiation_s"] > 0, parts
        assert parts["time_validation_s"] > 0 and parts["time_checkpoint_s"] > 0 and parts["time_compute_s"] > 0
        assert parts["time_compute_s"] + parts["time_allreduce_s"] < total


def test_registered_model_has_signature_and_predicts(trained, spark, fashion_small):
    """The registered model takes raw file bytes (its signature says so), carries its modality
    record, and predicts from raw bytes exactly what its Keras model gives for the ETL's stored
    tensors of the same files; a bad file gets its quarantine reason."""
    from urllib.parse import urlparse

    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from deepspark.datasets import open_dataset

    result, *_ = trained
    version = client().get_model_version_by_alias("fashion-mnist-classifier", "candidate")
    assert int(version.version) == result.model_version
    model_uri = "models:/fashion-mnist-classifier@champion"
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict() == [{"type": "binary", "required": True}]
    model = mlflow.pyfunc.load_model(model_uri)
    record = model.unwrap_python_model().record
    assert (record.modality, record.spec.shape, record.spec.dtype) == ("image", (28, 28, 1), "uint8")
    raw = fashion_small.root.parent / "raw" / "test"
    files = [f for label in ("Bag", "Coat") for f in sorted((raw / label).iterdir())[:4]]
    out = model.predict(pd.DataFrame({"content": [f.read_bytes() for f in files] + [b""]}))
    assert list(out.columns) == ["predicted_label", "probability", "reason"]
    assert out["reason"][:-1].isna().all()
    assert out["predicted_label"].iloc[-1] is None and out["reason"].iloc[-1] == "empty_file"
    opened = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    stored = pq.read_table(urlparse(opened.split_url("test")).path, columns=["path", record.spec.column]).to_pandas()
    tensor_of = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]: t for p, t in zip(stored["path"], stored[record.spec.column])}
    tensors = record.plugin.decode([tensor_of[f"{f.parent.name}/{f.name}"] for f in files], record.spec)
    probabilities = model.unwrap_python_model().probabilities(np.stack(tensors))
    assert out["predicted_label"][:-1].tolist() == [record.labels[i] for i in probabilities.argmax(axis=1)]
    assert out["probability"][:-1].to_numpy() == pytest.approx(probabilities.max(axis=1), abs=1e-5)


def test_champion_gate_both_ways(trained, spark, fashion_small):
    from training.job import run_job

    result, store, _ = trained
    worse = run_job(
        spark, config(fashion_small, store, "epochs=1", "steps_per_epoch=1", "optimizer.learning_rate=0.00001")
    )
    c = client()
    assert worse.test["test_accuracy"] < result.test["test_accuracy"]
    assert int(c.get_model_version_by_alias("fashion-mnist-classifier", "candidate").version) == worse.model_version
    assert int(c.get_model_version_by_alias("fashion-mnist-classifier", "champion").version) == result.model_version
    forced = run_job(
        spark,
        config(
            fashion_small,
            store,
            "epochs=1",
            "steps_per_epoch=1",
            "optimizer.learning_rate=0.00001",
            "registry.gate_min_delta=-1.0",
        ),
    )
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
    logged = sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == [0, 1, 2]  # each epoch exactly once: none logged again on resume
    history = {m.step: m.value for m in logged}
    first_resumed = done[-1] + 1
    fresh = uninterrupted[0]  # a model trained from scratch for one epoch
    # Within 15 % (threaded input and 2 ranks are not bit-reproducible: 0 % and 5.5 % seen); a fresh
    # model lands near the first epoch's loss instead (+190 % with the restore removed).
    assert history[first_resumed] == pytest.approx(uninterrupted[first_resumed], rel=0.15)
    assert abs(history[first_resumed] - fresh) > 3 * abs(history[first_resumed] - uninterrupted[first_resumed])


def test_early_stopping_decides_on_the_shared_validation_metric_and_tests_the_best_epoch(
        spark, fashion_small, mlflow_store):
    """patience 1 with restore_best: the epochs the run logged, and the best epoch it tested,
    are exactly what the rule gives on the logged (exact, allreduced) validation accuracies."""
    from training.job import run_job

    result = run_job(spark, config(fashion_small, mlflow_store, "epochs=5", "steps_per_epoch=6",
                                   "early_stopping.patience=1", "early_stopping.restore_best=true",
                                   "registry.enabled=false"))
    logged = sorted(client().get_metric_history(result.run_id, "val_accuracy"), key=lambda m: m.step)
    values = [m.value for m in logged]
    best, best_epoch, ran = None, None, 5
    for epoch, value in enumerate(values):  # KeepBest's rule, replayed
        if best is None or value > best:
            best, best_epoch = value, epoch
        elif epoch - best_epoch >= 1:
            ran = epoch + 1
            break
    assert [m.step for m in logged] == list(range(ran)), values
    assert result.test["best_epoch"] == best_epoch


def test_more_ranks_than_train_row_groups_fails_naming_the_key(spark, tmp_path):
    """A train split of one row group cannot feed 2 ranks (Petastorm shards by row group): the
    job says so before launching, naming horovod.num_proc."""
    from deepspark.layout import assign_split
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl
    from tests.conftest import make_flat_folder
    from training.job import run_job

    halves = {"train": 0.5, "test": 0.5}  # two files, one per split: a seed that deals them so
    seed = next(s for s in range(100) if {assign_split(f"{c}/0.png", s, halves) for c in "ab"} == set(halves))
    result = run_etl(spark, load_config(EtlConfig, "etl", [
        f"input.path={make_flat_folder(tmp_path / 'raw', 1)}", f"output.root={tmp_path / 'datasets'}",
        "output.name=one-group", "tracking.enabled=false", f"input.seed={seed}", "input.stratify=false",
        "input.split_fractions={train: 0.5, test: 0.5}"]))
    assert result.manifest["counts"]["train"] == {"a": 1} or result.manifest["counts"]["train"] == {"b": 1}
    dataset = type("Dataset", (), {"root": tmp_path / "datasets", "name": "one-group"})
    with pytest.raises(ConfigError, match=r"horovod\.num_proc=2 but the train split has 1 row group"):
        run_job(spark, config(dataset, ["tracking.enabled=false"], "horovod.num_proc=2", "model.name=mlp"))


def test_uneven_shards_finish(spark, fashion_small):
    from deepspark.datasets import open_dataset
    from training.data import ShardSpec, read_row_groups
    from training.job import run_job

    dataset = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    url = dataset.split_url("train")
    shard_rows = [
        sum(len(y) for _, y in read_row_groups(ShardSpec(url, dataset.spec, "image", rank, 2), None, False))
        for rank in (0, 1)
    ]
    assert sum(shard_rows) == dataset.rows("train")
    assert shard_rows[0] != shard_rows[1], f"fixture should shard unevenly, got {shard_rows}"
    steps = max(shard_rows) // 16 + 2  # more steps than the smaller shard holds: it must cycle, not hang
    result = run_job(spark, config(fashion_small, ["tracking.enabled=false"], "epochs=1", f"steps_per_epoch={steps}"))
    # Both ranks ran every step (the smaller shard cycled) and were evaluated on every test row.
    assert result.num_proc == 2 and sum(map(sum, result.confusion)) == min(200, dataset.rows("test"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("horovod.num_proc=3", "horovod.num_proc"),
        ("data.name=missing", "data.name"),
        ("data.test_split=holdout", "data.test_split"),
        ("optimizer.batch_size=100000", "optimizer.batch_size"),
        ("model.name=vgg99", "model.name"),  # valid names depend on the dataset's modality
        ("model.params={depth: 3}", "model.params: pipelines.images.models:convnet does not take"),
        ("model.params={dense: -1}", "model.name: pipelines.images.models:convnet"),  # the builder raised
    ],
)
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


def test_init_from_reads_the_exact_weights_of_a_registered_model_or_a_file(spark, fashion_small, trained, tmp_path):
    """`model.init_from` on the driver, before any task: a registered version, a .keras model file
    and a .weights.h5 file give exactly the registered model's tensors; a file of another shape and
    a missing file fail naming the key."""
    import mlflow.pyfunc

    from deepspark import builders
    from training.job import plan

    _, store, _ = trained
    mlflow.set_tracking_uri(store[0].split("=", 1)[1])
    registered = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1").unwrap_python_model().keras_model
    registered.save(tmp_path / "model.keras")
    registered.save_weights(tmp_path / "model.weights.h5")
    for source in ("models:/fashion-mnist-classifier/1", tmp_path / "model.keras", tmp_path / "model.weights.h5"):
        weights = plan(spark, config(fashion_small, store, f"model.init_from={source}")).initial_weights
        assert weights is not None and len(weights) == len(registered.get_weights())
        assert all(np.array_equal(a, b) for a, b in zip(weights, registered.get_weights())), source
    narrow = builders.build("pipelines.images.models:convnet", registered_record(fashion_small, spark), {"filters": [8]})
    narrow.save(tmp_path / "narrow.keras")
    with pytest.raises(ConfigError, match=r"model\.init_from: .*narrow\.keras' holds 6 weight tensors, the model 8; "
                                          r"tensor 0 is \(3, 3, 1, 8\) there and \(3, 3, 1, 32\) in the model"):
        plan(spark, config(fashion_small, store, f"model.init_from={tmp_path / 'narrow.keras'}"))
    with pytest.raises(ConfigError, match=r"model\.init_from: cannot read .*missing\.keras"):
        plan(spark, config(fashion_small, store, f"model.init_from={tmp_path / 'missing.keras'}"))


def registered_record(dataset, spark):
    from deepspark.datasets import open_dataset

    return open_dataset(spark, str(dataset.root), dataset.name).record


def test_training_starts_from_the_init_from_weights(spark, fashion_small, mlflow_store, tmp_path):
    """2 ranks trained for 2 steps at a learning rate too small to move a float32 weight: the
    registered model holds the file's weights, not the seeded initial ones it would start from."""
    import mlflow.pyfunc

    from deepspark import builders
    from training.job import run_job

    record = registered_record(fashion_small, spark)
    start = builders.build("pipelines.images.models:convnet", record, {})
    start.set_weights([np.full(w.shape, 0.01 * (i + 1), w.dtype) for i, w in enumerate(start.get_weights())])
    start.save(tmp_path / "start.keras")
    result = run_job(spark, config(fashion_small, mlflow_store, f"model.init_from={tmp_path / 'start.keras'}",
                                   "epochs=1", "steps_per_epoch=2", "optimizer.learning_rate=1.0e-12",
                                   "registry.model_name=from-weights"))
    mlflow.set_tracking_uri(mlflow_store[0].split("=", 1)[1])
    trained = mlflow.pyfunc.load_model(f"models:/from-weights/{result.model_version}").unwrap_python_model().keras_model
    for got, want in zip(trained.get_weights(), start.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_the_single_task_engine_trains_the_same_job_without_horovod(spark, fashion_small, mlflow_store):
    """A second engine through the seam, with no change to the job or the model: one Spark task
    trains alone (no Horovod, no gloo), logs its run and registers its model."""
    import mlflow

    from training.job import run_job

    result = run_job(spark, config(fashion_small, mlflow_store, "engine=single", "registry.model_name=single"))
    assert result.num_proc == 1 and result.model_version == 1
    assert sum(map(sum, result.confusion)) == 200  # max_eval_rows of the 400 test images, all by one process
    run = mlflow.MlflowClient(mlflow_store[0].split("=", 1)[1]).get_run(result.run_id)
    assert run.data.params["engine"] == "single" and run.data.params["resolved.num_proc"] == "1"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(result.run_id, "loss")] == [0, 1]
