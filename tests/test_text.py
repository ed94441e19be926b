"""The text modality end to end on real local[2] Spark: CSV/JSONL/.txt inputs -> a Petastorm dataset
with a vocabulary fitted on train only -> Horovod training -> the registered model and the batch job
scoring raw text identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepspark.config import load_config
from pipelines.config import EtlConfig
from tests.conftest import TextCorpus, marker, review

pytestmark = pytest.mark.spark


def text_etl(spark, path: Path, out: Path, *extra: str):
    from pipelines.etl import run_etl

    return run_etl(spark, load_config(EtlConfig, "etl", [
        "modality=text", f"input.path={path}", f"output.root={out}", "output.name=reviews",
        "input.label_column=category", "input.labels=[fresh, rotten]", "text.max_chars=300",
        "text.sequence_length=16", "output.row_group_size_mb=0.002", "tracking.enabled=false", *extra]))


def read_rows(url: str, split: str) -> list:
    from petastorm import make_reader

    with make_reader(f"{url}/data/{split}", reader_pool_type="dummy", num_epochs=1) as reader:
        return list(reader)


@pytest.fixture(scope="module")
def csv_dataset(spark, text_corpus: TextCorpus, tmp_path_factory):
    return text_etl(spark, text_corpus.csv, tmp_path_factory.mktemp("text-etl"))


def test_every_record_is_a_row_or_a_quarantine_row_with_its_reason(spark, csv_dataset, text_corpus):
    result = csv_dataset
    assert result.inputs_in == text_corpus.rows
    assert result.rows_written == len(text_corpus.good)
    assert result.inputs_in == result.rows_written + result.quarantined
    quarantine = spark.read.parquet(f"{result.url}/quarantine").collect()
    expected = sorted(text_corpus.bad.values())
    assert sorted(r.reason for r in quarantine) == expected
    assert all(r.path.split("#")[0].endswith("reviews.csv") and r.detail for r in quarantine)
    assert result.manifest["modality"] == "text" and result.manifest["spec"] == {
        "column": "tokens", "shape": [16], "dtype": "int32", "encoding": "raw"}


def test_many_quarantine_rows_are_written_by_spark(spark, text_corpus, tmp_path, monkeypatch):
    """Past `DRIVER_QUARANTINE_ROWS` the quarantine table is Spark's write, with the same rows."""
    from pipelines import etl

    monkeypatch.setattr(etl, "DRIVER_QUARANTINE_ROWS", 1)
    result = text_etl(spark, text_corpus.csv, tmp_path / "out")
    quarantine = spark.read.parquet(f"{result.url}/quarantine").collect()
    assert sorted(r.reason for r in quarantine) == sorted(text_corpus.bad.values())
    written = [p.name for p in Path(result.url.removeprefix("file:"), "quarantine").glob("part-*")]
    assert written and "part-00000.parquet" not in written  # Spark's part files, not the driver's


def test_vocabulary_is_fitted_on_train_only(csv_dataset):
    """Every review carries a marker token unique to it: the vocabulary holds exactly the markers
    of the rows that landed in train, never one that only val or test rows carry."""
    result = csv_dataset
    vocabulary = set(result.manifest["state"]["vocabulary"])
    markers = {split: {t for row in read_rows(result.url, split) for t in [_marker(row)] if t}
               for split in result.manifest["splits"]}
    assert markers["train"] and markers["test"]
    assert {t for t in vocabulary if t.startswith("xq")} == markers["train"]
    assert not vocabulary & (markers["test"] | markers.get("val", set()))


