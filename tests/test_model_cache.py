"""A worker's model cache: configurations that differ only in learning rate and seed share one
built and traced model, and each still trains exactly as it would in a model of its own."""

from __future__ import annotations

import io

import numpy as np

from deepspark.modality import ModalityRecord, TensorSpec
from training.config import TrainConfig
from training.selection.store import Store, unit_name
from training.selection.workers import ModelCache, Trial, graph_key, train_unit

RECORD = ModalityRecord("image", TensorSpec("image", (8, 8, 1), "uint8"), {}, {}, tuple("abc"))


def trial(index: int, learning_rate: float, batch_size: int = 16) -> Trial:
    # resnet_small: no dropout, so two runs of the same updates give the same weights
    cfg = TrainConfig.model_validate({"model": {"name": "resnet_small"}, "seed": 10 + index, "epochs": 2,
                                      "optimizer": {"learning_rate": learning_rate, "batch_size": batch_size,
                                                    "warmup_epochs": 0}})
    return Trial(index, cfg, "pipelines.images.models:resnet_small", 4)


def published(store: Store, t: int, unit: int) -> list[np.ndarray]:
    """Weights and optimizer variables a unit published (what the next unit of the trial loads)."""
    with np.load(io.BytesIO(store.read(unit_name(t, unit, "ckpt")))) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def test_graph_key_ignores_only_learning_rate_and_seed():
    assert graph_key(trial(0, 0.01)) == graph_key(trial(1, 0.001))
    assert graph_key(trial(0, 0.01)) != graph_key(trial(2, 0.01, batch_size=32))


def test_shared_model_trains_each_configuration_as_its_own_model(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 64).astype(np.int32)
    trials = (trial(0, 0.01), trial(1, 0.001))
    units = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (trial, unit): they take turns in the one shared model

    def run(caches: dict[int, ModelCache], store: Store) -> dict[int, list[np.ndarray]]:
        for t, unit in units:
            train_unit(caches[t], store, [t], unit, unit, 0, (x, y), None, False, None)  # type: ignore[arg-type]
        return {t: published(store, t, 1) for t in (0, 1)}

    shared = ModelCache(trials, RECORD)
    together = run({0: shared, 1: shared}, Store(str(tmp_path / "shared")))
    assert [len(slots) for slots in shared.slots.values()] == [1]  # one model built and traced for both
    alone = run({t: ModelCache(trials, RECORD) for t in (0, 1)}, Store(str(tmp_path / "alone")))
    for t in (0, 1):
        for got, want in zip(together[t], alone[t]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(together[0][0], together[1][0])  # different seeds and rates: different models
