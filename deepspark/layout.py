"""Raw-input layout -> split and label name (pure functions, no Spark), for every modality.

Two folder layouts are understood:
- `<root>/<split>/<class>/<file>` with split in train/val/test (split from folders);
- `<root>/<class>/<file>` (split later by a seeded hash of the relative path).
A labels CSV (`path,label`, paths relative to the root) overrides folder names.
The driver uses these on its file listing (to fix the label vocabulary before any task)
and the executors use them per row, so both always agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from deepspark.modality import NO_LABEL

SPLITS = ("train", "val", "test")
NO_SPLIT = "no_split"  # a record whose split column holds something else


def relative_path(path: str, root: str) -> str | None:
    """`path` below the qualified input root, or None if it is not below it."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


@dataclass(frozen=True)
class Layout:
    """How labels and splits are read off a relative path."""

    root: str
    split_from_folders: bool
    csv_labels: Mapping[str, str] | None = field(default=None, repr=False)

    def parse(self, path: str) -> tuple[str | None, str | None, str | None]:
        """(relative path, split folder or None, label name or None)."""
        rel = relative_path(path, self.root)
        if rel is None:
            return None, None, None
        parts = rel.split("/")
        split = label = None
        if self.split_from_folders:
            if len(parts) >= 2 and parts[0] in SPLITS:
                split = parts[0]
                label = parts[1] if len(parts) == 3 else None
        elif len(parts) >= 2:
            label = parts[0]
        if self.csv_labels is not None:
            label = self.csv_labels.get(rel)
        return rel, split, label

    def vocabulary(self, paths: Iterable[str]) -> list[str]:
        """Sorted label names found in the listing."""
        return sorted({label for _, _, label in map(self.parse, paths) if label is not None})


def assign_split(key: str, seed: int, fractions: Mapping[str, float]) -> str:
    """Deterministic split from a seeded hash of a stable key (a file's path relative to the
    input root, or a record's content hash): the same input lands in the same split on every
    run and every machine."""
    return _split_at(_point(key, seed), fractions)


def _point(key: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def _split_at(point: float, fractions: Mapping[str, float]) -> str:
    cumulative = 0.0
    names = list(fractions)
    for name in names:
        cumulative += fractions[name]
        if point < cumulative:
            return name
    return names[-1]


def stratified_splits(keyed: Iterable[tuple[str, str | None]], seed: int,
                      fractions: Mapping[str, float]) -> dict[str, str]:
    """Split of each key, class by class: a class's keys in the order of their seeded hash, the
    i-th of n at (i + 0.5) / n against the cumulative fractions, so every class with enough keys
    is in every split in proportion (a plain hash split left 7 of 10 classes out of a 150-file
    test split). Deterministic for the same inputs; a key is split once (the first label it comes
    with), so duplicates never straddle splits. Keys without a label take the hash split."""
    by_label: dict[str | None, list[str]] = {}
    seen: set[str] = set()
    for key, label in keyed:
        if key not in seen:
            seen.add(key)
            by_label.setdefault(label, []).append(key)
    out: dict[str, str] = {}
    for label, keys in by_label.items():
        if label is None:
            out.update({k: assign_split(k, seed, fractions) for k in keys})
            continue
        ranked = sorted(keys, key=lambda k: (_point(k, seed), k))
        out.update({k: _split_at((i + 0.5) / len(ranked), fractions) for i, k in enumerate(ranked)})
    return out


@dataclass(frozen=True)
class RowLabeller:
    """Split and label of one input, the same on the driver and on every executor.

    Files take both from the layout (folders or a labels CSV) and are split by their relative
    path; records take them from their columns and, without a split column, are split by a hash
    of their content, so duplicate texts never straddle train and test."""

    labels: tuple[str, ...]
    seed: int
    fractions: Mapping[str, float]
    val_from_train: float = 0.0
    layout: Layout | None = None  # None: records
    strata: Mapping[str, str] | None = None  # stratified split of each key (stratified_splits), else the hash

    def __call__(self, path: str, content_key: str, given_label: str | None, given_split: str | None
                 ) -> tuple[str | None, str | None, tuple[str, str] | None]:
        """(split, label name, failure) where failure is (reason, detail) or None."""
        if self.layout is not None:
            rel, split, label = self.layout.parse(path)
            key = rel or path
        else:
            split, label, key = given_split, given_label, content_key
            if split is not None and split not in SPLITS:
                return None, label, (NO_SPLIT, f"split {split!r} is not one of {'/'.join(SPLITS)}")
        if split is None and self.strata is not None and key in self.strata:
            split = self.strata[key]
        split = split or assign_split(key, self.seed, self.fractions)
        if split == "train" and self.val_from_train:
            split = assign_split(key, self.seed + 1, {"train": 1.0 - self.val_from_train, "val": self.val_from_train})
        if label is None:
            where = f"layout gives no label for {key!r}" if self.layout is not None else "record has no label"
            return split, None, (NO_LABEL, where)
        if label not in self.labels:
            return split, label, (NO_LABEL, f"label {label!r} not in the vocabulary")
        return split, label, None
