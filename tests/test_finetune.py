"""Fine-tuning a pretrained backbone on a schedule (`finetune.*`): the phases as a pure function,
the driver's checks, and 2 real Horovod ranks training MobileNetV2 frozen for one epoch, then
unfrozen from a named layer: read back from the run's per-epoch checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from training.config import TrainConfig
from training.trainer import finetune_phases

BACKBONE = ["model.builder=pipelines.images.backbones:mobilenet_v2", "model.params={input_size: 32, alpha: 0.35}"]


@pytest.mark.parametrize("freeze, start, stop, phases", [
    (0, 0, 3, [(0, 3, None)]),  # no schedule
    (2, 0, 5, [(0, 2, True), (2, 5, False)]),
    (2, 1, 5, [(1, 2, True), (2, 5, False)]),  # resumed inside the frozen phase
    (2, 3, 5, [(3, 5, False)]),  # resumed after it
    (2, 0, 1, [(0, 1, True)]),  # a model search's rung that stops early
    (2, 5, 5, []),
])
def test_phases_follow_the_schedule(freeze, start, stop, phases):
    assert finetune_phases(freeze, start, stop) == phases


def config(dataset, store: list[str], *extra: str) -> TrainConfig:
    return load_config(TrainConfig, "train", [
        f"data.root={dataset.root}", f"data.name={dataset.name}", *store, "epochs=2", "steps_per_epoch=2",
        "optimizer.batch_size=16", "max_eval_rows=64", "horovod.num_proc=2", *extra])


@pytest.mark.spark
@pytest.mark.parametrize("extra, words", [
    (["finetune.freeze_epochs=2"], "finetune.freeze_epochs=2 leaves no epoch to fine-tune in epochs=2"),
    (["finetune.freeze_epochs=1", "finetune.unfreeze_from=block_99"],
     "finetune.unfreeze_from: the backbone mobilenetv2_0.35_32 has no layer 'block_99'"),
])
def test_a_bad_schedule_fails_before_launch(spark, fashion_small, extra, words):
    from training.job import plan

    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        plan(spark, config(fashion_small, ["tracking.enabled=false"], *BACKBONE, *extra))
    with pytest.raises(ConfigError, match="finetune.freeze_epochs: a fine-tuning schedule needs a model with one "
                                          "nested backbone model"):
        plan(spark, config(fashion_small, ["tracking.enabled=false"], "model.name=convnet", "finetune.freeze_epochs=1"))


@pytest.mark.spark
@pytest.mark.slow
def test_the_backbone_is_frozen_then_unfrozen_from_the_named_layer(spark, fashion_small, mlflow_store, tmp_path):
    """Epoch 0's checkpoint: every backbone tensor exactly as it started (frozen), the head moved.
    Epoch 1's: the layers from `unfreeze_from` moved, those before it did not; batch
    normalisation's moving statistics never moved (inference mode)."""
    import tensorflow as tf
    from mlflow.tracking import MlflowClient

    from deepspark import builders
    from deepspark.datasets import open_dataset
    from training.job import run_job
    from training.trainer import backbone_of, restore_checkpoint

    record = open_dataset(spark, str(fashion_small.root), fashion_small.name).record
    params = {"input_size": 32, "alpha": 0.35}
    start = builders.build("pipelines.images.backbones:mobilenet_v2", record, params)
    start.save(tmp_path / "start.keras")  # known starting weights, through model.init_from
    result = run_job(spark, config(fashion_small, mlflow_store, *BACKBONE, f"model.init_from={tmp_path / 'start.keras'}",
                                   "finetune.freeze_epochs=1", "finetune.unfreeze_from=block_16_project",
                                   "finetune.learning_rate=0.01", "registry.enabled=false"))
    client = MlflowClient(mlflow_store[0].split("=", 1)[1])

    def at(epoch: int) -> tf.keras.Model:
        model = builders.build("pipelines.images.backbones:mobilenet_v2", record, params)
        path = client.download_artifacts(result.run_id, f"checkpoints/epoch-{epoch:04d}.tar", str(tmp_path))
        restore_checkpoint(open(path, "rb").read(), model, None)
        return model

    def moved(a: tf.keras.Model, b: tf.keras.Model) -> set[str]:
        return {la.name for la, lb in zip(backbone_of(a).layers, backbone_of(b).layers)
                if any(not np.array_equal(x, y) for x, y in zip(la.get_weights(), lb.get_weights()))}

    frozen, tuned = at(0), at(1)
    assert moved(start, frozen) == set()
    assert not np.array_equal(start.get_layer("probabilities").get_weights()[0],
                              frozen.get_layer("probabilities").get_weights()[0])
    assert moved(frozen, tuned) == {"block_16_project", "block_16_project_BN", "Conv_1", "Conv_1_bn"}
    for layer_start, layer_tuned in zip(backbone_of(start).layers, backbone_of(tuned).layers):
        if isinstance(layer_start, tf.keras.layers.BatchNormalization):  # moving mean and variance
            assert all(np.array_equal(x, y) for x, y in zip(layer_start.get_weights()[2:], layer_tuned.get_weights()[2:]))
