"""The scoring function that runs on executors (a pandas function over an iterator of batches).

Built on the driver as a picklable closure; imports TensorFlow lazily; preprocesses raw inputs
with the registered model's modality record (the ETL's preprocessing, for any modality, as
`ModalityClassifier.preprocess` does) or decodes a dataset's stored tensors, so serving sees
what training saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
from pyspark.accumulators import AccumulatorParam

from inference.model import ResolvedModel

if TYPE_CHECKING:
    import pandas as pd
    from pyspark import Accumulator, Broadcast

    from deepspark.modality import Failure
    from inference.monitor import BinPlan

SCORED_DDL = (
    "path string, content_hash string, predicted_index int, predicted_label string, "
    "top_k_labels array<string>, top_k_probabilities array<float>, true_label string, reason string, detail string, "
    "source string, source_size long, source_modified long, unchanged boolean, model_version int, "
    "drift_counts array<long>, embedding array<float>"  # monitoring only: not written to the predictions
)


def top_k(probs: np.ndarray, k: int, labels: np.ndarray) -> tuple[np.ndarray, list, list]:
    """(best index, top-k label lists, top-k probability lists) of a (rows, classes) matrix,
    in whole-array operations (one `tolist` per column, no Python loop per row)."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order[:, 0], labels[order].tolist(), np.take_along_axis(probs, order, 1).astype(np.float32).tolist()


