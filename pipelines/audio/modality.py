"""The audio plug-in: WAV/FLAC/OGG/AIFF files -> a fixed-length int16 mono waveform at one rate.
Features (a log-mel spectrogram) are computed inside the model graph, so training and serving
cannot compute them differently."""

from __future__ import annotations

from typing import Any, Mapping

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

    def preprocessor(self, rules: transforms.AudioRules, state: Mapping[str, Any]) -> Preprocess:
        return lambda payload: transforms.decode_or_reason(payload, rules)


AUDIO = AudioModality()
