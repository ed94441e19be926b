"""Model batching: K models fused into one graph per step train exactly as each would alone."""

from __future__ import annotations

import numpy as np
import pytest

from training.selection.execution import fuse_groups


def tiny_model(seed: int, learning_rate: float):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((6,))
    hidden = tf.keras.layers.Dense(8, activation="relu")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    return model


def test_fused_members_match_training_alone_on_the_same_batches():
    from training.fused import FusedModels

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 3, 96).astype("int32")
    rates = (0.01, 0.001, 0.05)
    fused = FusedModels([tiny_model(s, r) for s, r in zip((1, 2, 3), rates)])
    metrics, samples = fused.fit_rows(x, y, 16, seed=5)
    fused.fit_rows(x, y, 16, seed=6)
    assert samples == 96 and len(metrics) == 3
    for member, seed, rate in zip(fused.models, (1, 2, 3), rates):
        alone = FusedModels([tiny_model(seed, rate)])
        alone.fit_rows(x, y, 16, seed=5)
        alone.fit_rows(x, y, 16, seed=6)
        for got, want in zip(member.get_weights(), alone.models[0].get_weights()):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    untrained = tiny_model(1, rates[0]).get_weights()
    assert not np.allclose(fused.models[0].get_weights()[0], untrained[0])  # it did train


def test_fuse_groups_share_a_batch_size_and_keep_trial_order():
    from types import SimpleNamespace

    def trial(batch: int):  # type: ignore[no-untyped-def]
        return SimpleNamespace(cfg=SimpleNamespace(optimizer=SimpleNamespace(batch_size=batch)))

    trials = {i: trial(b) for i, b in enumerate([64, 32, 64, 64, 32, 64, 64])}
    assert fuse_groups(trials, list(trials), 4) == ((0, 2, 3, 5), (1, 4), (6,))
    assert fuse_groups(trials, [0, 3, 4], 2) == ((0, 3), (4,))
    assert fuse_groups(trials, list(trials), 1) == tuple((i,) for i in range(7))


@pytest.mark.parametrize("k", [1, 4])
def test_fused_metrics_are_per_member(k):
    from training.fused import FusedModels

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64).astype("int32")
    fused = FusedModels([tiny_model(s, 0.01) for s in range(k)])
    metrics, _ = fused.fit_rows(x, y, 32, seed=0)
    assert [set(m) for m in metrics] == [{"loss", "accuracy"}] * k
    assert len({round(m["loss"], 6) for m in metrics}) == k  # each member's own loss, not one shared value


def test_state_bytes_round_trip_weights_and_optimizer():
    from training.fused import FusedModels
    from training.trainer import load_state, pack_checkpoint, state_bytes

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64).astype("int32")
    trained = tiny_model(1, 0.01)
    FusedModels([trained]).fit_rows(x, y, 16, seed=0)
    for data in (state_bytes(trained), pack_checkpoint(trained, trained.optimizer)):
        fresh = tiny_model(9, 0.01)
        load_state(data, fresh)
        for got, want in zip(fresh.get_weights(), trained.get_weights()):
            np.testing.assert_array_equal(got, want)
        assert int(fresh.optimizer.iterations.numpy()) == 4  # Adam's step counter came along
        for got, want in zip(fresh.optimizer.variables, trained.optimizer.variables):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