@pytest.mark.parametrize("size,min_count", [(None, 1), (7, 1), (None, 3)])
def test_vocabulary_is_exactly_the_train_tokens_by_count(spark, csv_dataset, text_corpus, tmp_path, size, min_count):
    """The whole vocabulary, in order, recomputed from the texts of the rows that landed in train:
    every token they hold at least `text.min_count` times, most frequent first, ties alphabetical,
    the first `text.vocabulary_size`; nothing else."""
    from collections import Counter

    from deepspark.modality import content_hash
    from pipelines.text import transforms as T

    result = csv_dataset
    if (size, min_count) != (None, 1):
        extra = [f"text.min_count={min_count}"] + ([f"text.vocabulary_size={size}"] if size else [])
        result = text_etl(spark, text_corpus.csv, tmp_path, *extra)
    text_of = {content_hash(text): text for text in text_corpus.good}
    counts = Counter(token for row in read_rows(result.url, "train")
                     for token in T.tokens(text_of[row.content_hash], T.TextRules()))
    expected = [t for t in sorted(counts, key=lambda t: (-counts[t], t)) if counts[t] >= min_count][:size]
    assert result.manifest["state"]["vocabulary"] == expected
    assert len(expected) == size if size else len(expected) > 10


def _marker(row) -> str | None:
    """The marker token of a stored row, found by decoding its ids is not possible for test-only
    tokens (they are OOV); it is read from the source text via the row's content hash instead."""
    return MARKERS.get(row.content_hash)


MARKERS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _markers(text_corpus):
    from deepspark.modality import content_hash

    MARKERS.update({content_hash(text): text.split()[-1] for text in text_corpus.good})


def test_stored_ids_decode_to_the_train_vocabulary(csv_dataset, text_corpus):
    from pipelines.text import transforms as T

    result = csv_dataset
    vocabulary = result.manifest["state"]["vocabulary"]
    text_of = {}
    from deepspark.modality import content_hash

    for text in text_corpus.good:
        text_of[content_hash(text)] = text
    rows = read_rows(result.url, "train")
    index = T.token_index(vocabulary)
    for row in rows[:20]:
        ids = np.frombuffer(row.tokens, np.int32)
        expected = T.encode_ids(T.tokens(text_of[row.content_hash], T.TextRules()), index, 16)
        assert np.array_equal(ids, expected)
        assert row.label_name == text_corpus.good[text_of[row.content_hash]]


def test_a_csv_with_only_a_header_publishes_nothing(spark, tmp_path):
    from deepspark.config import ConfigError

    path = tmp_path / "header.csv"
    path.write_text("text,category,movie_name\n")
    with pytest.raises(ConfigError, match=r"input\.path: .*header\.csv gave no row to write \(0 input\(s\)"):
        text_etl(spark, path, tmp_path / "out")
    assert not list((tmp_path / "out" / "reviews").glob("v=*"))


def test_a_latin1_csv_is_read_whole_with_input_encoding(spark, tmp_path):
    """A CSV exported as latin-1: read as UTF-8 its accented records are quarantined `undecodable`
    with a detail that names input.encoding; with input.encoding=latin-1 every record is a row
    and its accented words are in the vocabulary."""
    import csv

    from deepspark.config import ConfigError
    from pipelines.config import EtlConfig

    path = tmp_path / "latin1.csv"
    with open(path, "w", newline="", encoding="latin-1") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category"])
        for i in range(30):
            writer.writerow([f"{'café crème superbe' if i % 3 == 0 else 'a fine film'} {marker(i)}",
                             "fresh" if i % 2 else "rotten"])
    as_utf8 = text_etl(spark, path, tmp_path / "utf8")
    assert as_utf8.manifest["totals"]["quarantine_by_reason"] == {"undecodable": 10}
    details = {r.detail for r in spark.read.parquet(f"{as_utf8.url}/quarantine").collect()}
    assert all("input.encoding" in d for d in details), details
    as_latin1 = text_etl(spark, path, tmp_path / "latin1", "input.encoding=latin-1")
    assert (as_latin1.rows_written, as_latin1.quarantined) == (30, 0)
    assert {"café", "crème"} <= set(as_latin1.manifest["state"]["vocabulary"])
    with pytest.raises(ConfigError, match="input.encoding: .*unknown character set 'klingon'"):
        load_config(EtlConfig, "etl", ["input.encoding=klingon"])


