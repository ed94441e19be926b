"""Shared fixtures: a real local[2] SparkSession and generated raw image folders."""

from __future__ import annotations

import io
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Each test's time limit by tier (pytest-timeout; setup of the module fixtures it is first to use
# counts too): generous, so only a hang trips it, and then with a stack dump instead of eating
# CI's 90 minutes. The first marker found wins; a test's own @pytest.mark.timeout wins over all.
TIER_TIMEOUTS_S = (("airflow", 1200), ("cluster", 1500), ("slow", 900), ("spark", 600), ("browser", 300))
UNIT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            seconds = next((s for tier, s in TIER_TIMEOUTS_S if item.get_closest_marker(tier)), UNIT_TIMEOUT_S)
            item.add_marker(pytest.mark.timeout(seconds))


@pytest.fixture(scope="session")
def spark():
    """One real local[2] SparkSession for the whole test run."""
    from deepspark.spark import SparkSettings, build_session

    session = build_session(
        SparkSettings(master="local[2]", app_name="deepspark-tests",
                      conf={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g",
                            "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    )
    yield session
    session.stop()


def encode(pixels: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    img = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gray(seed: int, h: int = 28, w: int = 28) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


@dataclass(frozen=True)
class RawFolder:
    root: Path
    good: dict[str, np.ndarray]  # relative path -> the exact pixels the dataset must hold (H, W, 1)
    bad: dict[str, str]  # relative path -> expected quarantine reason
    labels: tuple[str, ...]


# The bad-file zoo: relative path -> (bytes factory, expected reason). None = must land as a row.
def _zoo() -> dict[str, tuple[bytes, str | None]]:
    rgb = np.random.default_rng(7).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    png = encode(rgb, "PNG")
    jpg = encode(rgb, "JPEG", quality=95)
    wide = (np.random.default_rng(8).integers(0, 65536, size=(28, 28))).astype(np.uint16)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    return {
        "train/Coat/empty.png": (b"", "empty_file"),
        "train/Coat/truncated.png": (png[: len(png) // 2], "truncated"),
        "train/Coat/truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "train/Coat/notes.jpg": (b"this is a text file, not a picture\n" * 4, "not_an_image"),
        "train/Coat/tiny.png": (encode(np.zeros((1, 1), np.uint8), "PNG"), "too_small"),
        "train/Coat/huge.png": (encode(np.zeros((3000, 3000), np.uint8), "PNG"), "too_many_pixels"),
        "train/Coat/float.tif": (encode(np.zeros((20, 20), np.float32), "TIFF"), "unsupported_mode"),
        "train/Coat/cmyk.jpg": (encode(rgb, "JPEG", mode="CMYK"), None),
        "train/Coat/sixteen.png": (encode(wide, "PNG"), None),
        "train/Coat/rgba.png": (encode(rgba, "PNG"), None),
        "train/Coat/gray.jpg": (encode(rgb[:, :, 0], "JPEG"), None),
        "stray.png": (encode(gray(99), "PNG"), "no_label"),
    }


@pytest.fixture(scope="session")
def raw_folder(tmp_path_factory) -> RawFolder:
    """train/ and test/ folders of 28x28 grayscale PNGs in three classes (one with a space),
    plus the bad-file zoo; 10 good images per class and split."""
    root = tmp_path_factory.mktemp("raw") / "images"
    labels = ("Ankle boot", "Bag", "Coat")
    good: dict[str, np.ndarray] = {}
    seed = 0
    for split in ("train", "test"):
        for label in labels:
            for i in range(10):
                seed += 1
                rel = f"{split}/{label}/{i:03d}.png"
                pixels = gray(seed)
                good[rel] = pixels[:, :, None]
    bad: dict[str, str] = {}
    for rel, (data, reason) in _zoo().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if reason is not None:
            bad[rel] = reason
    for rel, pixels in good.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(pixels[:, :, 0], "PNG"))
    (root / "README.txt").write_text("not matched by the glob, so not an input\n")
    return RawFolder(root, good, bad, labels)


def make_flat_folder(root: Path, per_class: int, labels: tuple[str, ...] = ("a", "b")) -> Path:
    """<root>/<label>/<i>.png, 28x28 grayscale noise: a class-folder layout with no split folders."""
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / label / f"{i}.png").write_bytes(encode(gray(hash((label, i)) % 2**32), "PNG"))
    return root


@pytest.fixture()
def etl_overrides(tmp_path, raw_folder) -> list[str]:
    """Overrides that point the ETL at the generated folder and a fresh output root."""
    return [
        f"input.path={raw_folder.root}",
        f"output.root={tmp_path / 'datasets'}",
        "output.name=zoo",
        "tracking.enabled=false",
        "files_per_task=16",
        "arrow_batch_rows=8",
        "image.max_pixels=1000000",
    ]


@dataclass(frozen=True)
class SmallDataset:
    root: Path
    name: str
    train_rows: int


@pytest.fixture(scope="session")
def fashion_small(spark, tmp_path_factory) -> SmallDataset:
    """400 train + 400 test Fashion-MNIST images (Debian package) through the real ETL, with
    small row groups so 2 ranks get uneven shards."""
    from deepspark.config import load_config
    from pipelines.config import EtlConfig
    from pipelines.etl import run_etl
    from pipelines.images.demo_data import write_raw_folder

    base = tmp_path_factory.mktemp("fashion")
    write_raw_folder(base / "raw", limit=400)
    cfg = load_config(EtlConfig, "etl", [
        f"input.path={base / 'raw'}", f"output.root={base / 'datasets'}", "output.name=fashion-small",
        "tracking.enabled=false", "output.row_group_size_mb=0.05",
    ])
    result = run_etl(spark, cfg)
    return SmallDataset(base / "datasets", "fashion-small", result.manifest["totals"]["rows_written"])


@pytest.fixture()
def mlflow_store(tmp_path) -> list[str]:
    """Overrides for a fresh, real sqlite-backed MLflow store in this test's folder."""
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'artifacts'}"]


# ---- a real Spark standalone cluster and a real MLflow tracking server on 127.0.0.1 ----------

@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """Master + 2 workers (1 core, 1 fake GPU each: addresses 0 and 1) from the pinned pyspark;
    every process is stopped by PID at the end, also when a test fails."""
    from deepspark.localcluster import start_standalone

    cluster = start_standalone(tmp_path_factory.mktemp("cluster"), workers=2, fake_gpus=True)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth` (sqlite, artifact serving) on 127.0.0.1; jobs
    and executors authenticate through MLflow's standard variables, set here for the session."""
    from deepspark.localcluster import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- text: synthetic reviews with a learnable signal, in every input shape the ETL reads -------

POSITIVE = ("great", "superb", "moving", "witty", "fine")
NEGATIVE = ("dull", "awful", "tedious", "flat", "bad")
FILLER = ("the", "film", "plot", "cast", "story", "a", "is", "and")


def review(i: int, label: str) -> str:
    """A review whose sentiment words give its label away, plus a marker token unique to it."""
    rng = np.random.default_rng(i)
    words = list(rng.choice(POSITIVE if label == "fresh" else NEGATIVE, 2)) + list(rng.choice(FILLER, 5))
    rng.shuffle(words)
    return " ".join(words) + " " + marker(i)


def marker(i: int) -> str:
    """A token unique to review i, made of letters only (the tokeniser splits digits off)."""
    return "xq" + "".join("abcdefghij"[int(d)] for d in str(i))


@dataclass(frozen=True)
class TextCorpus:
    csv: Path  # text,category CSV: good rows plus the bad-record zoo
    good: dict[str, str]  # text -> label of every row that must be written
    bad: dict[str, str]  # a snippet of the row -> expected quarantine reason
    rows: int  # records in the CSV


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> TextCorpus:
    """120 labelled reviews in a CSV (one multi-line, quoted, with commas) plus bad records."""
    import csv

    root = tmp_path_factory.mktemp("text")
    good = {review(i, label): label for i, label in enumerate(["fresh", "rotten"] * 60)}
    good['"Great", she said,\nthen left: superb ' + marker(999)] = "fresh"
    bad = {"": "empty_text", "   ": "empty_text", "no label here m500": "no_label",
           "the plot is a plot m501": "no_label",  # category plot: not in the fixed vocabulary
           "word " * 100: "too_long"}
    labels = {"no label here m500": "", "the plot is a plot m501": "plot"}
    path = root / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category", "movie_name"])
        for text, label in good.items():
            writer.writerow([text, label, "Some Movie"])
        for text in bad:
            writer.writerow([text, labels.get(text, "fresh"), "Other"])
    with open(path, "ab") as fh:  # one record that is not UTF-8 (latin-1 bytes)
        fh.write("caf\xe9 cr\xe8me m502,rotten,X\n".encode("latin-1"))
    bad["caf"] = "undecodable"
    return TextCorpus(path, good, bad, len(good) + len(bad))


# ---- audio: a few spoken digits from espeak-ng plus the bad-file zoo ---------------------------

@dataclass(frozen=True)
class DigitsFolder:
    root: Path
    good: int  # files that must become rows
    bad: dict[str, str]  # relative path -> expected quarantine reason


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> DigitsFolder:
    """Three digits x 3 train voices (+ 1 unseen test voice) x 2 speeds x 2 pitches, then odd but
    valid files (24-bit, 8 kHz, stereo FLAC) and bad ones dropped into train/one/."""
    import soundfile as sf

    from pipelines.audio.demo_data import write_digits_folder

    root = tmp_path_factory.mktemp("audio") / "digits"
    counts = write_digits_folder(root, train_voices=("en-us+m1", "en+f3", "en-gb-x-rp+m8"),
                                 test_voices=("en-us-nyc+f2",), speeds=(140, 180), pitches=(40, 60),
                                 digits=("zero", "one", "two"))
    source = next((root / "train" / "one").iterdir())
    voice, rate = sf.read(source, dtype="float32")
    target = root / "train" / "one"
    sf.write(target / "as-24bit.wav", voice, rate, subtype="PCM_24")
    sf.write(target / "as-8khz.wav", voice[::int(rate // 8000)], 8000)
    sf.write(target / "as-stereo.flac", np.stack([voice, voice], 1), rate)
    whole = source.read_bytes()
    bad = {"train/one/empty.wav": b"", "train/one/truncated.wav": whole[: len(whole) // 3],
           "train/one/notes.wav": b"this is not audio\n" * 8, "train/one/song.mp3": b"ID3\x04" + bytes(200)}
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    sf.write(target / "silent.wav", np.zeros(16000, np.float32), 16000)
    short = np.zeros(16000, np.float32)
    short[8000:8160] = 0.5  # 10 ms of sound
    sf.write(target / "short.wav", short, 16000)
    reasons = {"train/one/empty.wav": "empty_file", "train/one/truncated.wav": "truncated",
               "train/one/notes.wav": "not_audio", "train/one/song.mp3": "unsupported_format",
               "train/one/silent.wav": "silent", "train/one/short.wav": "too_short"}
    return DigitsFolder(root, sum(counts.values()) + 3, reasons)


@pytest.fixture(scope="module")
def registry(spark, fashion_small, tmp_path_factory) -> list[str]:
    """A sqlite registry holding one briefly trained champion (trained by the real training job);
    returns the tracking overrides."""
    from deepspark.config import load_config
    from training.config import TrainConfig
    from training.job import run_job

    tmp = tmp_path_factory.mktemp("registry")
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_root={tmp / 'artifacts'}"]
    run_job(spark, load_config(TrainConfig, "train", [
        f"data.root={fashion_small.root}", f"data.name={fashion_small.name}", *store,
        "epochs=1", "steps_per_epoch=10", "optimizer.batch_size=16", "max_eval_rows=100",
    ]))
    return store


@pytest.fixture()
def raw_copy(fashion_small, tmp_path) -> Path:
    """The small Fashion-MNIST test folder plus three bad files, in a folder this test owns."""
    folder = tmp_path / "incoming"
    shutil.copytree(fashion_small.root.parent / "raw" / "test", folder)
    whole = next((folder / "Bag").iterdir()).read_bytes()
    (folder / "Bag" / "broken.png").write_bytes(whole[: len(whole) // 2])
    (folder / "Bag" / "empty-ish.jpg").write_bytes(b"not a jpeg at all")
    (folder / "Bag" / "zero.png").write_bytes(b"")
    return folder


# A user's own model builder (deepspark/builders.py's contract) with a custom Keras layer, in a
# package outside the project: tests/test_builders.py and tests/test_own_model.py.
BUILDER = '''
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="acme")
class Scale(tf.keras.layers.Layer):
    """A custom layer: only its registration lets a saved model load."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def build(record, width=8, factor=0.5):
    inputs = tf.keras.Input(shape=record.spec.shape, dtype=record.spec.dtype, name="image")
    x = Scale(factor)(tf.keras.layers.Flatten()(tf.keras.layers.Rescaling(1 / 255)(inputs)))
    x = tf.keras.layers.Dense(width, activation="relu")(x)
    outputs = tf.keras.layers.Dense(len(record.labels), activation="softmax", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs)


def wrong_input(record):
    inputs = tf.keras.Input(shape=(32, 32, 3), dtype="float32")
    return tf.keras.Model(inputs, tf.keras.layers.Dense(len(record.labels))(tf.keras.layers.Flatten()(inputs)))


def wrong_output(record):
    inputs = tf.keras.Input(shape=record.spec.shape, dtype="uint8")
    return tf.keras.Model(inputs, tf.keras.layers.Dense(7)(tf.keras.layers.Flatten()(inputs)))


def broken(record):
    raise RuntimeError("the user's own bug")


NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def user_package(tmp_path, monkeypatch) -> Path:
    """A package of the user's own, outside the project, importable as `acme_models`."""
    package = tmp_path / "src" / "acme_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(BUILDER))
    monkeypatch.syspath_prepend(str(package.parent))
    yield package
    sys.modules.pop("acme_models", None)
