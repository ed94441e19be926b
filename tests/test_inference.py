"""Batch inference from the registry as Spark UDFs: real local[2] Spark, a real sqlite MLflow
registry with a model trained by the real training job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from inference.config import BatchInferenceConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def infer(spark, registry, folder: Path, out: Path, *extra: str):
    from inference.job import run_inference

    cfg = load_config(BatchInferenceConfig, "batch_inference", [
        *registry, f"input.path={folder}", f"output.path={out}", "tracking.enabled=true", *extra])
    return run_inference(spark, cfg)


def table(spark, out: Path, which: str = "predictions"):
    from inference.state import read_table

    return read_table(spark, str(out), which)


def batch_folders(out: Path) -> set[str]:
    return {p.name for p in out.glob("model_version=*/batch=*")}


def test_end_to_end_from_a_raw_folder(spark, registry, raw_copy, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    out = tmp_path / "predictions"
    result = infer(spark, registry, raw_copy, out, "arrow_batch_rows=64")  # >= 7 Arrow batches of inputs
    c = result.counts
    assert (c.listed, c.skipped, c.hashed, c.scored, c.quarantined, c.unchanged) == (403, 0, 403, 400, 3, 0)
    assert result.commit == 1 and 1 <= result.model_loads <= 2  # once per Python worker, not per batch or task
    rows = table(spark, out).collect()
    assert len(rows) == 400
    first = rows[0]
    assert first.model_name == "fashion-mnist-classifier" and first.model_version == 1 and first.model_run_id
    assert first.predicted_label == first.top_k_labels[0] and len(first.top_k_labels) == 3
    assert list(first.top_k_probabilities) == sorted(first.top_k_probabilities, reverse=True)
    # The labels, probabilities and accuracy are the registered model's own, file by file.
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    served = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1").predict(
        pd.DataFrame({"content": [Path(r.path.replace("file:", "", 1)).read_bytes() for r in rows]}))
    assert [r.predicted_label for r in rows] == list(served["predicted_label"])
    assert np.allclose([r.top_k_probabilities[0] for r in rows], served["probability"], atol=1e-5)
    assert all(r.true_label == Path(r.path).parent.name for r in rows)  # the class folder
    hits = sum(r.true_label == p for r, p in zip(rows, served["predicted_label"]))
    assert result.accuracy == pytest.approx(hits / 400)
    quarantine = table(spark, out, "quarantine").collect()
    assert sorted(r.reason for r in quarantine) == ["empty_file", "not_an_image", "truncated"]
    assert {r.source_size for r in quarantine if r.reason == "empty_file"} == {0}


@pytest.mark.parametrize("route", ["driver", "spark"])
def test_incremental_runs_decide_from_metadata_and_hash_only_candidates(spark, registry, raw_copy, tmp_path, route,
                                                                       monkeypatch):
    """The same decisions whether the driver reads the committed rows itself (an output pyarrow
    reaches) or Spark anti-joins them (an output only the JVM reaches, e.g. s3a://)."""
    import os

    from inference.state import PredictionStore

    if route == "spark":
        monkeypatch.setattr(PredictionStore, "committed_table", lambda *args, **kwargs: None)

    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    coat = sorted((raw_copy / "Coat").iterdir())
    for i in range(5):  # names with a space and glob characters: read literally, not expanded
        shutil.copy(coat[0], raw_copy / "Coat" / f"new [{i}].png")
    second = infer(spark, registry, raw_copy, out)
    c = second.counts
    assert (c.listed, c.skipped, c.hashed, c.scored, c.quarantined) == (408, 403, 5, 5, 0)
    assert second.commit == 2 and len(batch_folders(out)) == 2

    noop = infer(spark, registry, raw_copy, out)  # nothing new: no content read, nothing written
    assert (noop.counts.skipped, noop.counts.hashed, noop.commit, noop.model_loads) == (408, 0, None, 0)
    assert len(batch_folders(out)) == 2 and sorted(p.name for p in (out / "_log").iterdir())[-1].startswith("0" * 19 + "2")

    touched = coat[1]  # new mtime, same bytes: hashed, recognised, not scored again
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 100))
    swapped = coat[2]  # same size and mtime, other bytes: metadata decides, the content is not read
    st = swapped.stat()
    swapped.write_bytes(bytes(b ^ 0xFF for b in swapped.read_bytes()))
    os.utime(swapped, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = coat[3]  # new content and mtime: scored again under its new content hash
    changed.write_bytes(coat[4].read_bytes())
    os.utime(changed, (st.st_atime, st.st_mtime + 200))
    third = infer(spark, registry, raw_copy, out)
    c = third.counts
    assert (c.skipped, c.hashed, c.unchanged, c.scored) == (406, 2, 1, 1)
    rows = table(spark, out)
    assert rows.count() == rows.select("path", "content_hash").distinct().count() == 406
    assert rows.where(rows.path == "file:" + str(changed)).count() == 2  # the old and the new content


def test_a_crashed_commit_leaves_nothing_visible_and_the_rerun_is_exactly_once(spark, registry, raw_copy, tmp_path,
                                                                               monkeypatch):
    from inference import state

    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    for i in range(3):
        (raw_copy / "Bag" / f"late-{i}.png").write_bytes(next((raw_copy / "Coat").iterdir()).read_bytes())

    def crash(*args, **kwargs):
        raise RuntimeError("driver lost before its commit (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(state.PredictionStore, "commit", crash)
        with pytest.raises(RuntimeError, match="simulated"):
            infer(spark, registry, raw_copy, out)
    assert len(batch_folders(out)) == 2  # the crashed run's batch is on disk, but no commit lists it
    assert table(spark, out).count() == 400
    third = infer(spark, registry, raw_copy, out)
    assert (third.scored, third.counts.skipped) == (3, 403)
    rows = table(spark, out)
    assert rows.count() == rows.select("path", "content_hash").distinct().count() == 403
    assert len(batch_folders(out)) == 2  # the orphan was vacuumed by the next run, under its lock


def test_full_refresh_swaps_the_output_in_one_commit(spark, registry, raw_copy, tmp_path):
    out = tmp_path / "predictions"
    first = infer(spark, registry, raw_copy, out)
    again = infer(spark, registry, raw_copy, out, "full_refresh=true")
    assert (again.scored, again.quarantined, again.counts.skipped, again.commit) == (400, 3, 0, 2)
    assert table(spark, out).count() == 400 and table(spark, out, "quarantine").count() == 3
    assert {r.job_id for r in table(spark, out).select("job_id").distinct().collect()} == {again.job_id}
    # The replaced batch stays on disk for readers of the previous commit until two commits later.
    assert batch_folders(out) == {f"batch={first.job_id}", f"batch={again.job_id}"}
    (raw_copy / "Bag" / "one-more.png").write_bytes(next((raw_copy / "Coat").iterdir()).read_bytes())
    infer(spark, registry, raw_copy, out)
    assert f"batch={first.job_id}" in batch_folders(out)  # replaced less than output.retain_hours ago
    infer(spark, registry, raw_copy, out, "full_refresh=true", "output.retain_hours=0")
    assert f"batch={first.job_id}" not in batch_folders(out)  # neither of the two newest commits lists it


def test_a_live_lock_is_refused_and_a_dead_one_is_taken_over(spark, registry, raw_copy, tmp_path):
    import json
    import os
    import socket
    import time

    from deepspark.locks import ConcurrentRunError

    out = tmp_path / "predictions"
    out.mkdir()
    lock = out / "_LOCK"
    lock.write_text(json.dumps({"job_id": "other", "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": 60}))
    with pytest.raises(ConcurrentRunError, match=f"locked by job other \\(pid {os.getpid()} on {socket.gethostname()}"):
        infer(spark, registry, raw_copy, out)
    lock.write_text(json.dumps({"job_id": "far", "host": "elsewhere", "pid": 1, "ttl_s": 60}))
    with pytest.raises(ConcurrentRunError, match="locked by job far"):  # another host: only its lease can tell
        infer(spark, registry, raw_copy, out)
    os.utime(lock, (time.time() - 61, time.time() - 61))  # its holder stopped heartbeating a minute ago
    assert infer(spark, registry, raw_copy, out).scored == 400
    assert not lock.exists()
    lock.write_text(json.dumps({"job_id": "other", "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": 60}))
    (raw_copy / "Bag" / "one-more.png").write_bytes(next((raw_copy / "Coat").iterdir()).read_bytes())
    assert infer(spark, registry, raw_copy, out, "force_unlock=true").scored == 1


def test_a_run_whose_lease_was_taken_over_commits_nothing(spark, registry, raw_copy, tmp_path):
    """While the job scores, a second job takes its lock over for real (the Lease API with
    force_unlock, as `force_unlock=true` does): the first job's writes are never committed."""
    import threading
    import time

    from deepspark.locks import Lease, LockLostError
    from deepspark.storage import HadoopFS
    from inference.state import PredictionStore

    out = tmp_path / "predictions"
    fs = HadoopFS(spark)
    store = PredictionStore.open(fs, str(out))
    taken = threading.Event()

    def take_over_once_held() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "_LOCK").exists():
            time.sleep(0.005)
        Lease(fs, store.lock_url, "the-successor", 60).acquire(force=True)
        taken.set()

    thief = threading.Thread(target=take_over_once_held, daemon=True)
    thief.start()
    with pytest.raises(LockLostError, match="lost its lock"):
        infer(spark, registry, raw_copy, out)
    thief.join(timeout=10)
    assert taken.is_set()
    assert PredictionStore.open(fs, str(out)).current().number == 0  # no commit: readers see nothing
    with pytest.raises(FileNotFoundError, match="no committed predictions"):  # not its batches as a pre-log output's
        table(spark, out)
    assert list(out.glob("model_version=*/batch=*")), "the loser's batch was written, so only the log hides it"
    assert json.loads((out / "_LOCK").read_text())["job_id"] == "the-successor"  # not released by the loser


def test_a_commit_never_overwrites_another_runs_commit(spark, tmp_path):
    """Two runs committing on the same base: the second finds entry 1 made and fails, and entry 1
    still holds the first run's batches (the log entry is an exclusive create, not a write)."""
    from deepspark.locks import ConcurrentRunError
    from deepspark.storage import HadoopFS
    from inference.state import PredictionStore

    store = PredictionStore.open(HadoopFS(spark), str(tmp_path / "predictions"))
    base = store.current()
    store.commit("first", {1: {"predictions": ["first"]}}, False, base)
    with pytest.raises(ConcurrentRunError, match="commit 1 was made by another run"):
        store.commit("second", {1: {"predictions": ["second"]}}, False, base)
    current = PredictionStore.open(HadoopFS(spark), str(tmp_path / "predictions")).current()
    assert (current.number, current.job_id, current.live("predictions")) == (1, "first", [(1, "first")])


@pytest.mark.parametrize("uri,message", [
    ("models:/fashion-mnist-classifier@nope", "does not resolve"),
    ("models:/no-such-model@champion", "does not resolve"),
    ("models:/fashion-mnist-classifier/99", "does not resolve"),
    ("runs:/abc/model", "is not models:/"),
])
def test_model_uri_errors_before_any_task(spark, registry, raw_copy, tmp_path, uri, message):
    with pytest.raises(ConfigError, match=f"model_uri: .*{message}"):
        infer(spark, registry, raw_copy, tmp_path / "out", f"model_uri={uri}")
    assert not (tmp_path / "out").exists()


def test_a_moved_alias_is_followed_and_each_version_scores_once(spark, registry, raw_copy, tmp_path):
    """@champion moved from v1 to v2 and back: each run scores with the version the alias names
    when it starts; v2's run scores everything again (a new model), v1's second run nothing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    client = MlflowClient()
    name = "fashion-mnist-classifier"
    v1 = client.get_model_version(name, "1")
    if not client.search_model_versions(f"name='{name}' and version_number=2"):
        client.create_model_version(name, v1.source, v1.run_id)  # same weights, a new version
    out = tmp_path / "out"
    ran = []
    for version in ("2", "1", "2"):
        client.set_registered_model_alias(name, "champion", version)
        ran.append(infer(spark, registry, raw_copy, out))
    client.set_registered_model_alias(name, "champion", "1")
    assert [r.model for r in ran] == [f"models:/{name}/2", f"models:/{name}/1", f"models:/{name}/2"]
    assert [r.scored for r in ran] == [400, 400, 0]
    counts = {r.model_version: r["count"] for r in table(spark, out).groupBy("model_version").count().collect()}
    assert counts == {1: 400, 2: 400}


def test_dataset_input_and_shape_mismatch(spark, registry, fashion_small, tmp_path):
    from inference.job import run_inference

    base = [*registry, "input.path=null", f"input.dataset_root={fashion_small.root}", f"output.path={tmp_path / 'p'}"]
    result = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference",
                                              [*base, f"input.dataset={fashion_small.name}"]))
    rows = table(spark, tmp_path / "p").collect()
    assert result.scored == result.counts.hashed == len(rows) == 400  # the small dataset's test split
    assert result.accuracy == pytest.approx(sum(r.true_label == r.predicted_label for r in rows) / len(rows))

    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl

    run_etl(spark, load_config(EtlConfig, "etl", [
        f"input.path={fashion_small.root.parent / 'raw'}", f"output.root={fashion_small.root}", "output.name=big",
        "tracking.enabled=false", "image.height=32", "image.width=32"]))
    with pytest.raises(ConfigError, match="input.dataset: big v=1 holds"):
        run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [*base, "input.dataset=big"]))


def test_the_inference_run_records_what_it_read_as_an_mlflow_dataset(spark, registry, raw_copy, fashion_small,
                                                                     tmp_path):
    """A folder: its name, URL and a digest of its listing (a new file changes it); a dataset
    version: name@version and its dataset id, as the training run records it."""
    from mlflow.tracking import MlflowClient

    from inference.job import run_job

    def job(*extra: str):
        result = run_job(spark, load_config(BatchInferenceConfig, "batch_inference", [*registry, *extra]))
        run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("deepspark").experiment_id],
                                         "tags.`deepspark.job` = 'batch_inference'", order_by=["start_time DESC"])[0]
        (dataset_input,) = run.inputs.dataset_inputs
        assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["inference"]
        return result, dataset_input.dataset

    folder = [f"input.path={raw_copy}", f"output.path={tmp_path / 'folder'}"]
    first, logged = job(*folder)
    assert (logged.name, logged.digest) == ("incoming", first.lineage.digest) and str(raw_copy) in logged.source
    (raw_copy / "Bag" / "one-more.png").write_bytes(next((raw_copy / "Coat").iterdir()).read_bytes())
    second, logged_again = job(*folder)
    assert second.scored == 1 and logged_again.digest != logged.digest
    _, from_dataset = job("input.path=null", f"input.dataset_root={fashion_small.root}",
                          f"input.dataset={fashion_small.name}", f"output.path={tmp_path / 'dataset'}")
    manifest = json.loads(next(fashion_small.root.glob(f"{fashion_small.name}/v=*/manifest.json")).read_text())
    assert (from_dataset.name, from_dataset.digest) == (f"{fashion_small.name}@v1", manifest["dataset_id"])


def test_inference_preprocessing_matches_the_etl_tensor(spark, registry, fashion_small):
    """The same file through the registered model's preprocessing and through the ETL gives
    identical tensors, and the pyfunc predicts on raw file bytes."""
    import mlflow.pyfunc
    import pandas as pd
    from petastorm import make_reader

    from deepspark.datasets import open_dataset

    dataset = open_dataset(spark, str(fashion_small.root), fashion_small.name)
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    model = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier/1")
    classifier = model.unwrap_python_model()
    with make_reader(dataset.split_url("test"), reader_pool_type="dummy", num_epochs=1) as reader:
        rows = [next(reader) for _ in range(20)]
    files = [Path(r.path.replace("file:", "", 1)).read_bytes() for r in rows]
    tensors, failures = classifier.preprocess(files)
    assert failures == [None] * 20
    stored = dataset.record.plugin.decode([r.image for r in rows], dataset.spec)
    assert np.array_equal(np.stack(tensors), stored)
    served = model.predict(pd.DataFrame({"content": files + [b"not an image"]}))
    expected = classifier.probabilities(stored).argmax(axis=1)
    assert list(served["predicted_label"][:20]) == [dataset.labels[i] for i in expected]
    assert served["predicted_label"][20] is None and served["reason"][20] == "not_an_image"


def test_compaction_rewrites_many_batches_as_one_without_changing_what_readers_see(spark, registry, raw_copy,
                                                                                 tmp_path):
    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    for i in range(2):
        (raw_copy / "Coat" / f"extra-{i}.png").write_bytes(next((raw_copy / "Bag").iterdir()).read_bytes())
        infer(spark, registry, raw_copy, out)
    assert len(batch_folders(out)) == 3
    before = sorted(tuple(r) for r in table(spark, out).select("path", "content_hash", "predicted_label").collect())
    compacted = infer(spark, registry, raw_copy, out, "compact=true")
    assert compacted.counts.hashed == 0 and compacted.commit == 4
    live = json.loads(sorted((out / "_log").iterdir())[-1].read_text())["batches"]
    assert live["predictions"] == {"1": [f"{compacted.job_id}-compact"]}
    assert live["quarantine"]["1"] == [next(iter(live["quarantine"]["1"]))] and len(live["quarantine"]["1"]) == 1
    after = sorted(tuple(r) for r in table(spark, out).select("path", "content_hash", "predicted_label").collect())
    assert after == before and len(after) == 402
    later = infer(spark, registry, raw_copy, out)  # the metadata survived compaction: nothing is re-read
    assert (later.counts.skipped, later.counts.hashed) == (405, 0)


def test_an_output_from_before_the_commit_log_is_adopted_not_deleted(spark, registry, raw_copy, tmp_path):
    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    shutil.rmtree(out / "_log")  # what an output written before the log looks like
    before = batch_folders(out)
    again = infer(spark, registry, raw_copy, out)
    assert (again.counts.skipped, again.scored, again.commit) == (403, 0, None)
    assert batch_folders(out) == before and table(spark, out).count() == 400
