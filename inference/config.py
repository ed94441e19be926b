"""Config of the batch inference job (`conf/base/batch_inference.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from deepspark.config import Charset, FrozenModel
from deepspark.monitoring import Thresholds
from deepspark.spark import SparkSettings
from deepspark.tracking import TrackingSettings


class InputSettings(FrozenModel):
    """Exactly one of: raw inputs (a folder/URL of files, or CSV/JSONL text records), or a
    dataset version's split. The model's modality decides how raw inputs are read."""

    path: str | None = None
    glob: str | None = None  # default: the model's modality's (e.g. *.{wav,flac,...} for audio)
    format: Literal["auto", "files", "csv", "jsonl"] = "auto"  # text: records or one file per document
    text_column: str = "text"
    label_column: str = "label"  # optional: when present, accuracy is reported against it
    # The character set of CSV and JSON Lines records (Spark's reader option; `latin-1`, `cp1252`, ...).
    encoding: Charset = "UTF-8"
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
    retain_hours: NonNegativeFloat = 1.0  # replaced batches stay readable this long after the commit that dropped them


class MonitorSettings(FrozenModel):
    """Drift of each run's inputs and predictions against the reference stored with the model
    (`deepspark.monitoring`); thresholds per method."""

    enabled: bool = True
    window: Literal["run", "cumulative"] = "run"  # cumulative: every committed run of the version so far
    psi: PositiveFloat = 0.2  # binned statistics (input statistics, top-1 probability)
    jensen_shannon: PositiveFloat = 0.2  # predicted labels' shares
    mmd_p_value: PositiveFloat = 0.01  # embeddings: drift when MMD's permutation p-value is below
    min_rows: PositiveInt = 100  # fewer scored rows: not judged
    embedding_sample: PositiveInt = 256  # rows whose embeddings MMD compares (chosen by content hash)
    fail_on_drift: bool = False  # exit with code 3 (after committing) when a statistic drifted
    # Reference-against-run plots as run artifacts: for runs where something drifted (the table and
    # metrics hold every run's numbers; a plot costs about 0.3 s), for every run, or never.
    plots: Literal["on_drift", "always", "never"] = "on_drift"

    def thresholds(self) -> Thresholds:
        return Thresholds(self.psi, self.jensen_shannon, self.mmd_p_value, self.min_rows)


class BatchInferenceConfig(FrozenModel):
    spark: SparkSettings = SparkSettings(app_name="deepspark-batch-inference")
    tracking: TrackingSettings = TrackingSettings()
    model_uri: str = "models:/fashion-mnist-classifier@champion"
    # Several versions of one registered model scored in the same pass (e.g. [models:/m@champion,
    # models:/m@candidate]): each input is read and preprocessed once, each model loaded once per
    # worker, one prediction row per model version. Overrides model_uri when set.
    model_uris: list[str] = Field(default_factory=list)
    input: InputSettings = InputSettings(path="data/raw/fashion-mnist/test")
    output: OutputSettings = OutputSettings()
    monitor: MonitorSettings = MonitorSettings()
    batch_size: PositiveInt = 1024
    top_k: PositiveInt = 3
    arrow_batch_rows: PositiveInt = 4096
    files_per_task: PositiveInt = 4096
    intra_op_threads: PositiveInt = 1
    full_refresh: bool = False
    force_unlock: bool = False  # take over a lock left by a crashed run (the lock names its owner)
    compact: bool = False  # after scoring, rewrite this model version's many small batches as one
    lock_ttl_s: PositiveFloat = 120.0  # a lock not heartbeated for this long belongs to a dead run

    @property
    def uris(self) -> list[str]:
        return list(self.model_uris) or [self.model_uri]
