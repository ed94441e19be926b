"""Pure unit tests of the audio transforms (no Spark): every input becomes a (16000,) int16 clip
or exactly one quarantine reason. Test audio is synthesised here with numpy + soundfile."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.audio import transforms as T
from pipelines.audio.demo_data import COMPLETE, espeak_available, voice_slug, write_digits_folder

RULES = T.AudioRules()
HAS_VORBIS = "OGG" in sf.available_formats() and "VORBIS" in sf.available_subtypes("OGG")
needs_vorbis = pytest.mark.skipif(not HAS_VORBIS, reason="this libsndfile has no Ogg/Vorbis")


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = 16000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def burst(seconds: float, total: float = 1.0, rate: int = 16000) -> np.ndarray:
    """A noise burst of `seconds` in the middle of `total` seconds of silence."""
    out = np.zeros(round(total * rate), dtype=np.float32)
    n = round(seconds * rate)
    start = (out.size - n) // 2
    out[start : start + n] = np.random.default_rng(0).uniform(-0.5, 0.5, n)
    return out


def with_wav_tag(data: bytes, tag: int) -> bytes:
    at = data.index(b"fmt ") + 8
    return data[:at] + struct.pack("<H", tag) + data[at + 2 :]


def with_data_size(data: bytes, size: int) -> bytes:
    at = data.index(b"data") + 4
    return data[:at] + struct.pack("<I", size) + data[at + 4 :]


def decode(data: bytes, rules: T.AudioRules = RULES) -> np.ndarray:
    clip, failure = T.decode_or_reason(data, rules)
    assert failure is None, failure
    assert clip is not None and clip.dtype == np.int16 and clip.shape == (rules.samples,)
    return clip


def reason(data: bytes, rules: T.AudioRules = RULES) -> tuple[str, str]:
    clip, failure = T.decode_or_reason(data, rules)
    assert clip is None and failure is not None
    with pytest.raises(T.BadAudio) as raised:  # decode_audio agrees with decode_or_reason
        T.decode_audio(data, rules)
    assert (raised.value.reason, raised.value.detail) == failure
    return failure


# ---- the zoo: every input is a clip or exactly the expected reason -------------------------

GOOD = {
    "wav16_16k": lambda: encode(tone()),
    "wav24": lambda: encode(tone(), subtype="PCM_24"),
    "wav32_int": lambda: encode(tone(), subtype="PCM_32"),
    "wav8_unsigned": lambda: encode(tone(), subtype="PCM_U8"),
    "wav_8k": lambda: encode(tone(rate=8000), 8000),
    "wav_22k05": lambda: encode(tone(rate=22050), 22050),
    "wav_48k": lambda: encode(tone(rate=48000), 48000),
    "wav_stereo_44k1_float": lambda: encode(np.stack([tone(rate=44100), tone(rate=44100)], 1), 44100, subtype="FLOAT"),
    "wav_streamed_size": lambda: with_data_size(encode(tone()), 0x7FFFF000),  # espeak-ng --stdout
    "flac": lambda: encode(tone(), fmt="FLAC"),
    "flac24_48k": lambda: encode(tone(rate=48000), 48000, fmt="FLAC", subtype="PCM_24"),
    "aiff": lambda: encode(tone(), fmt="AIFF"),
    "ogg_vorbis": pytest.param(lambda: encode(tone(), fmt="OGG", subtype="VORBIS"), marks=needs_vorbis),
}

BAD = {
    "empty": (lambda: b"", T.EMPTY),
    "truncated_wav": (lambda: encode(tone())[:16000], T.TRUNCATED),
    "wav_header_only": (lambda: encode(tone())[:44], T.TRUNCATED),
    "truncated_aiff": (lambda: encode(tone(), fmt="AIFF")[:9000], T.TRUNCATED),
    "truncated_flac": (lambda: encode(tone(seconds=2.0), fmt="FLAC")[:-500], T.TRUNCATED),
    "truncated_flac_metadata": (lambda: encode(tone(), fmt="FLAC")[:60], T.TRUNCATED),
    "text_file": (lambda: b"label,path\nseven,a.wav\n", T.NOT_AUDIO),
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(64), T.NOT_AUDIO),
    "riff_avi": (lambda: b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(64), T.NOT_AUDIO),
    "mp3_id3": (lambda: b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(64), T.UNSUPPORTED),
    "mp3_frame_sync": (lambda: b"\xff\xfb\x90\x64" + bytes(64), T.UNSUPPORTED),
    "m4a": (lambda: b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64), T.UNSUPPORTED),
    "wav_ac3_codec": (lambda: with_wav_tag(encode(tone()), 0x2000), T.UNSUPPORTED),
    "silent_wav": (lambda: encode(np.zeros(16000, np.float32)), T.SILENT),
    "quiet_wav": (lambda: encode(tone(amp=10 ** (-60 / 20))), T.SILENT),
    "too_short_burst": (lambda: encode(burst(0.020)), T.TOO_SHORT),
    "no_samples": (lambda: encode(np.zeros(0, np.float32)), T.TOO_SHORT),
    "nan_float_wav": (lambda: encode(np.full(16000, np.nan, np.float32), subtype="FLOAT"), T.UNREADABLE),
    "corrupt_flac_middle": (lambda: (lambda d: d[:4000] + bytes(300) + d[4300:])(encode(tone(seconds=2.0), fmt="FLAC")),
                            T.UNREADABLE),
    "truncated_ogg": pytest.param(lambda: encode(tone(), fmt="OGG", subtype="VORBIS")[:-300], T.TRUNCATED,
                                  marks=needs_vorbis),
}


@pytest.mark.parametrize("make", GOOD.values(), ids=GOOD.keys())
def test_good_inputs_become_int16_clips(make) -> None:
    clip = decode(make())
    peak = np.abs(clip.astype(np.int32)).max()
    assert 0.45 * 32767 < peak < 0.56 * 32767  # a 0.5 tone stays a 0.5 tone (scaling, 8-bit offset)


@pytest.mark.parametrize(("make", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_inputs_get_exactly_their_reason(make, expected: str) -> None:
    got, detail = reason(make())
    assert got == expected, detail
    assert detail


def test_unsupported_names_the_format() -> None:
    assert "MP3" in reason(BAD["mp3_id3"][0]())[1]
    assert "MP3" in reason(BAD["mp3_frame_sync"][0]())[1]
    assert "MP4/M4A" in reason(BAD["m4a"][0]())[1]
    assert "AC-3" in reason(BAD["wav_ac3_codec"][0]())[1]


def test_too_long_is_decided_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("decoded a too-long file"))
    got, detail = reason(encode(tone(seconds=2.0)), T.AudioRules(max_seconds=1.5))
    assert got == T.TOO_LONG and "2.0 s" in detail


def test_reasons_are_distinct_snake_case() -> None:
    assert len(set(T.REASONS)) == len(T.REASONS)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", r) for r in T.REASONS)
    assert {T.EMPTY, T.NOT_AUDIO, T.UNSUPPORTED, T.TRUNCATED, T.UNREADABLE, T.SILENT, T.TOO_SHORT,
            T.TOO_LONG} <= set(T.REASONS)


@pytest.mark.parametrize(("data", "fmt"), [
    (encode(tone()), "WAV"), (encode(tone(), fmt="FLAC"), "FLAC"), (b"OggS\x00\x02" + bytes(30), "OGG"),
    (encode(tone(), fmt="AIFF"), "AIFF"), (b"FORM\x00\x00\x00\x10AIFC", "AIFF"), (b"RIFF\x00\x00\x00\x00AVI ", None),
    (b"ID3\x04", None), (b"", None), (b"hello", None),
])
def test_sniff_format(data: bytes, fmt: str | None) -> None:
    assert T.sniff_format(data) == fmt


# ---- the signal path: resampling, down-mix, trimming, centring ----------------------------

def test_8k_tone_is_resampled_to_16k_at_the_same_pitch() -> None:
    clip = decode(encode(tone(440.0, rate=8000), 8000))
    spectrum = np.abs(np.fft.rfft(clip.astype(np.float64)))
    freqs = np.fft.rfftfreq(clip.size, d=1 / RULES.sample_rate)
    assert abs(freqs[spectrum.argmax()] - 440.0) <= 5.0


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_common_rates_keep_pitch_and_length(rate: int) -> None:
    clip = decode(encode(tone(1000.0, rate=rate), rate))
    spectrum = np.abs(np.fft.rfft(clip.astype(np.float64)))
    assert abs(np.fft.rfftfreq(clip.size, 1 / RULES.sample_rate)[spectrum.argmax()] - 1000.0) <= 5.0


def test_stereo_downmix_is_the_channel_mean() -> None:
    x, offset = tone(rate=44100), 0.25
    clip = decode(encode(np.stack([x + offset, -x + offset], 1), 44100, subtype="FLOAT"))
    interior = clip[1000:-1000].astype(np.int32)  # resampling filters taper the very edges
    assert np.abs(interior - round(offset * 32767)).max() <= 3


def test_short_tone_is_centre_padded() -> None:
    clip = decode(encode(tone(seconds=0.3)))
    loud = np.flatnonzero(clip)
    assert abs(loud[0] - 5600) <= 10 and abs(loud[-1] - 10400) <= 10
    assert not clip[:5590].any() and not clip[10410:].any()


def test_long_tone_is_centre_cropped() -> None:
    seconds = 2.0
    envelope = np.linspace(0.1, 0.9, round(seconds * 16000), dtype=np.float32)  # amplitude marks the position
    clip = decode(encode(envelope * tone(seconds=seconds, amp=1.0)))
    assert clip.shape == (16000,)
    first, last = (np.abs(part.astype(np.int32)).max() / 32767 for part in (clip[:400], clip[-400:]))
    assert abs(first - 0.3) < 0.02 and abs(last - 0.7) < 0.02  # the middle second: 0.3 .. 0.7


def test_leading_and_trailing_silence_is_trimmed_before_centring() -> None:
    x = np.concatenate([np.zeros(12000, np.float32), tone(seconds=0.5), np.zeros(2000, np.float32)])
    clip = decode(encode(x))
    loud = np.flatnonzero(clip)
    assert abs(loud[0] - 4000) <= 10 and abs(loud[-1] - 12000) <= 10


def test_int16_conversion_clips_out_of_range_floats() -> None:
    clip = decode(encode(tone(amp=1.5), subtype="FLOAT"), T.AudioRules())
    assert clip.max() == 32767 and clip.min() == -32768


# ---- never raising, except on MemoryError -------------------------------------------------

def test_memory_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(sf, "read", out_of_memory)
    with pytest.raises(MemoryError):
        T.decode_or_reason(encode(tone()), RULES)


def test_other_decoder_exceptions_become_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(sf, "read", broken)
    clip, failure = T.decode_or_reason(encode(tone()), RULES)
    assert clip is None and failure is not None
    assert failure[0] == T.UNREADABLE and "decoder bug" in failure[1]


def test_damaged_files_never_raise() -> None:
    rng = np.random.default_rng(7)
    sources = [encode(tone()), encode(tone(), fmt="FLAC"), encode(tone(), fmt="AIFF")]
    if HAS_VORBIS:
        sources.append(encode(tone(), fmt="OGG", subtype="VORBIS"))
    for source in sources:
        for _ in range(15):
            damaged = bytearray(source)
            for at in rng.integers(0, len(damaged), 8):
                damaged[at] = int(rng.integers(0, 256))
            for data in (bytes(damaged), bytes(damaged[: int(rng.integers(1, len(damaged)))])):
                clip, failure = T.decode_or_reason(data, RULES)
                assert (clip is None) != (failure is None)
                if clip is not None:
                    assert clip.dtype == np.int16 and clip.shape == (16000,)
                else:
                    assert failure[0] in T.REASONS


# ---- the espeak-ng spoken-digits generator ------------------------------------------------

@pytest.mark.skipif(not espeak_available(), reason="Debian's espeak-ng is not installed")
def test_digits_folder_layout_voices_and_decoding(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    train, test = ("en-us+m3",), ("en+f2",)
    counts = write_digits_folder(out, train_voices=train, test_voices=test, speeds=(160,), pitches=(50,),
                                 digits=("one", "two"))
    assert counts == {"train": 2, "test": 2}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert files == ["test/one/en-f2_s160_p50.wav", "test/two/en-f2_s160_p50.wav",
                     "train/one/en-us-m3_s160_p50.wav", "train/two/en-us-m3_s160_p50.wav"]
    assert (out / COMPLETE).is_file() and not out.with_name("digits.partial").exists()
    voices = {split: {Path(f).name.split("_")[0] for f in files if f.startswith(split)} for split in ("train", "test")}
    assert voices == {"train": {voice_slug(train[0])}, "test": {voice_slug(test[0])}}
    for f in files:
        clip = T.decode_audio((out / f).read_bytes(), RULES)
        assert clip.dtype == np.int16 and clip.shape == (16000,) and np.abs(clip.astype(np.int32)).max() > 3000
    assert write_digits_folder(out, train_voices=("nonexistent",)) == counts  # marker present: a no-op


@pytest.mark.skipif(not espeak_available(), reason="Debian's espeak-ng is not installed")
def test_digits_folder_refuses_a_test_voice_heard_in_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unheard"):
        write_digits_folder(tmp_path / "d", train_voices=("en-us+m3",), test_voices=("en-us+m3",), digits=("one",))
