"""KeepBest: early stopping on the ranks' shared validation metric, best weights restored (Keras only)."""

import numpy as np


def run(values, patience, restore_best, monitor="val_accuracy"):
    import tensorflow as tf

    from training.callbacks import KeepBest

    model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1, use_bias=False)])
    callback = KeepBest(monitor, patience, restore_best)
    callback.set_model(model)
    stopped_at = None
    for epoch, value in enumerate(values):
        model.set_weights([np.full((1, 1), float(epoch), np.float32)])  # weights name their epoch
        callback.on_epoch_end(epoch, {monitor: value})
        if model.stop_training:
            stopped_at = epoch
            break
    callback.on_train_end()
    return stopped_at, callback.best_epoch, float(model.get_weights()[0][0, 0])


def test_stops_after_patience_and_restores_the_best_epoch():
    assert run([0.5, 0.7, 0.6, 0.65, 0.9], patience=2, restore_best=True) == (3, 1, 1.0)


def test_restores_the_best_epoch_even_without_stopping_early():
    assert run([0.5, 0.8, 0.6], patience=None, restore_best=True) == (None, 1, 1.0)


def test_without_restore_the_last_weights_stay():
    assert run([0.5, 0.8, 0.6], patience=None, restore_best=False) == (None, 1, 2.0)


def test_loss_is_minimised():
    assert run([0.9, 0.4, 0.5, 0.6], patience=2, restore_best=True, monitor="val_loss") == (3, 1, 1.0)
