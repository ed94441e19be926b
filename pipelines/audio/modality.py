"""The audio plug-in: WAV/FLAC/OGG/AIFF files -> a fixed-length int16 mono waveform at one rate.
Features (a log-mel spectrogram) are computed inside the model graph, so training and serving
cannot compute them differently."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from deepspark.modality import Modality, Preprocess, TensorSpec
from pipelines.audio import transforms

COLUMN = "waveform"
# Compressed formats libsndfile is not asked to decode are listed too: such files become
# `unsupported_format` quarantine rows instead of being silently left out.
GLOB = "*.{wav,WAV,wave,flac,FLAC,ogg,OGG,oga,aif,AIF,aiff,AIFF,aifc,mp3,MP3,m4a,M4A,aac,AAC}"


class AudioModality(Modality):
    name = "audio"
    rules_type = transforms.AudioRules
    default_glob = GLOB
    default_model = "cnn"
    models = {
        "cnn": "log-mel spectrogram (in graph, standardised per clip) + 4 conv blocks + global pooling; "
               "random time shifts and frequency masks while training",
    }
    models_module = "pipelines.audio.models"

    def spec(self, rules: transforms.AudioRules, state: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(COLUMN, (rules.samples,), "int16")

    def input_statistics(self, tensors: np.ndarray, rules: transforms.AudioRules, state: Mapping[str, Any]
                         ) -> dict[str, np.ndarray]:
        """Duration (seconds from the first to the last sample above the trim level; clips are
        centre-padded with zeros) and loudness (RMS over that span, dBFS): other microphones,
        other speakers' pace and clipped recordings move them."""
        level = 10 ** (rules.trim_db / 20) * 32768.0
        duration = np.zeros(len(tensors), np.float32)
        loudness = np.full(len(tensors), -100.0, np.float32)
        for i, clip in enumerate(np.asarray(tensors)):  # row by row: no batch-sized float copies
            loud = np.flatnonzero(np.abs(clip.astype(np.float32)) >= level)
            if loud.size:
                kept = clip[loud[0] : loud[-1] + 1].astype(np.float64) / 32768.0
                duration[i] = kept.size / rules.sample_rate
                loudness[i] = 10 * np.log10(max(float(np.mean(kept * kept)), 1e-10))
        return {"duration_s": duration, "loudness_dbfs": loudness}

    def preprocessor(self, rules: transforms.AudioRules, state: Mapping[str, Any]) -> Preprocess:
        return lambda payload: transforms.decode_or_reason(payload, rules)


AUDIO = AudioModality()
