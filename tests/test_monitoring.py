"""Drift monitoring: the statistics each modality defines, the reference and its verdicts (pure),
and batch inference against a model registered by the real training job (real local[2] Spark,
sqlite MLflow): shifted Fashion-MNIST is flagged and held-out images are not, the drift table is
committed with the predictions, a cumulative window adds up runs, `fail_on_drift` exits 3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepspark import monitoring
from deepspark.monitoring import Reference, Thresholds

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _judge(reference_stats, current_stats, probs_ref, probs_now):
    reference = Reference.capture(reference_stats, probs_ref, None, "test")
    counts = {name: monitoring.bin_counts(monitoring.bin_rows(values, reference.edges[name]),
                                          len(reference.edges[name]) + 1)
              for name, values in {**current_stats, monitoring.PROBABILITY: probs_now.max(1)}.items()}
    labels = np.bincount(probs_now.argmax(1), minlength=probs_now.shape[1])
    return {v.statistic: v for v in monitoring.compare(reference, counts, labels, None, Thresholds())}


def _probs(rng, n, classes=4, skew=0.0):
    logits = rng.normal(size=(n, classes))
    logits[:, 0] += skew
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_each_modality_describes_its_inputs_in_its_users_terms():
    from pipelines.audio.modality import AUDIO
    from pipelines.audio.transforms import AudioRules
    from pipelines.images.modality import ImageModality
    from pipelines.text.modality import TEXT
    from pipelines.text.transforms import TextRules

    image = np.zeros((1, 2, 2, 1), np.uint8)
    image[0, 0, :, 0] = 255  # top row white: brightness 0.5, contrast 0.5, vertical steps only
    stats = ImageModality().input_statistics(image, None, {})
    assert stats["brightness"][0] == pytest.approx(0.5) and stats["contrast"][0] == pytest.approx(0.5)
    assert stats["sharpness"][0] == pytest.approx((1.0 + 0.0) / 2)  # rows differ by 1, columns by 0

    ids = np.array([[5, 1, 7, 1, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)  # PAD 0, OOV 1
    stats = TEXT.input_statistics(ids, TextRules(sequence_length=6), {})
    assert stats["length_tokens"].tolist() == [4, 1] and stats["out_of_vocabulary"].tolist() == [0.5, 1.0]

    rules = AudioRules(sample_rate=100, seconds=1.0)
    clip = np.zeros((1, 100), np.int16)
    clip[0, 20:70] = 16384  # half scale for 0.5 s: -6.02 dBFS
    stats = AUDIO.input_statistics(clip, rules, {})
    assert stats["duration_s"][0] == pytest.approx(0.5) and stats["loudness_dbfs"][0] == pytest.approx(-6.02, abs=0.01)


def test_a_shifted_statistic_drifts_and_a_second_sample_of_the_same_does_not():
    rng = np.random.default_rng(0)
    same = _judge({"brightness": rng.normal(0.3, 0.1, 2000)}, {"brightness": rng.normal(0.3, 0.1, 400)},
                  _probs(rng, 2000), _probs(rng, 400))
    assert not any(v.drifted for v in same.values()), same
    assert same["brightness"].value < 0.1 and same[monitoring.LABELS].value < 0.1
    moved = _judge({"brightness": rng.normal(0.3, 0.1, 2000)}, {"brightness": rng.normal(0.5, 0.1, 400)},
                   _probs(rng, 2000), _probs(rng, 400, skew=2.0))
    assert moved["brightness"].drifted and moved["brightness"].value > 1.0
    assert moved[monitoring.LABELS].drifted and moved[monitoring.PROBABILITY].drifted
    assert sum(moved["brightness"].counts) == 400 and len(moved["brightness"].reference_shares) == 10
    few = _judge({"brightness": rng.normal(0.3, 0.1, 2000)}, {"brightness": rng.normal(0.9, 0.1, 50)},
                 _probs(rng, 2000), _probs(rng, 50))
    assert few["brightness"].value is None and not few["brightness"].drifted  # under min_rows: not judged


def test_text_from_another_corpus_and_noisy_audio_drift_on_their_statistics():
    from pipelines.audio.modality import AUDIO
    from pipelines.audio.transforms import AudioRules
    from pipelines.text.modality import TEXT
    from pipelines.text.transforms import TextRules

    rng = np.random.default_rng(1)
    rules = TextRules(sequence_length=32)
    def word(i, first):  # letters only: the tokenizer splits digits off
        return first + chr(97 + i // 26) + chr(97 + i % 26)

    vocab = [word(i, "w") for i in range(200)]
    state = {"vocabulary": vocab}
    preprocess = TEXT.preprocessor(rules, state)

    def corpus(n, words):
        return np.stack([preprocess(" ".join(rng.choice(words, rng.integers(8, 30))))[0] for _ in range(n)])

    other = [word(i, "z") for i in range(100)] + vocab[:50]  # another corpus: most words unknown
    reference = {k: v for k, v in TEXT.input_statistics(corpus(1000, vocab), rules, state).items()}
    verdicts = _judge(reference, TEXT.input_statistics(corpus(300, vocab), rules, state),
                      _probs(rng, 1000), _probs(rng, 300))
    assert not any(v.drifted for v in verdicts.values())
    verdicts = _judge(reference, TEXT.input_statistics(corpus(300, other), rules, state),
                      _probs(rng, 1000), _probs(rng, 300))
    assert verdicts["out_of_vocabulary"].drifted and not verdicts["length_tokens"].drifted

    audio = AudioRules(sample_rate=1000, seconds=1.0)

    def clips(n, noise):
        t = np.arange(1000) / 1000
        out = np.zeros((n, 1000), np.int16)
        for i in range(n):
            tone = rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * rng.uniform(50, 200) * t) * (np.abs(t - 0.5) < 0.3)
            out[i] = np.clip((tone + rng.normal(0, noise, 1000)) * 32767, -32768, 32767).astype(np.int16)
        return out

    reference = AUDIO.input_statistics(clips(1000, 0.0), audio, {})
    verdicts = _judge(reference, AUDIO.input_statistics(clips(300, 0.0), audio, {}), _probs(rng, 1000),
                      _probs(rng, 300))
    assert not any(v.drifted for v in verdicts.values())
    verdicts = _judge(reference, AUDIO.input_statistics(clips(300, 0.05), audio, {}), _probs(rng, 1000),
                      _probs(rng, 300))
    assert verdicts["duration_s"].drifted  # noise above the trim level stretches the span to the clip


def test_the_reference_round_trips_and_bins_like_numpys_histogram():
    rng = np.random.default_rng(2)
    values = rng.normal(size=500)
    reference = Reference.capture({"x": values}, _probs(rng, 500), rng.normal(size=(500, 8)), "test", sample=64)
    again = Reference.from_json(reference.to_json())
    assert again == reference and len(again.embedding) == 64 and again.rows == 500
    edges = np.concatenate([[-np.inf], reference.edges["x"], [np.inf]])
    assert monitoring.bin_counts(monitoring.bin_rows(values, reference.edges["x"]), len(edges) - 1).tolist() == \
        np.histogram(values, edges)[0].tolist()
    chosen = monitoring.in_sample([f"{i:08x}" + "0" * 56 for i in range(0, 16**8, 16**7)], 0.25)
    assert chosen.tolist() == [True] * 4 + [False] * 12  # by the hash's first 8 hex digits


# --- batch inference, with the registry's model --------------------------------------------------

def _write(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from pipelines.images.demo_data import CLASS_NAMES, _png, folder_name

    for i, (image, label) in enumerate(zip(images, labels)):
        target = folder / folder_name(CLASS_NAMES[label])
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{i:05d}.png").write_bytes(_png(image, f"image {i}"))
    return folder


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Fashion-MNIST test images the reference never saw (it holds the first 400), as they are,
    inverted and rotated a quarter turn."""
    from pipelines.images.demo_data import load_split

    images, labels = load_split("test")
    images, labels = images[2000:2400], labels[2000:2400]
    base = tmp_path_factory.mktemp("held_out")
    return {"plain": _write(base / "plain", images, labels),
            "inverted": _write(base / "inverted", 255 - images, labels),
            "rotated": _write(base / "rotated", np.rot90(images, 1, axes=(1, 2)).copy(), labels)}


