"""Pure text preprocessing: raw text -> token ids or a quarantine reason; no Spark needed."""

import numpy as np
import pytest

from pipelines.text import transforms as T

RULES = T.TextRules(sequence_length=6, max_chars=200)


def test_normalisation_lowercasing_and_tokens():
    text = "Ｔｈｅ ﬁlm's GREAT—don't miss it! 10/10"
    assert T.tokenize(T.normalize(text, RULES)) == [
        "the", "film's", "great", "—", "don't", "miss", "it", "!", "10", "/", "10"]


def test_lowercasing_can_be_turned_off():
    assert T.tokens("Good Film", T.TextRules(lowercase=False)) == ["Good", "Film"]


def test_ids_pad_truncate_and_mark_unknown_tokens():
    index = T.token_index(["film", "good"])
    assert index == {"film": 2, "good": 3}
    assert T.encode_ids(["good", "film", "zzz"], index, 6).tolist() == [3, 2, T.OOV, T.PAD, T.PAD, T.PAD]
    long = T.encode_ids(["good"] * 10, index, 6)
    assert long.tolist() == [3] * 6 and long.dtype == np.int32


@pytest.mark.parametrize("payload,reason", [
    (b"", "empty_file"),
    (None, "empty_text"),
    ("   \n\t ", "empty_text"),
    ("...", None),  # punctuation is a token
    ("caf\xe9".encode("latin-1"), "undecodable"),  # a latin-1 file read as UTF-8
    ("bad \ufffd byte", "undecodable"),  # Spark's reader replaced an invalid byte
    ("word " * 50, "too_long"),  # 250 characters > max_chars=200
    ("\ufeffgood film".encode("utf-8"), None),  # a UTF-8 BOM is not text
])
def test_bad_input_zoo(payload, reason):
    ids, failure = T.ids_or_reason(payload, RULES, T.token_index(["good", "film"]))
    if reason is None:
        assert failure is None and ids.shape == (6,)
    else:
        assert ids is None and failure[0] == reason and failure[1]


def test_bom_is_dropped_before_tokenising():
    ids, _ = T.ids_or_reason("\ufeffgood film".encode("utf-8"), RULES, T.token_index(["good", "film"]))
    assert ids.tolist()[:2] == [2, 3]


def test_other_file_encodings_are_configurable():
    rules = T.TextRules(encoding="latin-1")
    assert T.tokens("caf\xe9 cr\xe8me".encode("latin-1"), rules) == ["café", "crème"]


def test_memory_error_is_not_a_quarantine_reason(monkeypatch):
    def boom(text):
        raise MemoryError

    monkeypatch.setattr(T, "tokenize", boom)
    with pytest.raises(MemoryError):
        T.ids_or_reason("good film", RULES, {})
