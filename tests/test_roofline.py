"""The roofline's arithmetic (training/roofline.py) on a small Keras model, against values computed
by hand from its layers' shapes, and the compute- or memory-bound verdict on either side of the
ridge. No Spark."""

from __future__ import annotations

import pytest

from training.roofline import LayerCost, Machine, bound


def test_layer_costs_from_the_layers_shapes():
    import tensorflow as tf

    from training.roofline import layer_costs

    inputs = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, name="conv")(inputs)  # 6x6x4 out, 3x3x1 window
    x = tf.keras.layers.Flatten(name="flat")(x)
    outputs = tf.keras.layers.Dense(10, name="dense")(x)  # 144 -> 10
    costs = {c.name: c for c in layer_costs(tf.keras.Model(inputs, outputs))}
    assert costs["conv"].flops == 2 * 6 * 6 * 4 * 9
    assert costs["conv"].weight_bytes == 4 * (9 * 4 + 4)
    assert costs["conv"].activation_bytes == 4 * (64 + 144)
    assert costs["flat"].flops == 0
    assert costs["dense"].flops == 2 * 144 * 10 and costs["dense"].weight_bytes == 4 * (1440 + 10)


def test_the_verdict_follows_the_ridge_and_the_batch():
    machine = Machine(flops_per_s=100e9, bytes_per_s=10e9, threads=1)  # ridge: 10 FLOPs per byte
    assert machine.ridge == 10
    dense = LayerCost("dense", "Dense", flops=2e6, activation_bytes=8e3, weight_bytes=4e6)
    # batch 1: 2e6 FLOPs over 8e3 + 4e6 bytes (the weights every sample): memory-bound
    one = bound([dense], machine, batch=1, training=False)
    assert one.bound == "memory" and one.intensity == pytest.approx(2e6 / 4.008e6)
    assert one.attainable_flops_per_s == pytest.approx(one.intensity * 10e9)
    # batch 1024: the weights spread over the batch: 2e6 / (8e3 + 3906) ~ 168 FLOPs per byte
    big = bound([dense], machine, batch=1024, training=False)
    assert big.bound == "compute" and big.attainable_flops_per_s == 100e9
    assert big.samples_per_s == pytest.approx(100e9 / 2e6)
    training = bound([dense], machine, batch=1024, training=True)  # 3x the FLOPs, 3x activations + 2x weights
    assert training.flops == 6e6 and training.bytes == pytest.approx(3 * 8e3 + 2 * 4e6 / 1024)