def test_duplicate_texts_share_a_split(spark, tmp_path):
    """Without a split column, records are split by a hash of their text: copies never straddle
    train and test."""
    import csv

    path = tmp_path / "dupes.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category"])
        for i in range(40):
            for _ in range(3):
                writer.writerow([review(i, "fresh"), "fresh" if i % 2 else "rotten"])
    result = text_etl(spark, path, tmp_path / "out")
    splits_of: dict[str, set] = {}
    for split in result.manifest["splits"]:
        for row in read_rows(result.url, split):
            splits_of.setdefault(row.content_hash, set()).add(split)
    assert len(splits_of) == 40 and all(len(s) == 1 for s in splits_of.values())


@pytest.mark.parametrize("stratify", [True, False])
def test_records_are_split_per_class(spark, tmp_path, stratify):
    """10 classes of 15 reviews each, no split column: stratified, every class is in every split in
    proportion (12 / 1 / 2), exactly as the pure `stratified_splits` assigns them by content hash
    (a label with 5 copies of one text among 14 others splits that text once); `stratify=false`
    keeps the plain hash of each text, which leaves classes out of the test split."""
    import csv
    from collections import Counter

    from deepspark.layout import assign_split, stratified_splits
    from deepspark.modality import content_hash

    labels = [f"c{k}" for k in range(10)]
    texts = {f"{review(100 * k + i, 'fresh')} {label}": label for k, label in enumerate(labels) for i in range(15)}
    copied = next(iter(texts))
    path = tmp_path / "ten.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category"])
        writer.writerows([[copied, texts[copied]]] * 4)  # 4 more copies of one text
        writer.writerows(texts.items())
    result = text_etl(spark, path, tmp_path / "out", f"input.labels=[{', '.join(labels)}]", "text.max_chars=1000",
                      f"input.stratify={str(stratify).lower()}")
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    seen = {row.content_hash: (split, row.label_name) for split in result.manifest["splits"]
            for row in read_rows(result.url, split)}
    assert len(seen) == 150 and result.rows_written == 154
    keyed = [(content_hash(text), label) for text, label in texts.items()]
    expected = (stratified_splits(keyed, 17, fractions) if stratify
                else {key: assign_split(key, 17, fractions) for key, _ in keyed})
    assert {key: split for key, (split, _) in seen.items()} == expected
    per_split = Counter((split, label) for split, label in seen.values())
    if stratify:
        assert all(per_split[("train", c)] == 12 and per_split[("val", c)] == 1 and per_split[("test", c)] == 2
                   for c in labels)
    else:
        assert len({label for split, label in seen.values() if split == "test"}) < 10
    copies_in = expected[content_hash(copied)]  # the copies are rows of that one split
    assert result.manifest["counts"][copies_in][texts[copied]] == per_split[(copies_in, texts[copied])] + 4


