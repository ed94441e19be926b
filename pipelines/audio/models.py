"""Audio models over int16 waveforms. The log-mel spectrogram is a layer (`tf.signal`), so the
registered model takes the stored waveform and nothing outside the graph computes features."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import tensorflow as tf

if TYPE_CHECKING:
    from deepspark.modality import ModalityRecord

L = tf.keras.layers

@tf.keras.utils.register_keras_serializable(package="deepspark")
class LogMelSpectrogram(tf.keras.layers.Layer):
    """int16 waveform (N, samples) -> log-mel spectrogram (N, frames, mel_bins, 1)."""

    def __init__(self, sample_rate: int = 16_000, frame_length: int = 400, frame_step: int = 160,
                 fft_length: int = 512, mel_bins: int = 64, fmin: float = 60.0, fmax: float = 7_600.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_rate, self.frame_length, self.frame_step = int(sample_rate), int(frame_length), int(frame_step)
        self.fft_length, self.mel_bins, self.fmin, self.fmax = int(fft_length), int(mel_bins), float(fmin), float(fmax)
        self.mel = tf.signal.linear_to_mel_weight_matrix(self.mel_bins, self.fft_length // 2 + 1, self.sample_rate,
                                                         self.fmin, min(self.fmax, self.sample_rate / 2))

    def call(self, waveform):  # type: ignore[no-untyped-def]
        x = tf.cast(waveform, tf.float32) / 32768.0
        spectrum = tf.abs(tf.signal.stft(x, self.frame_length, self.frame_step, self.fft_length))
        mel = tf.math.log(tf.tensordot(tf.square(spectrum), self.mel, 1) + 1e-6)
        # Per-clip standardisation: no statistics to learn (a batch-norm on raw log-mel values,
        # around -10, needs thousands of steps before its moving averages are usable).
        mean, variance = tf.nn.moments(mel, axes=[1, 2], keepdims=True)
        return ((mel - mean) / tf.sqrt(variance + 1e-6))[..., None]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "sample_rate": self.sample_rate, "frame_length": self.frame_length,
                "frame_step": self.frame_step, "fft_length": self.fft_length, "mel_bins": self.mel_bins,
                "fmin": self.fmin, "fmax": self.fmax}


@tf.keras.utils.register_keras_serializable(package="deepspark")
class RandomTimeShift(tf.keras.layers.Layer):
    """While training, roll each waveform by up to `max_shift` samples; the identity at inference."""

    def __init__(self, max_shift: int = 1_600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_shift = int(max_shift)

    def call(self, waveform, training=None):  # type: ignore[no-untyped-def]
        if not training:
            return waveform
        shifts = tf.random.uniform((tf.shape(waveform)[0],), -self.max_shift, self.max_shift + 1, tf.int32)
        return tf.map_fn(lambda pair: tf.roll(pair[0], pair[1], axis=0), (waveform, shifts),
                         fn_output_signature=waveform.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_shift": self.max_shift}


@tf.keras.utils.register_keras_serializable(package="deepspark")
class FrequencyMask(tf.keras.layers.Layer):
    """While training, zero a random band of up to `max_bins` mel bins per clip (SpecAugment)."""

    def __init__(self, max_bins: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bins = int(max_bins)

    def call(self, features, training=None):  # type: ignore[no-untyped-def]
        if not training:
            return features
        batch, bins = tf.shape(features)[0], tf.shape(features)[2]
        width = tf.random.uniform((batch, 1), 0, self.max_bins + 1, tf.int32)
        start = tf.random.uniform((batch, 1), 0, 1) * tf.cast(bins - width, tf.float32)
        index = tf.range(bins)[None, :]
        start = tf.cast(start, tf.int32)
        keep = tf.cast((index < start) | (index >= start + width), features.dtype)
        return features * keep[:, None, :, None]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_bins": self.max_bins}


CUSTOM_OBJECTS = {"LogMelSpectrogram": LogMelSpectrogram, "RandomTimeShift": RandomTimeShift,
                  "FrequencyMask": FrequencyMask}


def cnn(record: "ModalityRecord", filters: Sequence[int] = (32, 64, 96, 128), dropout: float = 0.3) -> tf.keras.Model:
    """Log-mel spectrogram (standardised per clip) then a conv block per entry of `filters`; random
    time shifts and frequency masks only while training."""
    sample_rate = int(record.rules["sample_rate"])
    waveform = tf.keras.Input(shape=record.spec.shape, dtype="int16", name="waveform")
    x = RandomTimeShift(sample_rate // 10, name="time_shift")(waveform)
    x = LogMelSpectrogram(sample_rate, name="log_mel")(x)
    x = FrequencyMask(8, name="frequency_mask")(x)
    for width in filters:
        x = L.Conv2D(int(width), 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=0.9)(x)  # few steps per epoch on small datasets
        x = L.ReLU()(x)
        x = L.MaxPooling2D(2, padding="same")(x)
    x = L.Concatenate()([L.GlobalAveragePooling2D()(x), L.GlobalMaxPooling2D()(x)])
    x = L.Dropout(dropout)(x)
    outputs = L.Dense(len(record.labels), activation="softmax", dtype="float32", name="probabilities")(x)
    return tf.keras.Model(waveform, outputs, name="audio_cnn")
