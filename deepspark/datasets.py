"""Open a published dataset version by name: its URL, manifest and modality record.

Training and inference both start here, so they read exactly what the ETL wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deepspark.modality import ModalityRecord, TensorSpec
from deepspark.storage import HadoopFS, VersionedLocation, join, to_url

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MANIFEST = "manifest.json"


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
