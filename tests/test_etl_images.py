"""Image ETL end to end on a real local[2] SparkSession, read back with real Petastorm readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from deepspark.modality import TensorSpec
from pipelines import etl
from pipelines.config import EtlConfig
from pipelines.images.modality import IMAGE
from tests.conftest import make_flat_folder

pytestmark = pytest.mark.spark
PROJECT = Path(__file__).resolve().parent.parent


def run(spark, overrides: list[str]) -> etl.EtlResult:
    return etl.run_etl(spark, load_config(EtlConfig, "etl", overrides))


def read_split(url: str, split: str) -> dict[str, tuple[np.ndarray, str, int]]:
    """Read one split with petastorm.make_reader: path -> (pixels, label name, label index)."""
    from petastorm import make_reader

    spec = TensorSpec.from_dict(json.loads(Path(url.replace("file:", "", 1), "manifest.json").read_text())["spec"])
    out = {}
    with make_reader(f"{url}/data/{split}", reader_pool_type="dummy", num_epochs=1) as reader:
        for row in reader:
            out[row.path] = (IMAGE.decode([row.image], spec)[0], row.label_name, int(row.label))
    return out


@pytest.fixture(scope="module")
def first_run(spark, raw_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("etl")
    overrides = [
        f"input.path={raw_folder.root}", f"output.root={out}", "output.name=zoo", "tracking.enabled=false",
        "files_per_task=16", "arrow_batch_rows=8", "image.max_pixels=1000000", "input.val_from_train=0",
    ]
    return overrides, run(spark, overrides)


def test_counts_reconcile(first_run, raw_folder):
    _, result = first_run
    inputs_in = len(raw_folder.good) + len(raw_folder.bad) + 4  # + cmyk, sixteen, rgba, gray that are fine
    assert result.inputs_in == inputs_in
    assert result.rows_written == len(raw_folder.good) + 4
    assert result.quarantined == len(raw_folder.bad)
    assert result.inputs_in == result.rows_written + result.quarantined


def test_every_bad_file_is_quarantined_with_its_reason(spark, first_run, raw_folder):
    _, result = first_run
    rows = spark.read.parquet(f"{result.url}/quarantine").collect()
    got = {r.path.split("/images/", 1)[1]: r.reason for r in rows}
    assert got == raw_folder.bad
    sizes = {r.path: r.size for r in rows}
    assert sizes == {r.path: Path(r.path.replace("file:", "", 1)).stat().st_size for r in rows}
    assert all(r.detail for r in rows)
    assert result.manifest["totals"]["quarantine_by_reason"] == {
        reason: list(raw_folder.bad.values()).count(reason) for reason in set(raw_folder.bad.values())
    }


def test_petastorm_reads_back_exact_pixels(first_run, raw_folder):
    _, result = first_run
    vocabulary = result.manifest["labels"]
    assert vocabulary == sorted(raw_folder.labels)
    for split in ("train", "test"):
        rows = read_split(result.url, split)
        for rel, pixels in raw_folder.good.items():
            if not rel.startswith(f"{split}/"):
                continue
            key = next(p for p in rows if p.endswith(rel))
            got, label_name, label = rows[key]
            assert np.array_equal(got, pixels), rel
            assert label_name == rel.split("/")[1] and vocabulary[label] == label_name


def test_manifest_and_config_written_beside_data(first_run):
    _, result = first_run
    root = Path(result.url.replace("file:", "", 1))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == result.version == 1
    assert manifest["counts"]["train"]["Coat"] == 14  # 10 good + the four odd-but-valid files
    assert manifest["counts"]["test"] == {"Ankle boot": 10, "Bag": 10, "Coat": 10}
    assert (root / "config.yaml").read_text().startswith("spark:")
    assert (root.parent / "_LATEST").read_text().strip() == "1"


def test_rerun_gives_identical_split_and_id_as_new_version(spark, first_run):
    overrides, result = first_run
    again = run(spark, overrides)
    assert again.version == result.version + 1
    assert again.manifest["dataset_id"] == result.manifest["dataset_id"]
    for split in ("train", "test"):
        assert set(read_split(again.url, split)) == set(read_split(result.url, split))


def test_dataset_id_changes_with_any_file_content(spark, tmp_path):
    """Two folders with the same paths, labels and splits, one file's pixels different: the ids
    differ (the id digests content, not only counts); the unchanged folder keeps its id."""
    from tests.conftest import encode, gray

    same = make_flat_folder(tmp_path / "same", 12)
    other = make_flat_folder(tmp_path / "other", 12)
    (other / "a" / "3.png").write_bytes(encode(gray(12345), "PNG"))

    def dataset_id(root: Path, out: str) -> str:
        return run(spark, [f"input.path={root}", f"output.root={tmp_path / out}", "output.name=flat",
                           "tracking.enabled=false"]).manifest["dataset_id"]

    first = dataset_id(same, "one")
    assert dataset_id(same, "two") == first
    assert dataset_id(other, "three") != first


def test_an_input_with_no_row_to_write_publishes_nothing_and_names_the_input(spark, tmp_path):
    """Five files, none an image: the run fails naming input.path and what became of its inputs,
    before anything is published; output.allow_empty=true publishes the empty version on purpose."""
    raw = tmp_path / "bad" / "a"
    raw.mkdir(parents=True)
    for i in range(5):
        (raw / f"{i}.png").write_bytes(b"not a picture at all" * 3)
    overrides = [f"input.path={raw.parent}", f"output.root={tmp_path / 'out'}", "output.name=bad",
                 "tracking.enabled=false"]
    with pytest.raises(ConfigError, match=r"input\.path: .*bad gave no row to write \(5 input\(s\); "
                                          r"quarantined: 5 not_an_image\); nothing was published"):
        run(spark, overrides)
    base = tmp_path / "out" / "bad"
    assert not list(base.glob("v=*")) and not (base / "_LATEST").exists() and not (base / "_LOCK").exists()
    assert not any((base / "_staging").iterdir())
    empty = run(spark, [*overrides, "output.allow_empty=true"])
    assert (empty.version, empty.rows_written, empty.quarantined) == (1, 0, 5)
    assert (base / "_LATEST").read_text().strip() == "1"


@pytest.mark.parametrize("stratify", ["true", "false"])
def test_the_split_follows_the_relative_path_wherever_the_folder_is(spark, tmp_path, stratify):
    """The same files in two places get the same split each: the key is the path relative to the
    input root, not where the root happens to be."""
    import shutil

    here = make_flat_folder(tmp_path / "here", 20)
    there = tmp_path / "moved" / "elsewhere"
    shutil.copytree(here, there)

    def splits(root: Path, out: str) -> dict[str, str]:
        result = run(spark, [f"input.path={root}", f"output.root={tmp_path / out}", "output.name=flat",
                             "tracking.enabled=false", f"input.stratify={stratify}",
                             "input.split_fractions={train: 0.5, val: 0.25, test: 0.25}"])
        return {p.split(str(root), 1)[1]: s for s in ("train", "val", "test") for p in read_split(result.url, s)}

    first = splits(here, "one")
    assert len(first) == 40 and len(set(first.values())) == 3
    assert splits(there, "two") == first


def test_hash_split_on_flat_layout(spark, tmp_path):
    root = make_flat_folder(tmp_path / "flat", 30)
    overrides = [f"input.path={root}", f"output.root={tmp_path / 'out'}", "output.name=flat",
                 "tracking.enabled=false", "input.split_fractions={train: 0.6, val: 0.2, test: 0.2}"]
    first = run(spark, overrides)
    second = run(spark, overrides)
    assert set(first.manifest["counts"]) == {"train", "val", "test"}
    assert first.manifest["counts"] == second.manifest["counts"]
    # Stratified (the default): each class in each split in proportion, 30 files -> 18 / 6 / 6.
    assert first.manifest["counts"] == {"train": {"a": 18, "b": 18}, "val": {"a": 6, "b": 6},
                                        "test": {"a": 6, "b": 6}}
    assert first.rows_written == 60 and first.quarantined == 0
    for split in ("train", "val", "test"):
        assert set(read_split(first.url, split)) == set(read_split(second.url, split))


def test_failed_write_leaves_previous_version_current(spark, raw_folder, tmp_path, monkeypatch):
    overrides = [f"input.path={raw_folder.root}", f"output.root={tmp_path}", "output.name=zoo",
                 "tracking.enabled=false", "image.max_pixels=1000000", "input.val_from_train=0"]
    good = run(spark, overrides)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full (simulated after the data was written)")

    monkeypatch.setattr(etl, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run(spark, overrides)
    base = tmp_path / "zoo"
    assert (base / "_LATEST").read_text().strip() == str(good.version)
    assert sorted(p.name for p in base.glob("v=*")) == [f"v={good.version}"]
    assert not any((base / "_staging").iterdir())  # the half-written version was removed
    assert len(read_split(good.url, "test")) == 30


def test_val_carved_from_train_when_folders_lack_val(spark, first_run, raw_folder, tmp_path):
    overrides, whole = first_run
    carved = run(spark, [o for o in overrides if not o.startswith(("output.root", "input.val_from_train"))]
                 + [f"output.root={tmp_path}", "input.val_from_train=0.3"])
    assert set(carved.manifest["counts"]) == {"train", "val", "test"}
    assert carved.manifest["counts"]["test"] == whole.manifest["counts"]["test"]
    train, val = read_split(carved.url, "train"), read_split(carved.url, "val")
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(read_split(whole.url, "train"))
    # Each train file goes to val by the documented rule: a hash of its relative path seeded with
    # input.seed + 1 against the fraction (a seeded coin per file, not a quota), so the carve holds
    # exactly these files.
    from deepspark.layout import assign_split

    seed = carved.manifest["config"]["input"]["seed"]
    expected = {p for p in set(train) | set(val)
                if assign_split(p.split("/images/", 1)[1], seed + 1, {"train": 0.7, "val": 0.3}) == "val"}
    assert set(val) == expected and 0 < len(val) < len(train) + len(val)


def test_row_group_size_is_configurable(spark, tmp_path):
    import pyarrow.parquet as pq

    root = make_flat_folder(tmp_path / "flat", 150)
    result = run(spark, [f"input.path={root}", f"output.root={tmp_path}", "tracking.enabled=false",
                         "input.split_fractions={train: 1.0}", "output.row_group_size_mb=0.05"])
    files = list(Path(result.url.replace("file:", "", 1), "data", "train").glob("*.parquet"))
    assert sum(pq.ParquetFile(f).metadata.num_row_groups for f in files) >= 3


def test_missing_input_is_a_config_error_naming_the_key(spark, tmp_path):
    with pytest.raises(ConfigError, match="input.path"):
        run(spark, [f"input.path={tmp_path / 'nope'}", f"output.root={tmp_path}", "tracking.enabled=false"])


def test_killed_job_leaves_the_previous_version_current(spark, raw_folder, tmp_path):
    """SIGKILL a real spark-submit ETL while it writes (its staged Parquet files exist, nothing is
    published yet): the previous version stays current and readable, the next run publishes."""
    import os
    import signal
    import subprocess
    import time

    from deepspark.localcluster import submit_command

    overrides = [f"input.path={raw_folder.root}", f"output.root={tmp_path}", "output.name=zoo",
                 "tracking.enabled=false", "image.max_pixels=1000000", "input.val_from_train=0"]
    first = run(spark, overrides)
    cmd, env = submit_command("local[2]", PROJECT / "jobs" / "etl_images.py", overrides)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = tmp_path / "zoo"
    deadline = time.monotonic() + 120
    while not list(base.glob("_staging/*/data/*/*.parquet")):
        assert proc.poll() is None, "the job ended before it was caught writing"
        assert time.monotonic() < deadline, "the job never started writing"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (base / "_LATEST").read_text().strip() == str(first.version)
    assert sorted(p.name for p in base.glob("v=*")) == [f"v={first.version}"]
    assert len(read_split(first.url, "test")) == 30
    leftover = [p for p in (base / "_staging").iterdir()]
    assert len(leftover) == 1  # the killed run's staging folder, never read
    old = time.time() - 2 * 3600
    os.utime(leftover[0], (old, old))
    after = run(spark, overrides + ["output.stale_staging_hours=1"])
    assert after.version == first.version + 1
    assert (base / "_LATEST").read_text().strip() == str(after.version)
    assert not any((base / "_staging").iterdir())  # stale staging removed, this run's own published


@pytest.mark.parametrize("lost", ["input row", "train row", "quarantine row"])
def test_a_dataset_that_does_not_reconcile_is_never_published(spark, raw_folder, tmp_path, monkeypatch, lost):
    """One row lost between the listing and processing, between processing and the written
    split, or between processing and the written quarantine: the count checks refuse to publish,
    and the staging folder is removed."""
    import dataclasses

    from pyspark.sql import functions as F

    open_inputs, write_splits, write_quarantine = etl.open_inputs, etl._write_splits, etl._write_quarantine

    def losing_inputs(*args, **kwargs):
        inputs = open_inputs(*args, **kwargs)
        return dataclasses.replace(inputs, frame=inputs.frame.exceptAll(inputs.frame.limit(1)))

    def lossy(spark_, fs, good, *args, **kwargs):
        dropped = good.where(F.col("split") == "train").limit(1)
        return write_splits(spark_, fs, good.join(dropped.select("path"), "path", "left_anti"), *args, **kwargs)

    def lossy_quarantine(rows, url, n_rows):
        return write_quarantine(rows.join(rows.limit(1).select("path"), "path", "left_anti"), url, n_rows)

    if lost == "input row":
        monkeypatch.setattr(etl, "open_inputs", losing_inputs)
    elif lost == "train row":
        monkeypatch.setattr(etl, "_write_splits", lossy)
    else:
        monkeypatch.setattr(etl, "_write_quarantine", lossy_quarantine)
    with pytest.raises(RuntimeError, match="does not reconcile"):
        run(spark, [f"input.path={raw_folder.root}", f"output.root={tmp_path}", "output.name=zoo",
                    "tracking.enabled=false", "image.max_pixels=1000000", "input.val_from_train=0"])
    base = tmp_path / "zoo"
    assert not list(base.glob("v=*")) and not (base / "_LATEST").exists() and not (base / "_LOCK").exists()
    assert not any((base / "_staging").iterdir())


def test_two_etl_processes_race_and_exactly_one_publishes(raw_folder, tmp_path):
    """Two real spark-submit ETL runs for the same dataset at once: one holds the lease and
    publishes v=1 (its manifest says 1); the other fails at once, naming the holder."""
    import subprocess

    from deepspark.localcluster import submit_command

    overrides = [f"input.path={raw_folder.root}", f"output.root={tmp_path}", "output.name=zoo",
                 "tracking.enabled=false", "image.max_pixels=1000000", "input.val_from_train=0"]
    cmd, env = submit_command("local[1]", PROJECT / "jobs" / "etl.py", overrides)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in procs]
    assert sorted(code == 0 for code, _ in outcomes) == [False, True], [o[-3000:] for _, o in outcomes]
    loser = next(out for code, out in outcomes if code != 0)
    assert "is locked by job" in loser and "ConcurrentRunError" in loser
    base = tmp_path / "zoo"
    assert sorted(p.name for p in base.glob("v=*")) == ["v=1"]
    assert json.loads((base / "v=1" / "manifest.json").read_text())["version"] == 1
    assert (base / "_LATEST").read_text().strip() == "1" and not (base / "_LOCK").exists()


def test_row_groups_are_sized_automatically_so_small_splits_can_be_sharded(spark, tmp_path):
    """No row_group_size_mb given: a 400-image split (313 KB) is cut into many row groups, not one
    4 MB group that only one rank could read; large splits keep 4 MB groups."""
    import pyarrow.parquet as pq

    root = make_flat_folder(tmp_path / "flat", 400)
    result = run(spark, [f"input.path={root}", f"output.root={tmp_path}", "tracking.enabled=false",
                         "input.split_fractions={train: 1.0}"])
    files = list(Path(result.url.replace("file:", "", 1), "data", "train").glob("*.parquet"))
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    assert 8 <= groups <= 24, groups  # about min_row_groups (16), paced by Parquet's 10-row size checks

    assert etl.row_group_bytes(400 * 784, None, 16) == 400 * 784 // 16
    assert etl.row_group_bytes(10**9, None, 16) == 4 * 1024 * 1024  # large splits: 4 MB
    assert etl.row_group_bytes(10**9, 0.5, 16) == 512 * 1024  # an explicit size wins
