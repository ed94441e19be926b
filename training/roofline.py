"""The model's roofline: floating-point operations and bytes moved per sample, layer by layer,
against the machine's peak compute and memory bandwidth, which decide whether training and
inference are compute- or memory-bound (Williams, Waterman and Patterson's roofline model).

Per layer and sample, in float32 (4 bytes per value):
- forward FLOPs: 2 x multiply-adds for dense, convolution and recurrent layers, one per output
  value elsewhere (activations, pooling, normalisation);
- forward bytes: the layer's input and output activations, and its weights once per batch;
- training is about three times the forward pass (forward, gradient of the input, gradient of the
  weights) in FLOPs and in bytes, plus writing the weights' gradients once per batch.
An estimate from the layers' shapes (no profiler): it tells which roof a model is under, not its
exact speed. `layer_costs` needs TensorFlow's model objects; the arithmetic below it is pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

BYTES = 4


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    flops: float  # per sample, forward
    activation_bytes: float  # per sample: input and output values
    weight_bytes: float  # per batch

    def intensity(self, batch: int, training: bool = False) -> float:
        """FLOPs per byte moved at a batch size."""
        flops, moved = self.per_sample(batch, training)
        return flops / moved if moved else float("inf")

    def per_sample(self, batch: int, training: bool = False) -> tuple[float, float]:
        """(FLOPs, bytes) per sample."""
        if training:
            return 3 * self.flops, 3 * self.activation_bytes + 2 * self.weight_bytes / batch
        return self.flops, self.activation_bytes + self.weight_bytes / batch


def _elements(shape: Any) -> int:
    dims = [d for d in (shape[1:] if shape is not None else []) if d is not None]
    return int(np.prod(dims)) if dims else 0


def layer_costs(model: Any) -> list[LayerCost]:
    """Each layer's cost per sample (nested models counted through their own layers)."""
    import tensorflow as tf

    out: list[LayerCost] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            out += layer_costs(layer)
            continue
        try:
            inputs = layer.input_shape
            outputs = layer.output_shape
        except (AttributeError, RuntimeError):
            continue
        inputs = inputs if isinstance(inputs, list) else [inputs]
        outputs = outputs if isinstance(outputs, list) else [outputs]
        n_in = sum(_elements(s) for s in inputs)
        n_out = sum(_elements(s) for s in outputs)
        weights = sum(int(np.prod(w.shape)) for w in layer.weights)
        kind = type(layer).__name__
        if isinstance(layer, tf.keras.layers.Dense):
            flops = 2.0 * n_out * int(inputs[0][-1])
        elif isinstance(layer, (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)):
            kernel = layer.kernel.shape  # (*window, in channels, out channels)
            flops = 2.0 * n_out * int(np.prod(kernel[:-1]))
        elif isinstance(layer, tf.keras.layers.DepthwiseConv2D):
            flops = 2.0 * n_out * int(np.prod(layer.depthwise_kernel.shape[:2]))
        elif isinstance(layer, (tf.keras.layers.LSTM, tf.keras.layers.GRU, tf.keras.layers.SimpleRNN,
                                tf.keras.layers.Bidirectional)):
            steps = int(inputs[0][1] or 1)
            flops = 2.0 * weights * steps  # every weight in a multiply-add at every time step
        elif isinstance(layer, (tf.keras.layers.InputLayer, tf.keras.layers.Embedding, tf.keras.layers.Reshape,
                                tf.keras.layers.Flatten, tf.keras.layers.Dropout)):
            flops = 0.0  # lookups and views: bytes only
        else:
            flops = float(n_out)
        out.append(LayerCost(layer.name, kind, flops, BYTES * (n_in + n_out), BYTES * weights))
    return out


@dataclass(frozen=True)
class Machine:
    """What one rank's core(s) can do: peak FLOP/s of a large float32 matrix product and bytes/s
    of a large copy, each the best of a few runs."""

    flops_per_s: float
    bytes_per_s: float
    threads: int

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOPs per byte) where the two roofs meet."""
        return self.flops_per_s / self.bytes_per_s


def measure_machine(threads: int = 1, size: int = 1024, copy_mb: int = 256, repeats: int = 3) -> Machine:
    """Peak compute by TensorFlow's matrix product with `threads` intra-op threads (as a rank
    runs), memory bandwidth by a numpy copy (read and write) far larger than the caches."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already initialised in this process: measured as it runs
        pass
    a = tf.random.normal((size, size))
    tf.linalg.matmul(a, a).numpy()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tf.linalg.matmul(a, a).numpy()
        best = min(best, time.perf_counter() - started)
    flops = 2.0 * size**3 / best
    source = np.ones(copy_mb * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return Machine(flops, 2.0 * source.nbytes / best, threads)


@dataclass(frozen=True)
class Bound:
    """Where a model sits under the roofline at one batch size."""

    mode: str  # training | inference
    batch: int
    flops: float  # per sample
    bytes: float  # per sample
    intensity: float
    attainable_flops_per_s: float
    bound: str  # compute | memory

    @property
    def samples_per_s(self) -> float:
        """The roof's ceiling on throughput: attainable FLOP/s over FLOPs per sample."""
        return self.attainable_flops_per_s / self.flops if self.flops else float("inf")


def bound(costs: Sequence[LayerCost], machine: Machine, batch: int, training: bool) -> Bound:
    """The whole model's position: total FLOPs over total bytes per sample."""
    flops = sum(c.per_sample(batch, training)[0] for c in costs)
    moved = sum(c.per_sample(batch, training)[1] for c in costs)
    intensity = flops / moved if moved else float("inf")
    attainable = min(machine.flops_per_s, intensity * machine.bytes_per_s)
    return Bound("training" if training else "inference", batch, flops, moved, intensity, attainable,
                 "compute" if intensity >= machine.ridge else "memory")


def plot(costs: Sequence[LayerCost], machine: Machine, bounds: Sequence[Bound], path: str) -> None:
    """The two roofs, each layer's forward intensity (inference batch) and the whole model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.logspace(-2, 4, 200)
    ax.plot(x, np.minimum(machine.flops_per_s, x * machine.bytes_per_s) / 1e9, "k-", label="roofline")
    batch = bounds[-1].batch if bounds else 1
    for c in costs:
        if c.flops:
            i = c.intensity(batch)
            ax.plot(i, min(machine.flops_per_s, i * machine.bytes_per_s) / 1e9, ".", color="tab:gray")
            ax.annotate(c.name, (i, min(machine.flops_per_s, i * machine.bytes_per_s) / 1e9), fontsize=6)
    for b, color in zip(bounds, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        ax.plot(b.intensity, b.attainable_flops_per_s / 1e9, "o", color=color, markersize=8,
                label=f"{b.mode}, batch {b.batch}: {b.bound}-bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_title(f"roofline: {machine.flops_per_s / 1e9:.1f} GFLOP/s, {machine.bytes_per_s / 1e9:.1f} GB/s "
                 f"({machine.threads} thread(s))", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
