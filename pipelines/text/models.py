"""Text models over int32 token ids (0 = padding, 1 = out of vocabulary). Everything after the ids
is in the graph, so the registered model needs only the tokeniser and the vocabulary.

Both models add a fastText branch (averaged embeddings of the tokens and of hashed adjacent-token
pairs) to their convolution or LSTM features: on Rotten Tomatoes it made results steadier across
seeds (benchmarks/README.md has the comparison against TF-IDF + logistic regression)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import tensorflow as tf

if TYPE_CHECKING:
    from deepspark.modality import ModalityRecord

L = tf.keras.layers

@tf.keras.utils.register_keras_serializable(package="deepspark")
class HashedBigrams(tf.keras.layers.Layer):
    """(N, L) ids -> (N, L-1) ids of adjacent pairs, hashed into 1..buckets; 0 where either side
    is padding. Computed in the graph from the ids, so serving needs nothing else."""

    def __init__(self, buckets: int = 50_000, multiplier: int = 1_000_003, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buckets, self.multiplier = int(buckets), int(multiplier)

    def call(self, ids):  # type: ignore[no-untyped-def]
        ids = tf.cast(ids, tf.int64)
        left, right = ids[:, :-1], ids[:, 1:]
        hashed = tf.math.floormod(left * self.multiplier + right, self.buckets) + 1
        return tf.cast(tf.where((left > 0) & (right > 0), hashed, tf.zeros_like(hashed)), tf.int32)

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return (input_shape[0], None if input_shape[1] is None else input_shape[1] - 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "buckets": self.buckets, "multiplier": self.multiplier}


@tf.keras.utils.register_keras_serializable(package="deepspark")
class MaskedMean(tf.keras.layers.Layer):
    """[embeddings (N, T, D), ids (N, T)] -> mean over non-padding positions; 0 (not NaN, as
    Keras' masked average pooling gives) for a row with none, e.g. a one-token review's bigrams."""

    def call(self, inputs):  # type: ignore[no-untyped-def]
        embedded, ids = inputs
        mask = tf.cast(tf.not_equal(ids, 0), embedded.dtype)[:, :, None]
        return tf.reduce_sum(embedded * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return (input_shape[0][0], input_shape[0][2])


CUSTOM_OBJECTS = {"HashedBigrams": HashedBigrams, "MaskedMean": MaskedMean}


def _fasttext(ids, vocab_size: int, dim: int, buckets: int) -> list:  # type: ignore[no-untyped-def]
    words = L.Embedding(vocab_size, dim, name="ft_word_embedding")(ids)
    bigrams = HashedBigrams(buckets, name="bigrams")(ids)
    pairs = L.Embedding(buckets + 1, dim, name="ft_bigram_embedding")(bigrams)
    return [MaskedMean(name="ft_word_mean")([words, ids]), MaskedMean(name="ft_bigram_mean")([pairs, bigrams])]


def _classify(features: list, ids, num_classes: int, name: str) -> tf.keras.Model:  # type: ignore[no-untyped-def]
    x = L.Dropout(0.5)(L.Concatenate()(features))
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(ids, outputs, name=name)


def _tokens(record: "ModalityRecord") -> tuple[Any, int]:
    """The model's input (the stored token ids) and the id count (vocabulary + reserved ids)."""
    from pipelines.text.transforms import FIRST_ID

    ids = tf.keras.Input(shape=record.spec.shape, dtype="int32", name="tokens")
    return ids, len(record.state["vocabulary"]) + FIRST_ID


def cnn(record: "ModalityRecord", dim: int = 128, filters: int = 100, widths: Sequence[int] = (3, 4, 5),
        buckets: int = 50_000) -> tf.keras.Model:
    """Kim's CNN: `filters` 1-D convolutions of each width over `dim`-wide embeddings, plus a fastText
    branch of averaged word and hashed-bigram (`buckets`) embeddings."""
    ids, vocab_size = _tokens(record)
    x = L.SpatialDropout1D(0.2)(L.Embedding(vocab_size, dim, name="embedding")(ids))
    pooled = [L.GlobalMaxPooling1D()(L.Conv1D(filters, int(width), activation="relu")(x)) for width in widths]
    return _classify(pooled + _fasttext(ids, vocab_size, 32, buckets), ids, len(record.labels), "text_cnn")


def bilstm(record: "ModalityRecord", dim: int = 64, units: int = 64, buckets: int = 100_000) -> tf.keras.Model:
    """A bidirectional LSTM of `units` over `dim`-wide embeddings, max-pooled, plus the fastText branch."""
    ids, vocab_size = _tokens(record)
    x = L.SpatialDropout1D(0.2)(L.Embedding(vocab_size, dim, name="embedding")(ids))
    x = L.Bidirectional(L.LSTM(units, return_sequences=True))(x)
    return _classify([L.GlobalMaxPooling1D()(x)] + _fasttext(ids, vocab_size, 32, buckets), ids,
                     len(record.labels), "text_bilstm")
