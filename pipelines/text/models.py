"""Text models over int32 token ids (0 = padding, 1 = out of vocabulary). Everything after the
ids is in the graph, so the registered model needs only the tokeniser and the vocabulary."""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

L = tf.keras.layers

CATALOGUE: dict[str, str] = {
    "cnn": "embedding + 1-D convolutions (widths 3/4/5, global max-pool; Kim 2014) + averaged bigram embeddings",
    "bilstm": "embedding + bidirectional LSTM, max- and mean-pooled",
}


@tf.keras.utils.register_keras_serializable(package="deepspark")
class HashedBigrams(L.Layer):
    """Ids of adjacent token pairs hashed into `buckets` (fastText's bigram trick), computed in
    the graph from the id sequence; pairs touching padding map to 0."""

    def __init__(self, buckets: int = 100_003, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buckets = int(buckets)

    def call(self, ids):  # type: ignore[no-untyped-def]
        ids = tf.cast(ids, tf.int64)
        left, right = ids[:, :-1], ids[:, 1:]
        hashed = (left * 1_000_003 + right) % (self.buckets - 1) + 1
        return tf.where((left > 0) & (right > 0), hashed, tf.zeros_like(hashed))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "buckets": self.buckets}


@tf.keras.utils.register_keras_serializable(package="deepspark")
class MaskedMean(L.Layer):
    """Mean of embeddings over the non-padding positions."""

    def call(self, embedded, ids):  # type: ignore[no-untyped-def]
        mask = tf.cast(ids > 0, embedded.dtype)[..., None]
        return tf.reduce_sum(embedded * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


CUSTOM_OBJECTS = {"HashedBigrams": HashedBigrams, "MaskedMean": MaskedMean}


def cnn(length: int, vocab_size: int, num_classes: int, dim: int = 64) -> tf.keras.Model:
    ids = tf.keras.Input(shape=(length,), dtype="int32", name="tokens")
    embedded = L.Embedding(vocab_size, dim, name="embedding")(ids)
    x = L.SpatialDropout1D(0.2)(embedded)
    pooled = [L.GlobalMaxPooling1D()(L.Conv1D(64, width, activation="relu", padding="same")(x)) for width in (3, 4, 5)]
    bigrams = HashedBigrams(name="bigrams")(ids)
    bag = MaskedMean(name="bigram_mean")(L.Embedding(100_003, dim, name="bigram_embedding")(bigrams), bigrams)
    words = MaskedMean(name="word_mean")(embedded, ids)
    x = L.Concatenate()([*pooled, bag, words])
    x = L.Dropout(0.5)(x)
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(ids, outputs, name="text_cnn")


def bilstm(length: int, vocab_size: int, num_classes: int, dim: int = 64) -> tf.keras.Model:
    ids = tf.keras.Input(shape=(length,), dtype="int32", name="tokens")
    x = L.Embedding(vocab_size, dim, mask_zero=True, name="embedding")(ids)
    x = L.SpatialDropout1D(0.2)(x)
    x = L.Bidirectional(L.LSTM(64, return_sequences=True))(x)
    x = L.Concatenate()([L.GlobalMaxPooling1D()(x), L.GlobalAveragePooling1D()(x)])
    x = L.Dropout(0.5)(x)
    outputs = L.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(ids, outputs, name="text_bilstm")


BUILDERS: dict[str, Callable[..., tf.keras.Model]] = {"cnn": cnn, "bilstm": bilstm}
