"""Raw-folder layout -> relative path, split folder and label name, as DataFrame transforms.

Two layouts are understood:
- `<root>/<split>/<class>/<file>` with split in train/val/test (split from folders);
- `<root>/<class>/<file>` (split by a seeded hash of the relative path).
A labels CSV (`path,label`, paths relative to the root) overrides folder names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

SPLITS = ("train", "val", "test")
RELPATH = "relpath"
SPLIT_FOLDER = "split_folder"
LABEL_NAME = "label_name"


def relative_path(path: "Column", root: str) -> "Column":
    """`path` minus the qualified input root and its slash."""
    from pyspark.sql import functions as F

    prefix = root.rstrip("/") + "/"
    return F.when(path.startswith(prefix), path.substr(len(prefix) + 1, 1 << 30)).otherwise(F.lit(None))


def with_layout(files: "DataFrame", root: str, split_from_folders: bool) -> "DataFrame":
    """Add relpath, split_folder (or null) and label_name (or null when the layout gives none)."""
    from pyspark.sql import functions as F

    parts = F.split(F.col(RELPATH), "/")
    files = files.withColumn(RELPATH, relative_path(F.col("path"), root))
    if split_from_folders:
        good = (F.size(parts) == 3) & parts.getItem(0).isin(*SPLITS)
        return files.withColumn(SPLIT_FOLDER, F.when(good, parts.getItem(0))).withColumn(
            LABEL_NAME, F.when(good, parts.getItem(1))
        )
    return files.withColumn(SPLIT_FOLDER, F.lit(None).cast("string")).withColumn(
        LABEL_NAME, F.when(F.size(parts) >= 2, parts.getItem(0))
    )


def with_csv_labels(files: "DataFrame", labels: "DataFrame") -> "DataFrame":
    """Replace folder-derived labels with those of a `path,label` CSV (paths relative to the root)."""
    from pyspark.sql import functions as F

    csv = labels.select(F.col("path").alias("_csv_path"), F.col("label").alias("_csv_label"))
    joined = files.join(csv, files[RELPATH] == csv["_csv_path"], "left")
    return joined.withColumn(LABEL_NAME, F.col("_csv_label")).drop("_csv_path", "_csv_label")
