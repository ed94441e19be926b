"""A dataset version's manifest, written (`build_manifest`, `write_manifest`: the ETL) and read
(`open_dataset`: training and inference) in this one place, so every stage reads exactly what the
ETL wrote: its URL, splits and counts, and its modality record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from deepspark.modality import LABEL_NAME, ModalityRecord, TensorSpec, unischema
from deepspark.storage import HadoopFS, VersionedLocation, join, to_url

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MANIFEST = "manifest.json"
DATA_DIR = "data"  # data/<split>/: one Petastorm dataset per split
QUARANTINE_DIR = "quarantine"
SPLIT = "split"


def build_manifest(name: str, version: int, record: ModalityRecord, stats: list[dict], inputs_in: int, source: str,
                   config: dict[str, Any], row_group_size_mb: float | None) -> dict:
    """The manifest of a new version from the ETL's statistics: rows per (split, label, reason)
    with an order-independent content digest (`n`, `h1`, `h2`). The `dataset_id` digests the
    content, labels, state and splits: the same input gives the same id."""
    good = sorted((r for r in stats if r["reason"] is None), key=lambda r: (r[SPLIT], r[LABEL_NAME]))
    counts: dict[str, dict[str, int]] = {}
    for r in good:
        counts.setdefault(r[SPLIT], {})[r[LABEL_NAME]] = int(r["n"])
    by_reason: dict[str, int] = {}
    for r in stats:
        if r["reason"] is not None:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + int(r["n"])
    digest_input = json.dumps(
        {"modality": record.modality, "spec": record.spec.to_dict(), "state": record.state, "labels": record.labels,
         "groups": [[r[SPLIT], r[LABEL_NAME], int(r["n"]), str(r["h1"]), str(r["h2"])] for r in good]},
        sort_keys=True,
    )
    return {
        "dataset": name,
        "version": version,
        "dataset_id": hashlib.sha256(digest_input.encode()).hexdigest()[:16],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        **record.to_dict(),
        "splits": {s: f"{DATA_DIR}/{s}" for s in sorted(counts)},
        "counts": counts,
        "totals": {
            "inputs_in": inputs_in,
            "rows_written": sum(int(r["n"]) for r in good),
            "quarantined": sum(by_reason.values()),
            "quarantine_by_reason": dict(sorted(by_reason.items())),
        },
        "schema": {"columns": record.spec.row_ddl(),
                   "petastorm_unischema": unischema(record.spec, record.modality)._name},
        "row_group_size_mb": row_group_size_mb,
        "quarantine": QUARANTINE_DIR,
        "config": config,
    }


def write_manifest(fs: HadoopFS, folder: str, manifest: dict) -> None:
    fs.write_text(join(folder, MANIFEST), json.dumps(manifest, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class DatasetRef:
    """One complete dataset version."""

    name: str
    version: int
    url: str
    manifest: dict = field(repr=False)

    @property
    def dataset_id(self) -> str:
        return str(self.manifest["dataset_id"])

    @property
    def record(self) -> ModalityRecord:
        """Modality, stored tensor, rules and fitted state. Manifests written before the modality
        seam describe images only (an `image` section); they still open."""
        if "modality" in self.manifest:
            return ModalityRecord.from_dict(self.manifest)
        image = self.manifest["image"]
        spec = TensorSpec("image", (int(image["height"]), int(image["width"]), int(image["channels"])), "uint8",
                          str(image.get("encoding", "raw")))
        rules = {**self.manifest.get("config", {}).get("image", {}), "encoding": spec.encoding}
        return ModalityRecord("image", spec, rules, {}, tuple(self.manifest["labels"]))

    @property
    def spec(self) -> TensorSpec:
        return self.record.spec

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    def split_url(self, split: str) -> str:
        """Petastorm-readable URL (file:///...) of one split; raises naming the split if absent."""
        if split not in self.manifest["splits"]:
            raise KeyError(f"dataset {self.name} v={self.version} has no {split!r} split "
                           f"(has {sorted(self.manifest['splits'])})")
        url = join(self.url, self.manifest["splits"][split])
        return "file:///" + url[len("file:"):].lstrip("/") if url.startswith("file:") else url

    def rows(self, split: str) -> int:
        return sum(self.manifest["counts"].get(split, {}).values())


def open_dataset(spark: "SparkSession", root: str, name: str, version: int | None = None) -> DatasetRef:
    """The given version, or the latest complete one."""
    fs = HadoopFS(spark)
    location = VersionedLocation(fs, fs.qualify(to_url(root)), name)
    chosen, url = location.resolve(version)
    manifest = json.loads(fs.read_text(join(url, MANIFEST)))
    return DatasetRef(name, chosen, url, manifest)
