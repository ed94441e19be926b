"""Pure text transforms: raw text (file bytes or a record's string) -> token ids, or a reason why not.

Unicode normalisation (NFKC by default), lower-casing, a regex tokeniser (words with inner
apostrophes, digit runs, single punctuation marks), then ids over the vocabulary fitted on the
train split: 0 pads, 1 stands for any token outside the vocabulary, 2.. are the vocabulary in
order. No Spark and no TensorFlow here: the ETL, the vocabulary job, the registered model and
batch inference all call these same functions.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from deepspark.modality import EMPTY, NO_LABEL, UNREADABLE, BadInput, or_reason

EMPTY_TEXT = "empty_text"
TOO_LONG = "too_long"
UNDECODABLE = "undecodable"
REASONS = (EMPTY, EMPTY_TEXT, TOO_LONG, UNDECODABLE, UNREADABLE, NO_LABEL)

PAD, OOV = 0, 1
FIRST_ID = 2
TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|[^\w\s]")
REPLACEMENT = "\ufffd"  # what a lenient decoder (Spark's CSV/JSON readers) puts for bad bytes


class BadText(BadInput):
    """A document that cannot become a row; `reason` is one of REASONS."""


@dataclass(frozen=True)
class TextRules:
    sequence_length: int = 64  # token ids kept per document (truncated, or padded with 0)
    max_chars: int = 20_000  # longer documents are quarantined
    lowercase: bool = True
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    encoding: str = "utf-8"  # of .txt files
    vocabulary_size: int = 20_000
    min_count: int = 1


def decode_text(payload: bytes | str | None, rules: TextRules) -> str:
    """File bytes (strictly decoded, a BOM dropped) or a record's string -> str."""
    if payload is None:
        raise BadText(EMPTY_TEXT, "no text (null field)")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
        if not data:
            raise BadText(EMPTY, "0 bytes")
        codec = "utf-8-sig" if rules.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else rules.encoding
        try:
            return data.decode(codec)
        except UnicodeDecodeError as exc:
            raise BadText(UNDECODABLE, f"not {rules.encoding}: {exc.reason} at byte {exc.start}") from None
    if REPLACEMENT in payload:
        raise BadText(UNDECODABLE, f"U+FFFD at character {payload.index(REPLACEMENT)}: the record is not in the "
                                   "encoding it was read as (CSV/JSON Lines: set input.encoding, e.g. latin-1)")
    return payload


def normalize(text: str, rules: TextRules) -> str:
    text = unicodedata.normalize(rules.normalization, text)
    return text.lower() if rules.lowercase else text


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text)


def tokens(payload: bytes | str | None, rules: TextRules) -> list[str]:
    """Raw text -> tokens, or BadText: empty, too long, undecodable."""
    text = decode_text(payload, rules)
    if len(text) > rules.max_chars:
        raise BadText(TOO_LONG, f"{len(text)} characters > text.max_chars={rules.max_chars}")
    found = tokenize(normalize(text, rules))
    if not found:
        raise BadText(EMPTY_TEXT, "no tokens" if text.strip() else "only whitespace")
    return found


def tokens_or_reason(payload: bytes | str | None, rules: TextRules) -> tuple[list[str] | None, tuple[str, str] | None]:
    return or_reason(lambda p: tokens(p, rules), payload)  # type: ignore[arg-type,return-value]


def token_index(vocabulary: Sequence[str]) -> dict[str, int]:
    return {token: FIRST_ID + i for i, token in enumerate(vocabulary)}


def encode_ids(found: Sequence[str], index: Mapping[str, int], length: int) -> np.ndarray:
    """Tokens -> (length,) int32 ids: truncated, or padded with PAD; unknown tokens become OOV."""
    ids = np.full(length, PAD, np.int32)
    kept = found[:length]
    ids[: len(kept)] = [index.get(token, OOV) for token in kept]
    return ids


def ids_or_reason(payload: bytes | str | None, rules: TextRules, index: Mapping[str, int]
                  ) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """The whole preprocessing of one document; never raises on bad data."""
    return or_reason(lambda p: encode_ids(tokens(p, rules), index, rules.sequence_length), payload)
