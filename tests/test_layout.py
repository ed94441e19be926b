"""Layout parsing: labels and split folders from relative paths (pure, no Spark)."""

from pipelines.layout import Layout, relative_path

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
