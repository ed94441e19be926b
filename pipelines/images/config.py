"""Config of the image ETL job (`conf/base/etl_images.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from deepspark.config import FrozenModel
from deepspark.spark import SparkSettings
from deepspark.tracking import TrackingSettings
from pipelines.images.layout import SPLITS
from pipelines.images.transforms import ImageRules


class InputSettings(FrozenModel):
    path: str = "data/raw/fashion-mnist"
    glob: str = "*.{png,PNG,jpg,JPG,jpeg,JPEG,bmp,BMP,gif,GIF,tif,TIF,tiff,TIFF,webp,WEBP}"
    labels_csv: str | None = None
    labels: list[str] | None = None  # fixed vocabulary; default: sorted label names found
    split_mode: Literal["auto", "folders", "hash"] = "auto"
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 17
    # With train/ and test/ folders but no val/, carve this share of train into a val split
    # (seeded hash of the path, so the same files every run). 0 keeps train whole.
    val_from_train: float = Field(0.0, ge=0.0, lt=1.0)

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

    def rules(self) -> ImageRules:
        return ImageRules(self.height, self.width, self.channels, self.resize_mode, self.max_pixels, self.min_side)


class OutputSettings(FrozenModel):
    root: str = "data/datasets"
    name: str = Field("fashion-mnist", pattern=r"^[A-Za-z0-9_.-]+$")
    row_group_size_mb: PositiveFloat = 4.0
    file_size_mb: PositiveInt = 128  # target uncompressed bytes per Parquet file
    stale_staging_hours: PositiveFloat = 24.0  # staging folders of killed runs older than this are deleted


class EtlImagesConfig(FrozenModel):
    spark: SparkSettings = SparkSettings(app_name="deepspark-etl-images")
    tracking: TrackingSettings = TrackingSettings()
    input: InputSettings = InputSettings()
    image: ImageSettings = ImageSettings()
    output: OutputSettings = OutputSettings()
    arrow_batch_rows: PositiveInt = 2048
    files_per_task: PositiveInt = 4096
