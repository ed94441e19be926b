"""Config of the model-selection job (`conf/base/select_models.yaml`): the training sections a
configuration starts from, the search (space, method, budget) and how it executes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError

from deepspark.config import ConfigError, FrozenModel
from deepspark.spark import SparkSettings
from training.config import TrainConfig, TrainingSections

# The training-config sections a search may vary (any key below them).
SEARCHABLE = ("model.", "optimizer.", "loader.", "horovod.")


class SearchSettings(FrozenModel):
    method: Literal["grid", "random", "halving"] = "random"
    num_models: PositiveInt = 8  # random and halving draw this many; grid takes every combination
    seed: int = 0
    space: dict[str, Any] = Field(default_factory=lambda: {"optimizer.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # what ranks configurations
    eta: Annotated[int, Field(ge=2)] = 2  # halving: the best 1/eta of a rung go on
    min_epochs: PositiveInt = 1  # halving: the first rung


class ExecutionSettings(FrozenModel):
    method: Literal["mop", "task", "horovod"] = "mop"
    workers: PositiveInt | None = None  # mop: partitions = hopper tasks; task: concurrent models (default: task slots)
    store_root: str = "data/selection"  # model state between sub-epochs (any URL pyarrow.fs reaches: file, hdfs, s3, gs)
    intra_op_threads: PositiveInt = 1  # per mop/task worker (one core each)
    # mop/task: train up to this many configurations of the same batch size as one graph per step
    # (one input pipeline, K towers: training/fused.py); they hop and are checkpointed together.
    fuse: PositiveInt = 1
    poll_s: PositiveFloat = 0.02  # how often the driver and hoppers look for finished units and assignments


class SelectConfig(TrainingSections):
    spark: SparkSettings = SparkSettings(app_name="deepspark-select-models")
    search: SearchSettings = SearchSettings()
    execution: ExecutionSettings = ExecutionSettings()
    epochs: PositiveInt = 4  # per configuration (halving: for those that reach the last rung)
    resume: str | None = None  # the search's MLflow parent run id to continue


def trial_config(cfg: SelectConfig, params: dict[str, Any], index: int) -> TrainConfig:
    """One configuration's training config: the search's training sections with `params` set at
    their dotted keys; a key outside the searchable sections, unknown, or a value the training
    config rejects raises naming `search.space.<key>`."""
    tree = cfg.model_dump(include={"data", "model", "loader", "optimizer", "horovod", "registry",
                                   "eval_batch_size", "max_eval_rows"})
    tree.update(epochs=cfg.epochs, seed=cfg.seed + index, tracking=cfg.tracking.model_dump())
    for key, value in params.items():
        if not key.startswith(SEARCHABLE):
            raise ConfigError(f"search.space.{key}: only keys under {', '.join(s.rstrip('.') for s in SEARCHABLE)} "
                              "can be searched")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"search.space.{key}: unknown key")
            node = node[part]
        if leaf not in node and parents != ["model", "params"]:  # a builder's parameters are its own
            raise ConfigError(f"search.space.{key}: unknown key")
        node[leaf] = value
    try:
        trial = TrainConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"search.space.{'.'.join(map(str, err['loc']))}: {err['msg']} "
                          f"(got {err.get('input')!r})") from None
    if trial.horovod.elastic:
        raise ConfigError("horovod.elastic: model selection does not train elastically (Spark retries its units)")
    return trial
