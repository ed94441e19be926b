"""Raw-folder layout -> split folder and label name (pure functions, no Spark).

Two layouts are understood:
- `<root>/<split>/<class>/<file>` with split in train/val/test (split from folders);
- `<root>/<class>/<file>` (split later by a seeded hash of the relative path).
A labels CSV (`path,label`, paths relative to the root) overrides folder names.
The driver uses these on its file listing (to fix the label vocabulary before any task)
and the executors use them per row, so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

SPLITS = ("train", "val", "test")


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