class CounterParam(AccumulatorParam):
    """A Spark accumulator of counts by key (merged across tasks)."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, first: dict, second: dict) -> dict:
        for key, count in second.items():
            first[key] = first.get(key, 0) + count
        return first


def make_scorer(models: Sequence[ResolvedModel], source: str, root: str | None, batch_size: int, k: int,
                threads: int, loads: "Accumulator[int]", read_in_workers: bool = False,
                seen: "Broadcast[dict[int, dict[str, list[str]]]] | None" = None,
                disagreements: "Accumulator[dict] | None" = None, monitor: "BinPlan | None" = None,
                ) -> Callable[[Iterable["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    """`source` is "files" (path, payload), "records" (path, payload, label_name) or "dataset"
    (path, <tensor column>, label_name); every row also brings the metadata of its source file,
    which passes through to the committed row. Its `content_hash` comes computed by Spark, or,
    with `read_in_workers`, this function reads the file and hashes it. Each input is read and
    preprocessed once (the models share one modality record) and scored by every model version
    for which it is new: one output row per (input, model version); an input whose hash is among
    those its path was committed under for a version (`seen[version]`) comes out `unchanged` for
    that version, unscored. With several models, `disagreements` counts the inputs every model
    scored ("compared"), those where some model's label differs from the first's ("differing"),
    and each (first model's label, second's) pair that differs, as the batches pass. With `monitor`,
    the first row of each output batch of a monitored version carries the batch's counts per bin
    of that version's drift reference (`drift_counts`), and the rows of the hash-chosen sample
    their penultimate-layer `embedding`."""
    labels = np.array(models[0].labels, dtype=object)
    k = min(k, len(labels))
    record = models[0].record

    def score(batches: Iterable["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        from deepspark.spark import lighten_python_worker

        lighten_python_worker()  # this worker's next tasks start without re-reading Spark's jar

        from deepspark import monitoring
        from deepspark.inputs import MALFORMED_DETAIL, payloads
        from deepspark.layout import Layout
        from deepspark.modality import content_hash, preprocess_all
        from inference.model import load_on_worker, task_gpu

        def loaded(model: ResolvedModel):  # type: ignore[no-untyped-def]  # only when there is something to score
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
            unchanged = np.zeros((len(models), n), bool)  # per model version
            if source == "dataset":
                stacked = record.plugin.decode(list(batch[record.spec.column]), record.spec)
                hashes = list(batch["content_hash"])
                raw = None
            else:
                raw = list(payloads(batch, read_in_workers))
                hashes = [content_hash(b) for b in raw] if read_in_workers else list(batch["content_hash"])
            if seen is not None:
                for m, model in enumerate(models):
                    committed = seen.value.get(model.version, {})
                    unchanged[m] = [h in committed.get(p, ()) for p, h in zip(batch["path"], hashes)]
            everywhere = unchanged.all(axis=0)  # committed for every version: not even preprocessed
            tensors: list[np.ndarray | None]
            failures: list[Failure | None]
            if raw is None:
                tensors, failures = list(stacked), [None] * n
                truth = list(batch["label_name"])
            else:
                tensors, failures = preprocess_all(preprocess, [None if u else b for u, b in zip(everywhere, raw)])
                truth = [layout.parse(p)[2] for p in batch["path"]] if layout else (
                    list(batch["label_name"]) if "label_name" in batch else [None] * n)
            malformed = list(batch["malformed"]) if "malformed" in batch else [None] * n
            for i, flag in enumerate(malformed):
                if flag is not None:
                    tensors[i], failures[i] = None, (flag, MALFORMED_DETAIL)
            for i in np.flatnonzero(everywhere):
                tensors[i], failures[i] = None, None
            indexes = []
            valid = [i for i, t in enumerate(tensors) if t is not None]
            statistics = {}
            if monitor is not None and valid:  # once per batch, for every model version
                stacked_valid = np.stack([tensors[i] for i in valid])  # type: ignore[misc]
                statistics = record.plugin.input_statistics(stacked_valid, record.typed_rules(), record.state)
            position = np.full(n, -1, np.int64)
            position[valid] = np.arange(len(valid))
            sampled = monitoring.in_sample(hashes, monitor.sample_fraction) if monitor is not None else None
            for m, model in enumerate(models):
                good = [i for i, t in enumerate(tensors) if t is not None and not unchanged[m, i]]
                index = np.full(n, -1, np.int64)
                indexes.append(index)
                top_labels: list = [None] * n
                top_probs: list = [None] * n
                batch_counts: list = [None] * n
                vectors: list = [None] * n
                if good:
                    stacked_good = np.stack([tensors[i] for i in good])  # type: ignore[misc]
                    watched = monitor is not None and model.version in monitor.edges
                    if watched:  # the embeddings come out of the same forward pass
                        probs, embedded = loaded(model).scores(stacked_good, batch_size)
                    else:
                        probs, embedded = loaded(model).probabilities(stacked_good, batch_size), None
                    best, best_labels, best_probs = top_k(probs, k, labels)  # (good: the rows whose tensor is not None)
                    index[good] = best
                    if len(good) == n:
                        top_labels, top_probs = best_labels, best_probs
                    else:
                        for row, i in enumerate(good):
                            top_labels[i], top_probs[i] = best_labels[row], best_probs[row]
                    if watched and monitor is not None:
                        at = position[good]
                        batch_counts[0] = monitor.counts(model.version, {name: v[at] for name, v in statistics.items()},
                                                         np.asarray(probs).max(axis=1), best).tolist()
                        chosen = [row for row, i in enumerate(good) if sampled[i]]  # type: ignore[index]
                        if embedded is not None and chosen:
                            for row, vector in zip(chosen, embedded[chosen].astype(np.float32).tolist()):
                                vectors[good[row]] = vector
                scored = index >= 0
                predicted = pd.array(index, dtype="Int32")
                predicted[~scored] = pd.NA
                yield pd.DataFrame({
                    "path": batch["path"].to_numpy(),
                    "content_hash": hashes,
                    "predicted_index": predicted,
                    "predicted_label": np.where(scored, labels[np.maximum(index, 0)], np.array(None, dtype=object)),
                    "top_k_labels": top_labels,
                    "top_k_probabilities": top_probs,
                    "true_label": truth,
                    "reason": [None if unchanged[m, i] else (f[0] if f else None) for i, f in enumerate(failures)],
                    "detail": [None if unchanged[m, i] else (f[1] if f else None) for i, f in enumerate(failures)],
                    "source": batch["source"].to_numpy(),
                    "source_size": pd.array(batch["source_size"], dtype="Int64"),
                    "source_modified": pd.array(batch["source_modified"], dtype="Int64"),
                    "unchanged": unchanged[m],
                    "model_version": np.full(n, model.version, np.int32),
                    "drift_counts": batch_counts,
                    "embedding": vectors,
                })
            if disagreements is not None:
                disagreements.add(_disagreements(np.stack(indexes), labels))

    return score


def _disagreements(indexes: np.ndarray, labels: np.ndarray) -> dict:
    """Counts of one batch: (models, rows) predicted indexes, -1 where a model did not score."""
    both = (indexes >= 0).all(axis=0)
    scored = indexes[:, both]
    differs = (scored != scored[0]).any(axis=0)
    out: dict = {"compared": int(both.sum()), "differing": int(differs.sum())}
    for a, b in zip(scored[0][scored[0] != scored[1]], scored[1][scored[0] != scored[1]]):
        key = (str(labels[a]), str(labels[b]))
        out[key] = out.get(key, 0) + 1
    return out
