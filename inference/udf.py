"""The scoring function that runs on executors (a pandas function over an iterator of batches).

Built on the driver as a picklable closure; imports TensorFlow lazily; preprocesses raw inputs
with the registered model's modality record (the ETL's preprocessing, for any modality, as
`ModalityClassifier.preprocess` does) or decodes a dataset's stored tensors, so serving sees
what training saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from inference.model import ResolvedModel

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import Accumulator

SCORED_DDL = (
    "path string, content_hash string, predicted_index int, predicted_label string, "
    "top_k_labels array<string>, top_k_probabilities array<float>, true_label string, reason string, detail string, "
    "source string, source_size long, source_modified long"
)


def make_scorer(model: ResolvedModel, source: str, root: str | None, batch_size: int, top_k: int, threads: int,
                loads: "Accumulator[int]") -> Callable[[Iterator["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    """`source` is "files" (path, payload), "records" (path, payload, label_name) or "dataset"
    (path, <tensor column>, label_name); every row also brings its `content_hash` (computed by
    Spark) and the metadata of its source file, which pass through to the committed row."""
    labels = np.array(model.labels, dtype=object)
    k = min(top_k, len(labels))
    record = model.record

    def score(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from deepspark.modality import preprocess_all
        from inference.model import load_on_worker, task_gpu
        from pipelines.inputs import MALFORMED_DETAIL
        from pipelines.layout import Layout

        def loaded():  # type: ignore[no-untyped-def]  # only when there is something to score
            before = load_on_worker.cache_info().misses
            classifier = load_on_worker(model.shipped_as, threads, task_gpu())
            if load_on_worker.cache_info().misses > before:
                loads.add(1)
            return classifier

        layout = Layout(root, split_from_folders=False) if source == "files" and root else None
        # The very preprocessing the registered model applies (ModalityClassifier.preprocess), built
        # from its record without loading Keras: batches of only bad inputs load no model.
        preprocess = record.plugin.preprocessor(record.typed_rules(), record.state)
        for batch in batches:
            n = len(batch)
            if source == "dataset":
                stacked = record.plugin.decode(list(batch[record.spec.column]), record.spec)
                tensors, failures = list(stacked), [None] * n
                truth = list(batch["label_name"])
            else:
                payloads = list(batch["payload"])
                tensors, failures = preprocess_all(preprocess, payloads)
                truth = [layout.parse(p)[2] for p in batch["path"]] if layout else (
                    list(batch["label_name"]) if "label_name" in batch else [None] * n)
            malformed = list(batch["malformed"]) if "malformed" in batch else [None] * n
            for i, flag in enumerate(malformed):
                if flag is not None:
                    tensors[i], failures[i] = None, (flag, MALFORMED_DETAIL)
            good = [i for i, t in enumerate(tensors) if t is not None]
            probs = loaded().probabilities(np.stack([tensors[i] for i in good]), batch_size) if good else None
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
                "content_hash": list(batch["content_hash"]),
                "predicted_index": pd.array([int(v) if v >= 0 else None for v in index], dtype="Int32"),
                "predicted_label": [labels[v] if v >= 0 else None for v in index],
                "top_k_labels": top_labels,
                "top_k_probabilities": top_probs,
                "true_label": truth,
                "reason": [f[0] if f else None for f in failures],
                "detail": [f[1] if f else None for f in failures],
                "source": list(batch["source"]),
                "source_size": pd.array(batch["source_size"], dtype="Int64"),
                "source_modified": pd.array(batch["source_modified"], dtype="Int64"),
            })

    return score