def _infer(spark, registry, folder, out, *extra):
    from deepspark.config import load_config
    from inference.config import BatchInferenceConfig
    from inference.job import run_job

    return run_job(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *registry, f"input.path={folder}", f"output.path={out}", "tracking.enabled=true", *extra]))


@pytest.mark.spark
@pytest.mark.slow
def test_shifted_images_are_flagged_and_held_out_ones_are_not(spark, registry, held_out, tmp_path):
    import mlflow

    from inference.state import read_commit

    verdicts = {}
    for name, folder in held_out.items():
        result = _infer(spark, registry, folder, tmp_path / name)
        assert result.scored == 400 and result.drift is not None
        verdicts[name] = {v.statistic: v for v in result.drift.verdicts[1]}
        assert (result.exit_code, result.drift.detected) == (0, name != "plain"), result.summary()
        assert ("DRIFT in" in result.summary()) == (name != "plain")
    assert not any(v.drifted for v in verdicts["plain"].values()), verdicts["plain"]
    assert verdicts["inverted"]["brightness"].drifted and verdicts["inverted"]["brightness"].value > 1
    # A quarter turn keeps every pixel (brightness, contrast unchanged): the model's view catches it.
    assert not verdicts["rotated"]["brightness"].drifted
    assert verdicts["rotated"]["embedding"].drifted and verdicts["rotated"]["embedding"].p_value < 0.01
    assert verdicts["plain"]["embedding"].rows == 256  # the configured sample, chosen by content hash

    # The drift table is committed with the predictions it judged.
    commit = read_commit(spark, str(tmp_path / "inverted"))
    drift_rows = {r.statistic: r for r in commit.drift.collect()}
    job_ids = {r.job_id for r in commit.predictions.select("job_id").distinct().collect()}
    assert commit.number == 1 and {r.job_id for r in drift_rows.values()} == job_ids
    assert drift_rows["brightness"].drifted and sum(drift_rows["brightness"].counts) == 400
    assert drift_rows["brightness"].value == pytest.approx(verdicts["inverted"]["brightness"].value)
    # ... and in the run: metrics and a plot per judged version.
    mlflow.set_tracking_uri(registry[0].split("=", 1)[1])
    run = mlflow.search_runs(experiment_names=["deepspark"], filter_string=f"tags.`inference.job_id` = '{result.job_id}'",
                             output_format="list")[0]
    assert run.data.metrics["drift_detected"] == 1.0 and run.data.metrics["drift_embedding"] < 0.01
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "drift")] == ["drift/v1_run.png"]


