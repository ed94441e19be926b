"""Layout parsing: labels and split folders from relative paths (pure, no Spark)."""

from deepspark import layout
from deepspark.layout import Layout, relative_path

ROOT = "file:/data/raw"


def test_split_folders_layout():
    lay = Layout(ROOT, split_from_folders=True)
    assert lay.parse(f"{ROOT}/train/Ankle boot/1.png") == ("train/Ankle boot/1.png", "train", "Ankle boot")
    assert lay.parse(f"{ROOT}/test/Bag/2.png")[1:] == ("test", "Bag")
    assert lay.parse(f"{ROOT}/train/loose.png")[1:] == ("train", None)  # no class folder
    assert lay.parse(f"{ROOT}/other/Bag/3.png")[1:] == (None, None)


def test_class_folders_layout():
    lay = Layout(ROOT, split_from_folders=False)
    assert lay.parse(f"{ROOT}/Bag/x.jpg")[1:] == (None, "Bag")
    assert lay.parse(f"{ROOT}/x.jpg")[1:] == (None, None)


def test_csv_labels_override_folders():
    lay = Layout(ROOT, split_from_folders=False, csv_labels={"Bag/x.jpg": "Purse"})
    assert lay.parse(f"{ROOT}/Bag/x.jpg")[2] == "Purse"
    assert lay.parse(f"{ROOT}/Bag/y.jpg")[2] is None  # not in the CSV: no label


def test_vocabulary_is_sorted_and_unique():
    lay = Layout(ROOT, split_from_folders=True)
    paths = [f"{ROOT}/train/b/1.png", f"{ROOT}/train/a/1.png", f"{ROOT}/test/b/2.png", f"{ROOT}/x.png"]
    assert lay.vocabulary(paths) == ["a", "b"]


def test_relative_path_requires_the_root():
    assert relative_path("file:/data/raw/a/b.png", "file:/data/raw/") == "a/b.png"
    assert relative_path("file:/data/rawer/a.png", "file:/data/raw") is None


def test_stratified_splits_put_every_class_in_every_split_in_proportion():
    from collections import Counter

    keyed = [(f"c{c}/{i}.wav", f"c{c}") for c in range(10) for i in range(15)]
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    splits = layout.stratified_splits(keyed, 17, fractions)
    per_class = Counter((label, splits[key]) for key, label in keyed)
    assert all(per_class[(f"c{c}", s)] == n for c in range(10) for s, n in (("train", 9), ("val", 3), ("test", 3)))
    assert layout.stratified_splits(list(reversed(keyed)), 17, fractions) == splits  # the order of the listing is moot
    assert layout.stratified_splits(keyed, 18, fractions) != splits  # the seed decides which files
    plain = Counter(label for key, label in keyed if layout.assign_split(key, 17, fractions) == "test")
    assert len(plain) < 10 or min(plain.values()) != 3  # a plain hash does not deal classes evenly


def test_stratified_splits_keep_duplicates_together_and_hash_the_unlabelled():
    keyed = [("same", "a"), ("same", "b"), ("x", None)] + [(f"k{i}", "a") for i in range(9)]
    splits = layout.stratified_splits(keyed, 5, {"train": 0.5, "test": 0.5})
    assert set(splits) == {"same", "x"} | {f"k{i}" for i in range(9)}  # one split per key
    assert splits["x"] == layout.assign_split("x", 5, {"train": 0.5, "test": 0.5})
    assert sum(splits[k] == "train" for k in {k for k, label in keyed if label == "a"}) == 5  # 10 keys of a: 5 / 5
