"""The scoring function that runs on executors (a pandas function over an iterator of batches).

Built on the driver as a picklable closure; imports TensorFlow lazily; uses exactly the ETL's
decode and resize (`pipelines.images.transforms`) or the dataset's stored tensors
(`deepspark.schemas.images`), so serving sees what training saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from deepspark.schemas.images import ImageSpec
from inference.model import ResolvedModel

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import Accumulator

SCORED_DDL = (
    "path string, content_hash string, predicted_index int, predicted_label string, "
    "top_k_labels array<string>, top_k_probabilities array<float>, true_label string, reason string, detail string"
)


def preprocess_files(contents: list[bytes], model: ResolvedModel) -> tuple[list[np.ndarray | None], list[tuple[str, str] | None]]:
    """Raw file bytes -> tensors, exactly as the ETL did it; failures as (reason, detail)."""
    from pipelines.images.transforms import decode_or_reason

    decoded = [decode_or_reason(content, model.rules) for content in contents]
    return [pixels for pixels, _ in decoded], [failure for _, failure in decoded]


def predict(model_obj: object, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities for (N, H, W, C) uint8 in fixed-size chunks (one compiled graph)."""
    out = []
    for start in range(0, len(x), batch_size):
        out.append(np.asarray(model_obj.predict_on_batch(x[start : start + batch_size])))  # type: ignore[attr-defined]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def make_scorer(model: ResolvedModel, source: str, root: str | None, spec: ImageSpec | None, batch_size: int,
                top_k: int, threads: int, loads: "Accumulator[int]") -> Callable[[Iterator["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    """`source` is "files" (path, content) or "dataset" (path, content_hash, image, label_name)."""
    labels = np.array(model.labels, dtype=object)
    k = min(top_k, len(labels))

    def score(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from inference.model import load_on_worker, task_gpu
        from pipelines.images.layout import Layout
        from pipelines.images.transforms import content_hash

        def loaded() -> object:  # only when there is something to score: empty runs load nothing
            before = load_on_worker.cache_info().misses
            model_obj = load_on_worker(model.shipped_as, threads, task_gpu())
            if load_on_worker.cache_info().misses > before:
                loads.add(1)
            return model_obj

        layout = Layout(root, split_from_folders=False) if root else None
        for batch in batches:
            n = len(batch)
            if source == "files":
                contents = list(batch["content"])
                hashes = [content_hash(c) for c in contents]
                tensors, failures = preprocess_files(contents, model)
                truth = [layout.parse(p)[2] for p in batch["path"]] if layout else [None] * n
            else:
                from deepspark.schemas.images import decode_pixels

                hashes = list(batch["content_hash"])
                stacked = decode_pixels(list(batch["image"]), spec)  # type: ignore[arg-type]
                tensors, failures = list(stacked), [None] * n
                truth = list(batch["label_name"])
            good = [i for i, t in enumerate(tensors) if t is not None]
            probs = predict(loaded(), np.stack([tensors[i] for i in good]), batch_size) if good else None
            index = np.full(n, -1, np.int64)
            top_labels: list = [None] * n
            top_probs: list = [None] * n
            if probs is not None:
                order = np.argsort(-probs, axis=1)[:, :k]
                for row, i in enumerate(good):
                    index[i] = order[row, 0]
                    top_labels[i] = labels[order[row]].tolist()
                    top_probs[i] = probs[row, order[row]].astype(np.float32).tolist()
            yield pd.DataFrame({
                "path": list(batch["path"]),
                "content_hash": hashes,
                "predicted_index": pd.array([int(v) if v >= 0 else None for v in index], dtype="Int32"),
                "predicted_label": [labels[v] if v >= 0 else None for v in index],
                "top_k_labels": top_labels,
                "top_k_probabilities": top_probs,
                "true_label": truth,
                "reason": [f[0] if f else None for f in failures],
                "detail": [f[1] if f else None for f in failures],
            })

    return score
