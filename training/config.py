"""Config of the training job (`conf/base/train.yaml`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from deepspark.config import FrozenModel
from deepspark.spark import SparkSettings
from deepspark.tracking import TrackingSettings


class DataSettings(FrozenModel):
    root: str = "data/datasets"
    name: str = "fashion-mnist"
    version: PositiveInt | None = None  # default: the latest complete version
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


class ModelSettings(FrozenModel):
    """Which model to build (deepspark/builders.py): a name from the dataset modality's catalogue,
    or any builder `build(record, **params) -> keras.Model` by reference, with its parameters."""

    name: str | None = None  # default: the dataset modality's default model (image: convnet, text: cnn, audio: cnn)
    builder: str | None = None  # "package.module:function", or a name registered as a deepspark.model_builders entry point
    params: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the builder, e.g. {filters: [32, 64]}
    # Start from existing weights: a registered model (models:/name@alias, models:/name/3), or a Keras
    # model (.keras, .h5) or weights (.weights.h5) file, local or on any storage pyarrow.fs reaches.
    init_from: str | None = None


class LoaderSettings(FrozenModel):
    """Petastorm reader and in-process shuffling (training/data.py)."""

    pool_type: Literal["thread", "dummy"] = "dummy"
    workers: PositiveInt = 1
    shuffle_buffer: PositiveInt = 10_000  # rows mixed across row groups
    queue_batches: PositiveInt = 8  # batches prepared ahead of the training step


class OptimizerSettings(FrozenModel):
    batch_size: PositiveInt = 64  # per rank; the global batch is batch_size * ranks
    learning_rate: PositiveFloat = 1e-3  # for one rank; scaled by the number of ranks
    warmup_epochs: NonNegativeInt = 1  # linear warm-up to learning_rate x ranks
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warm-up


class HorovodSettings(FrozenModel):
    num_proc: PositiveInt | None = None  # default: Spark's task slots
    intra_op_threads: PositiveInt = 1
    inter_op_threads: PositiveInt = 1
    start_timeout_s: PositiveInt = 120
    # A collective waits this long for a peer before the ranks fail (a dead host sends no reset)
    peer_timeout_s: PositiveInt = 60
    # Gloo's interfaces between ranks; unset: `lo` on a local master, else the driver's interface
    # for spark.driver.host. Checked on every rank's host before launch (training/distributed.py).
    nics: list[str] | None = None
    compression: Literal["none", "fp16"] = "none"  # gradients on the wire (fp16 halves allreduce bytes)
    # Local gradient aggregation: each rank sums this many batches' gradients before one allreduce
    # (1/N of the communication; the update then averages N x the global batch).
    backward_passes_per_step: PositiveInt = 1
    fusion_threshold_mb: NonNegativeInt | None = None  # HOROVOD_FUSION_THRESHOLD (Horovod: 128 MB; 0 = no fusion)
    cycle_time_ms: PositiveFloat | None = None  # HOROVOD_CYCLE_TIME: how often ready tensors are fused and sent
    autotune: bool = False  # HOROVOD_AUTOTUNE: Horovod searches fusion threshold and cycle time itself
    mixed_precision: bool = False
    xla: bool = False
    # Horovod's timeline on rank 0 (a file in the executor's temp folder, deleted when the rank ends):
    # each epoch's seconds of allreduce and negotiation in the run's time breakdown. Not elastic.
    # Off by default: it slowed 2 ranks on 2 cores by about a quarter (1,174 vs 1,498 samples/s).
    timeline: bool = False
    # Elastic training (horovod.spark.run_elastic, Gloo): a lost rank or host does not end the job;
    # the others restore the last committed state and go on, down to `min_num_proc` ranks, and a
    # rank Spark starts again joins in. The global batch and the learning-rate schedule stay as
    # planned for num_proc ranks (fewer ranks take larger per-rank batches).
    elastic: bool = False
    min_num_proc: PositiveInt = 1  # elastic: the fewest ranks training goes on with
    commit_batches: PositiveInt = 20  # elastic: state committed every N batches (and at each epoch end)
    reset_limit: PositiveInt | None = None  # elastic: the job fails after this many membership changes


def horovod_environment(settings: HorovodSettings) -> dict[str, str]:
    """The Horovod tuning knobs as the environment variables the ranks read at `hvd.init()`."""
    env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(settings.peer_timeout_s)}
    if settings.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(settings.fusion_threshold_mb * 1024 * 1024)
    if settings.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = str(settings.cycle_time_ms)
    if settings.autotune:
        env["HOROVOD_AUTOTUNE"] = "1"
    return env


class RegistrySettings(FrozenModel):
    enabled: bool = True
    model_name: str = "fashion-mnist-classifier"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    gate_metric: Literal["test_accuracy"] = "test_accuracy"  # higher is better
    gate_min_delta: float = 0.0  # champion moves when new >= champion + delta
    # Test-split rows the drift reference is captured from when a model is logged (stored with it,
    # read by batch inference's monitoring); 0: no reference, no monitoring of that model.
    drift_reference_rows: NonNegativeInt = 2000


class EarlyStoppingSettings(FrozenModel):
    """Keras' EarlyStopping, on the exact validation metrics all ranks share (so every rank stops
    at the same epoch). Without `patience` every epoch runs; the best epoch's weights are still
    the ones evaluated and registered when `restore_best` is on."""

    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: PositiveInt | None = None  # epochs without improvement before stopping; None: never stop early
    restore_best: bool = False  # evaluate and register the best epoch's weights, not the last


class TrainingSections(FrozenModel):
    """What a training run and a model search share: the data, the model and how it trains, the
    registry gate, evaluation and tracking."""

    tracking: TrackingSettings = TrackingSettings()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    loader: LoaderSettings = LoaderSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    horovod: HorovodSettings = HorovodSettings()
    registry: RegistrySettings = RegistrySettings()
    eval_batch_size: PositiveInt = 1024
    max_eval_rows: PositiveInt | None = None  # cap val/test rows (tests and smoke runs)
    seed: NonNegativeInt = 42  # numpy and Keras take seeds in [0, 2**32)
    run_name: str | None = None
    extra_tags: dict[str, str] = Field(default_factory=dict)


class FinetuneSettings(FrozenModel):
    """Fine-tuning a pretrained backbone (the model's one nested Keras model, e.g. a Keras
    Applications network) on a schedule: frozen for the first `freeze_epochs` (only the head
    learns), then unfrozen from `unfreeze_from` (a layer of the backbone; None: all of it) with its
    own learning rate. 0 epochs: no schedule, the model trains as its builder made it."""

    freeze_epochs: NonNegativeInt = 0
    unfreeze_from: str | None = None
    learning_rate: PositiveFloat | None = None  # per rank, like optimizer.learning_rate; default a tenth of it


class TrainConfig(TrainingSections):
    spark: SparkSettings = SparkSettings(app_name="deepspark-train")
    engine: str = "horovod"  # how ranks run (training/engines.py): horovod, single, or a registered/referenced engine
    early_stopping: EarlyStoppingSettings = EarlyStoppingSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    epochs: PositiveInt = 12
    steps_per_epoch: PositiveInt | None = None  # default: train rows // global batch
    resume: str | None = None  # an MLflow run id to continue
