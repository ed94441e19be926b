"""Config of the batch inference job (`conf/base/batch_inference.yaml`)."""

from __future__ import annotations

from pydantic import PositiveInt, model_validator

from deepspark.config import FrozenModel
from deepspark.spark import SparkSettings
from deepspark.tracking import TrackingSettings


class InputSettings(FrozenModel):
    """Exactly one of: a raw folder/URL of image files, or a dataset version's split."""

    path: str | None = None
    glob: str = "*.{png,PNG,jpg,JPG,jpeg,JPEG,bmp,BMP,gif,GIF,tif,TIF,tiff,TIFF,webp,WEBP}"
    dataset_root: str = "data/datasets"
    dataset: str | None = None
    dataset_version: PositiveInt | None = None
    split: str = "test"

    @model_validator(mode="after")
    def _one_source(self) -> "InputSettings":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of input.path (raw files) or input.dataset (a dataset version)")
        return self


class OutputSettings(FrozenModel):
    path: str = "data/predictions/fashion-mnist"
    quarantine_path: str | None = None  # default: <path>_quarantine


class BatchInferenceConfig(FrozenModel):
    spark: SparkSettings = SparkSettings(app_name="deepspark-batch-inference")
    tracking: TrackingSettings = TrackingSettings()
    model_uri: str = "models:/fashion-mnist-classifier@champion"
    input: InputSettings = InputSettings(path="data/raw/fashion-mnist/test")
    output: OutputSettings = OutputSettings()
    batch_size: PositiveInt = 1024
    top_k: PositiveInt = 3
    arrow_batch_rows: PositiveInt = 4096
    files_per_task: PositiveInt = 4096
    intra_op_threads: PositiveInt = 1
    full_refresh: bool = False
    force_unlock: bool = False  # take over a lock left by a crashed run (the lock names its owner)
