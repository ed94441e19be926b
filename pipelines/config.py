"""Config of the ETL job (`conf/base/etl.yaml`): one job for every modality, picked by `modality`.

Each modality has its own section (`image`, `text`, `audio`); only the chosen one is used, and
its rules are recorded in the dataset's manifest and later in the registered model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from deepspark.config import Charset, FrozenModel
from deepspark.layout import SPLITS
from deepspark.spark import SparkSettings
from deepspark.tracking import TrackingSettings

InputFormat = Literal["auto", "files", "csv", "jsonl"]


class InputSettings(FrozenModel):
    path: str = "data/raw/fashion-mnist"
    glob: str | None = None  # file names to read; default: the modality's (e.g. *.{png,jpg,...})
    # Text records: `csv`/`jsonl` read one record per row (a file or a folder of them); `files`
    # reads one document per file in class folders; `auto` decides from what input.path holds.
    format: InputFormat = "auto"
    text_column: str = "text"
    label_column: str = "label"
    split_column: str | None = None  # a column holding train/val/test; default: seeded hash split
    labels_csv: str | None = None
    labels: list[str] | None = None  # fixed vocabulary; default: sorted label names found
    split_mode: Literal["auto", "folders", "hash"] = "auto"
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 17
    # The hash split of files (no split folders) per class, so every class with enough files is in
    # every split in proportion; false: a plain hash of each path, which never moves a file when
    # others are added. Records (CSV/JSON Lines) are split by a hash of their text.
    stratify: bool = True
    # With train/ and test/ folders but no val/, carve this share of train into a val split
    # (seeded hash of the path, so the same files every run). 0 keeps train whole.
    val_from_train: float = Field(0.0, ge=0.0, lt=1.0)
    # The character set of CSV and JSON Lines records (Spark's reader option; `latin-1`, `cp1252`, ...).
    encoding: Charset = "UTF-8"

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(SPLITS)
        if unknown:
            raise ValueError(f"split names must be among {SPLITS}, got {sorted(unknown)}")
        if any(f < 0 for f in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {value}")
        return value


class ImageSettings(FrozenModel):
    height: PositiveInt = 28
    width: PositiveInt = 28
    channels: Literal[1, 3] = 1
    resize_mode: Literal["pad", "crop", "stretch"] = "pad"
    max_pixels: PositiveInt = 40_000_000
    min_side: PositiveInt = 8
    encoding: Literal["raw", "png"] = "raw"


class TextSettings(FrozenModel):
    sequence_length: PositiveInt = 64  # tokens kept per document (longer ones are truncated)
    max_chars: PositiveInt = 20_000  # longer documents are quarantined as too_long
    lowercase: bool = True
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    encoding: str = "utf-8"  # of .txt files (CSV/JSONL are read as UTF-8 by Spark)
    vocabulary_size: PositiveInt = 20_000  # most frequent train tokens kept
    min_count: PositiveInt = 1  # a token must occur this often in train to be kept


class AudioSettings(FrozenModel):
    sample_rate: PositiveInt = 16_000
    seconds: PositiveFloat = 1.0
    silence_db: float = -50.0  # whole clip's peak below this (dBFS): silent
    trim_db: float = -40.0  # leading/trailing audio below this is trimmed
    min_seconds: PositiveFloat = 0.1  # less sound than this after trimming: too_short
    max_seconds: PositiveFloat = 600.0  # longer sources are quarantined as too_long


class OutputSettings(FrozenModel):
    root: str = "data/datasets"
    name: str = Field("fashion-mnist", pattern=r"^[A-Za-z0-9_.-]+$")
    # Row groups are Petastorm's unit of sharding: each rank reads whole row groups. null = automatic:
    # 4 MB, or smaller for a small split, so that every split holds at least `min_row_groups`
    # (enough for the ranks of a cluster) and a user never has to pick this to train.
    row_group_size_mb: PositiveFloat | None = None
    min_row_groups: PositiveInt = 16
    file_size_mb: PositiveInt = 128  # at most this many MB of stored tensors per Parquet file
    stale_staging_hours: PositiveFloat = 24.0  # staging folders of killed runs older than this are deleted
    force_unlock: bool = False  # take over the dataset's lock left by a run known to be gone
    lock_ttl_s: PositiveFloat = 120.0  # a lock not heartbeated for this long belongs to a dead run
    # An input with no row to write is an error (a scheduled ETL over an empty or all-bad drop must
    # not hide the last good version behind an empty one); true publishes an empty version on purpose.
    allow_empty: bool = False


class EtlConfig(FrozenModel):
    spark: SparkSettings = SparkSettings(app_name="deepspark-etl")
    tracking: TrackingSettings = TrackingSettings()
    # image, text, audio, a modality an installed package registers (entry points in the group
    # deepspark.modalities) or a "package.module:ATTRIBUTE" reference to a deepspark.modality.Modality
    modality: str = "image"
    input: InputSettings = InputSettings()
    image: ImageSettings = ImageSettings()
    text: TextSettings = TextSettings()
    audio: AudioSettings = AudioSettings()
    modality_rules: dict[str, Any] = Field(default_factory=dict)  # the rules of a modality without a section above
    output: OutputSettings = OutputSettings()
    arrow_batch_rows: PositiveInt = 2048
    files_per_task: PositiveInt = 50_000

    @field_validator("modality")
    @classmethod
    def _registered(cls, value: str) -> str:
        from deepspark.modality import MODALITIES

        MODALITIES.reference(value, "modality")  # an unknown name fails here, listing the registered ones
        return value

    @model_validator(mode="after")
    def _records_are_text(self) -> "EtlConfig":
        if self.input.format in ("csv", "jsonl") and self.modality != "text":
            raise ValueError(f"input.format={self.input.format} reads text records; set modality=text "
                             f"(modality={self.modality} reads files)")
        return self

    def rules(self) -> Any:
        """The chosen modality's typed preprocessing rules."""
        from deepspark.modality import get_modality

        section = getattr(self, self.modality, None)
        given = section.model_dump() if isinstance(section, FrozenModel) else dict(self.modality_rules)
        return get_modality(self.modality).rules_from_dict(given)


class SourceDatasetSettings(FrozenModel):
    root: str = "data/datasets"
    name: str = "fashion-mnist"
    version: PositiveInt | None = None  # default: the latest complete version


class FeaturizeConfig(FrozenModel):
    """Feature transfer's first half (`pipelines/featurize.py`): a frozen backbone over a dataset
    version -> a `features` dataset version, which heads train on like any dataset."""

    spark: SparkSettings = SparkSettings(app_name="deepspark-featurize")
    tracking: TrackingSettings = TrackingSettings()
    source: SourceDatasetSettings = SourceDatasetSettings()
    # A registered model (models:/name@alias, models:/name/3) or a Keras model file (.keras, .h5)
    # on any storage pyarrow.fs reaches; it must take the source dataset's stored tensor.
    backbone: str = "models:/fashion-mnist-classifier@champion"
    layers: list[str] = Field(default_factory=list)  # each layer's pooled output; default: the one feeding the output
    pooling: Literal["avg", "max"] = "avg"  # over the spatial or time axes of a layer's output
    batch_size: PositiveInt = 256  # rows per forward pass
    intra_op_threads: PositiveInt = 1  # TensorFlow threads per Python worker (one worker per core)
    arrow_batch_rows: PositiveInt = 2048
    output: OutputSettings = OutputSettings(name="fashion-mnist-features")
