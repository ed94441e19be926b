"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package as a raw image folder:
`<out>/{train,test}/<class>/<id>.png`, exactly the shape of a user's raw data."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Real class names; "/" cannot be in a folder name, so T-shirt/top is stored as T-shirt_top.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
COMPLETE = "_COMPLETE"
# Feature transfer's demo: each side has tops, footwear and one more; the target's classes are new.
SOURCE_CLASSES = (0, 2, 5, 7, 8)  # T-shirt/top, Pullover, Sandal, Sneaker, Bag
TARGET_CLASSES = (1, 3, 4, 6, 9)  # Trouser, Dress, Coat, Shirt, Ankle boot


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) as a numpy array."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, source: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    missing = [str(source / f) for f in FILES[split] if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing: {missing}; install Debian's dataset-fashion-mnist")
    return read_idx(source / images_file), read_idx(source / labels_file)


def _write_once(out: Path, write: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """`write(tmp)` fills a sibling folder, which then replaces `out` by one rename, with its counts
    in a marker file: a rerun is a no-op, a half-written folder is never left in place."""
    out = Path(out)
    marker = out / COMPLETE
    if marker.is_file():
        return {k: int(v) for k, v in (line.split("=") for line in marker.read_text().split())}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = write(tmp)
    (tmp / COMPLETE).write_text("".join(f"{k}={v}\n" for k, v in counts.items()))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return counts


def _png(image: np.ndarray, what: str) -> bytes:
    import cv2

    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"cannot encode {what}")
    return png.tobytes()


def write_raw_folder(out: Path, source: Path = DEBIAN_DIR, limit: int | None = None) -> dict[str, int]:
    """Write the PNG folder once; a rerun is a no-op, a half-written folder is never left in place."""

    def write(tmp: Path) -> dict[str, int]:
        counts = {}
        for split in FILES:
            images, labels = load_split(split, source)
            n = len(images) if limit is None else min(limit, len(images))
            for name in CLASS_NAMES:
                (tmp / split / folder_name(name)).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (tmp / split / folder_name(CLASS_NAMES[labels[i]]) / f"{i:05d}.png").write_bytes(
                    _png(images[i], f"{split} image {i}"))
            counts[split] = n
        return counts

    return _write_once(out, write)


def write_transfer_folders(out: Path, source: Path = DEBIAN_DIR, source_per_class: int = 2000,
                           target_per_class: int = 50, test_per_class: int = 200) -> dict[str, int]:
    """Feature transfer's demo data: `<out>/source/{train,test}/<class>/` holds five Fashion-MNIST
    classes (T-shirts, pullovers, sandals, sneakers, bags), which the backbone learns;
    `<out>/target/{train,test}/<class>/` the other five (trousers, dresses, coats, shirts, ankle
    boots), never seen by the backbone, with `target_per_class` labelled train images each. The
    first images of each class in file order, so a rerun writes the same files; written once,
    never half."""
    quota = {("source", "train"): source_per_class, ("source", "test"): test_per_class,
             ("target", "train"): target_per_class, ("target", "test"): test_per_class}

    def write(tmp: Path) -> dict[str, int]:
        counts: dict[str, int] = {}
        for split in FILES:
            images, labels = load_split(split, source)
            for part, classes in (("source", SOURCE_CLASSES), ("target", TARGET_CLASSES)):
                for label in classes:
                    folder = tmp / part / split / folder_name(CLASS_NAMES[label])
                    folder.mkdir(parents=True, exist_ok=True)
                    chosen = np.flatnonzero(labels == label)[: quota[(part, split)]]
                    for i in chosen:
                        (folder / f"{i:05d}.png").write_bytes(_png(images[i], f"{split} image {i}"))
                    counts[f"{part}_{split}"] = counts.get(f"{part}_{split}", 0) + len(chosen)
        return counts

    return _write_once(out, write)