def test_jsonl_folder_with_split_column_and_a_malformed_line(spark, tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    lines = [json.dumps({"body": review(i, "fresh" if i % 2 else "rotten"), "y": "fresh" if i % 2 else "rotten",
                         "part": "test" if i < 10 else "train"}) for i in range(40)]
    (folder / "a.jsonl").write_text("\n".join(lines[:20]) + "\n{not json at all\n")
    (folder / "b.jsonl").write_text("\n".join(lines[20:]) + "\n" + json.dumps(
        {"body": review(99, "fresh"), "y": "fresh", "part": "holdout"}) + "\n")
    result = text_etl(spark, folder, tmp_path / "out", "input.text_column=body", "input.label_column=y",
                      "input.split_column=part")
    assert (result.inputs_in, result.rows_written) == (42, 40)
    assert result.manifest["totals"]["quarantine_by_reason"] == {"malformed_record": 1, "no_split": 1}
    assert {s: sum(c.values()) for s, c in result.manifest["counts"].items()} == {"test": 10, "train": 30}


def test_one_txt_file_per_document_in_class_folders(spark, tmp_path):
    root = tmp_path / "docs"
    for split in ("train", "test"):
        for label in ("fresh", "rotten"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                (root / split / label / f"{i}.txt").write_text(review(i + (100 if split == "test" else 0), label))
    (root / "train" / "fresh" / "latin1.txt").write_bytes("caf\xe9 superb".encode("latin-1"))
    (root / "train" / "fresh" / "empty.txt").write_bytes(b"")
    (root / "train" / "loose.txt").write_text("great film")  # no class folder
    result = text_etl(spark, root, tmp_path / "out", "input.val_from_train=0")
    assert (result.inputs_in, result.rows_written) == (27, 24)
    assert result.manifest["totals"]["quarantine_by_reason"] == {"empty_file": 1, "no_label": 1, "undecodable": 1}


@pytest.mark.slow
def test_trained_model_scores_raw_text_as_the_batch_job_does(spark, csv_dataset, text_corpus, tmp_path):
    """Train through the same Horovod job as images, register, then score the raw CSV with the batch
    job and the same texts with the loaded MLflow model: identical labels, same quarantine reasons."""
    import mlflow
    import pandas as pd

    from inference.config import BatchInferenceConfig
    from inference.job import run_inference
    from inference.state import read_table
    from training.config import TrainConfig
    from training.job import run_job

    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    data_root = Path(csv_dataset.url.replace("file:", "", 1)).parent.parent
    trained = run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={data_root}", "data.name=reviews", *store, "model.name=cnn", "epochs=3", "steps_per_epoch=6",
        "optimizer.batch_size=8", "optimizer.learning_rate=0.005", "registry.model_name=reviews-classifier"]))
    assert trained.model_version == 1
    scored = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *store, "model_uri=models:/reviews-classifier@champion", f"input.path={text_corpus.csv}",
        "input.label_column=category", f"output.path={tmp_path / 'predictions'}"]))
    # Labels are not needed to score: the unlabelled and the "plot" review are scored too.
    assert (scored.counts.listed, scored.counts.hashed) == (1, text_corpus.rows)  # one CSV file, its records
    assert (scored.scored, scored.quarantined) == (len(text_corpus.good) + 2, 4)
    assert scored.accuracy is not None and scored.accuracy > 0.9  # the sentiment words give the label away
    rows = read_table(spark, str(tmp_path / "predictions")).select("content_hash", "predicted_label").collect()
    batch = {r.content_hash: r.predicted_label for r in rows}
    quarantined = read_table(spark, str(tmp_path / "predictions"), "quarantine").collect()
    assert sorted(r.reason for r in quarantined) == ["empty_text", "empty_text", "too_long", "undecodable"]
    again = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [  # nothing new: no rescoring,
        *store, "model_uri=models:/reviews-classifier@champion", f"input.path={text_corpus.csv}",  # null texts too
        "input.label_column=category", f"output.path={tmp_path / 'predictions'}"]))
    assert (again.counts.skipped, again.counts.hashed, again.scored, again.commit) == (1, 0, 0, None)

    mlflow.set_tracking_uri(store[0].split("=", 1)[1])
    model = mlflow.pyfunc.load_model("models:/reviews-classifier@champion")
    texts = list(text_corpus.good)
    served = model.predict(pd.DataFrame({"text": texts}))
    from deepspark.modality import content_hash

    assert list(served["predicted_label"]) == [batch[content_hash(t)] for t in texts]
    assert list(model.predict(["", "word " * 100])["reason"]) == ["empty_text", "too_long"]

    jsonl = tmp_path / "incoming reviews.jsonl"  # JSON Lines without labels, one line broken
    jsonl.write_text(json.dumps({"text": texts[0]}) + "\n{broken\n" + json.dumps({"text": texts[1]}) + "\n")
    lines = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *store, "model_uri=models:/reviews-classifier@champion", f"input.path={jsonl}",
        f"output.path={tmp_path / 'from-jsonl'}"]))
    assert (lines.counts.hashed, lines.scored, lines.quarantined, lines.accuracy) == (3, 2, 1, None)
    rerun = run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [  # the file is known by
        *store, "model_uri=models:/reviews-classifier@champion", f"input.path={jsonl}",  # its listed name
        f"output.path={tmp_path / 'from-jsonl'}"]))
    assert (rerun.counts.skipped, rerun.counts.hashed) == (1, 0)
    broken = read_table(spark, str(tmp_path / "from-jsonl"), "quarantine").collect()
    assert [(r.reason, r.path.rsplit("#", 1)[1]) for r in broken] == [("malformed_record", "1")]
