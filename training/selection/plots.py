"""The search's pictures (matplotlib, no display): validation curves of every configuration, and
each searched hyper-parameter against the final validation metric."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def validation_curves(curves: Mapping[int, Sequence[float]], metric: str, winner: int, path: str) -> None:
    """One line per configuration: `metric` after each epoch it trained (halving's drop-outs end early)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for trial, values in sorted(curves.items()):
        style = {"linewidth": 2.5, "color": "black"} if trial == winner else {"alpha": 0.7}
        ax.plot(range(1, len(values) + 1), values, "-o", markersize=3, label=f"trial {trial}", **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per configuration (winner: trial {winner})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hyperparameters(rows: Sequence[Mapping[str, Any]], metric: str, log_keys: set[str], path: str) -> None:
    """A scatter per searched key: its value in each configuration against the final `metric`
    (numbers on their own axis, log-scaled where the space is log-uniform; choices as categories)."""
    plt = _pyplot()
    keys = sorted({k for row in rows for k in row["params"]})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [row["params"].get(key) for row in rows]
        scores = [row[metric] for row in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, scores)
            if key in log_keys:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], scores)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        for row, value, score in zip(rows, values, scores):
            x = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if x is not None:
                ax.annotate(str(row["trial"]), (x, score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"hyper-parameters against final {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