@pytest.mark.spark
@pytest.mark.slow
def test_a_cumulative_window_adds_up_the_committed_runs(spark, registry, held_out, tmp_path):
    import shutil

    incoming = tmp_path / "incoming"
    shutil.copytree(held_out["plain"], incoming)
    first = _infer(spark, registry, incoming, tmp_path / "out", "monitor.window=cumulative")
    shutil.copytree(held_out["inverted"], incoming / "more")  # inverted images arrive: half of the window
    second = _infer(spark, registry, incoming, tmp_path / "out", "monitor.window=cumulative")
    run_only = _infer(spark, registry, incoming / "more", tmp_path / "other")
    assert (first.scored, second.scored) == (400, 400)
    before, after = ({v.statistic: v for v in r.drift.verdicts[1]} for r in (first, second))
    assert (before["brightness"].rows, after["brightness"].rows) == (400, 800)
    assert after["brightness"].drifted
    only = {v.statistic: v for v in run_only.drift.verdicts[1]}["brightness"]
    assert 0.2 < after["brightness"].value < only.value  # half the window is unshifted
    # A full refresh scores everything again and replaces the earlier batches: the window starts over.
    refreshed = _infer(spark, registry, incoming, tmp_path / "out", "monitor.window=cumulative", "full_refresh=true")
    assert refreshed.scored == 800
    assert {v.statistic: v for v in refreshed.drift.verdicts[1]}["brightness"].rows == 800


@pytest.mark.spark
@pytest.mark.slow
def test_fail_on_drift_exits_3_after_committing(spark, registry, held_out, tmp_path):
    from deepspark.localcluster import submit_command
    from inference.state import read_commit

    out = tmp_path / "out"
    cmd, env = submit_command("local[2]", JOBS / "batch_inference.py", [
        *registry, f"input.path={held_out['inverted']}", f"output.path={out}", "monitor.fail_on_drift=true"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRIFT in brightness" in proc.stdout
    assert read_commit(spark, str(out)).predictions.count() == 400  # committed all the same


@pytest.mark.spark
def test_the_drift_table_writes_the_same_rows_through_spark_where_pyarrow_does_not_reach(spark, tmp_path,
                                                                                       monkeypatch):
    """Object stores pyarrow.fs does not reach (s3a://, abfs://) get the table written by Spark:
    same columns, lists as arrays, missing values as nulls (an unjudged statistic has no value)."""
    from deepspark import filesystem
    from deepspark.monitoring import Verdict
    from inference import monitor

    verdicts = {"run": {3: [Verdict("brightness", "input", "psi", 0.5, 0.2, True, 400, [100, 300], [0.5, 0.5]),
                            Verdict("embedding", "embedding", "mmd", None, 0.01, False, 20)]}}
    tables = monitor.table(verdicts, "job-1", "2026-12-07T00:00:00+00:00")
    for reached, folder in ((True, "arrow"), (False, "spark")):
        monkeypatch.setattr(filesystem, "reaches", lambda url, reached=reached: reached)
        monitor.write_table(spark, tables, lambda version, folder=folder: f"file://{tmp_path}/{folder}/v{version}")
    arrow, through_spark = (sorted(spark.read.parquet(f"file://{tmp_path}/{f}/v3").collect(), key=lambda r: r.statistic)
                            for f in ("arrow", "spark"))
    assert [r.asDict() for r in through_spark] == [r.asDict() for r in arrow]
    assert through_spark[0].counts == [100, 300] and through_spark[1].value is None and through_spark[1].counts == []
