"""The text plug-in: documents -> (sequence_length,) int32 token ids over a vocabulary that a
Spark job fits on the train split only. The vocabulary travels in the dataset's manifest and in
the registered model, so serving tokenises exactly as the ETL did."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from deepspark.modality import Modality, Preprocess, TensorSpec
from pipelines.text import transforms

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

COLUMN = "tokens"
GLOB = "*.{txt,TXT,text}"


class TextModality(Modality):
    name = "text"
    rules_type = transforms.TextRules
    input_kinds = ("files", "records")
    default_glob = GLOB
    default_model = "cnn"
    models = {
        "cnn": "embedding + 1-D convolutions (widths 3/4/5, 100 filters, global max-pool; Kim 2014) + fastText branch",
        "bilstm": "embedding + bidirectional LSTM (64), global max-pool + fastText branch",
    }
    models_module = "pipelines.text.models"

    def spec(self, rules: transforms.TextRules, state: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(COLUMN, (rules.sequence_length,), "int32")

    def fit(self, spark: "SparkSession", train_payloads: "DataFrame", rules: transforms.TextRules) -> dict[str, Any]:
        """Word counts over the train split's valid documents; the `vocabulary_size` most frequent
        tokens seen at least `min_count` times, ties broken alphabetically (deterministic)."""
        from pyspark.sql import functions as F

        def tokenised(batches: Iterable["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
            import pandas as pd

            from deepspark.spark import lighten_python_worker

            lighten_python_worker()

            for batch in batches:
                found = [t for t, _ in (transforms.tokens_or_reason(p, rules) for p in batch["payload"]) if t]
                yield pd.DataFrame({"tokens": pd.Series(found, dtype=object)})  # object even when empty

        docs = train_payloads.mapInPandas(tokenised, "tokens array<string>")
        counts = (docs.select(F.explode("tokens").alias("token")).groupBy("token").count()
                  .where(F.col("count") >= rules.min_count)
                  .orderBy(F.desc("count"), F.asc("token")).limit(rules.vocabulary_size).collect())
        return {"vocabulary": [row["token"] for row in counts], "pad_id": transforms.PAD, "oov_id": transforms.OOV}

    def input_statistics(self, tensors: np.ndarray, rules: transforms.TextRules, state: Mapping[str, Any]
                         ) -> dict[str, np.ndarray]:
        """Length in tokens (as kept: at most `sequence_length`) and the share of them outside the
        vocabulary: longer reviews or another language's words move them."""
        ids = np.asarray(tensors)
        length = (ids != transforms.PAD).sum(axis=1)
        unknown = (ids == transforms.OOV).sum(axis=1)
        return {"length_tokens": length.astype(np.float32),
                "out_of_vocabulary": (unknown / np.maximum(length, 1)).astype(np.float32)}

    def preprocessor(self, rules: transforms.TextRules, state: Mapping[str, Any]) -> Preprocess:
        index = transforms.token_index(state["vocabulary"])
        return lambda payload: transforms.ids_or_reason(payload, rules, index)


TEXT = TextModality()
