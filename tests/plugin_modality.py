"""A modality from outside the pipelines package, for tests/test_plugin_modality.py: any file ->
its first `length` bytes as a uint8 vector (shorter files padded with zeros; empty ones
quarantined). Named in config as `modality=tests.plugin_modality:HEAD`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from deepspark.modality import EMPTY, Modality, Preprocess, TensorSpec


@dataclass(frozen=True)
class HeadRules:
    length: int = 8


class HeadModality(Modality):
    name = "head"
    rules_type = HeadRules
    default_glob = "*.bin"
    default_model = "dense"
    models = {"dense": "a dense layer over the bytes"}
    models_module = "tests.plugin_modality"

    def spec(self, rules: HeadRules, state: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec("head", (rules.length,), "uint8")

    def preprocessor(self, rules: HeadRules, state: Mapping[str, Any]) -> Preprocess:
        def head(payload: bytes) -> tuple[np.ndarray | None, tuple[str, str] | None]:
            if not payload:
                return None, (EMPTY, "the file is empty")
            out = np.zeros(rules.length, np.uint8)
            data = np.frombuffer(payload[: rules.length], np.uint8)
            out[: len(data)] = data
            return out, None

        return head


HEAD = HeadModality()
