"""Training curves and the confusion matrix as PNGs (matplotlib, no display)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def training_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str) -> None:
    """Loss and accuracy per epoch, train against validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            points = sorted(history.get(key, []))
            if points:
                ax.plot([e + 1 for e, _ in points], [v for _, v in points], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > limit else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def epoch_breakdown(history: Mapping[str, Sequence[tuple[int, float]]], path: str) -> bool:
    """Each epoch's seconds stacked by part (compute, input wait, negotiation, allreduce,
    validation, checkpoint); False when the run logged no breakdown."""
    parts = [k for k in ("time_compute_s", "time_input_wait_s", "time_negotiation_s", "time_allreduce_s",
                         "time_validation_s", "time_checkpoint_s") if history.get(k)]
    if not parts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = sorted({e for k in parts for e, _ in history[k]})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(epochs) + 3), 4))
    bottom = np.zeros(len(epochs))
    for key in parts:
        by_epoch = dict(history[key])
        values = np.array([by_epoch.get(e, 0.0) for e in epochs])
        ax.bar([e + 1 for e in epochs], values, bottom=bottom, label=key.removeprefix("time_").removesuffix("_s"))
        bottom += values
    totals = dict(history.get("time_epoch_s", []))
    if totals:
        ax.plot([e + 1 for e in epochs], [totals.get(e, np.nan) for e in epochs], "k_", markersize=20,
                label="epoch (measured)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds (rank 0)")
    ax.set_title("where each epoch's time went")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
