"""Pure audio transforms: file bytes -> validated, fixed-length mono int16 clip, or a reason why not.

No Spark and no TensorFlow here: the ETL, the inference UDF and the tests all call these same
functions. Decoding is libsndfile (via `soundfile`), which silently returns whatever samples a
cut-off file still holds, so truncation is detected from the container structure (RIFF/AIFF chunk
sizes, Ogg pages, the last FLAC frame's CRC) rather than from decoder errors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from math import gcd
from types import MappingProxyType
from typing import Literal

import numpy as np

from deepspark.modality import EMPTY, NO_LABEL, UNREADABLE, BadInput, or_reason

# Quarantine reasons; each bad file gets exactly one (EMPTY, UNREADABLE, NO_LABEL are shared).
NOT_AUDIO = "not_audio"
UNSUPPORTED = "unsupported_format"
TRUNCATED = "truncated"
SILENT = "silent"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
REASONS = (EMPTY, NOT_AUDIO, UNSUPPORTED, TRUNCATED, UNREADABLE, SILENT, TOO_SHORT, TOO_LONG, NO_LABEL)

# Audio (or audio-carrying) formats we recognise but do not decode: a clear "unsupported_format"
# row tells the user to convert them, where "not_audio" would suggest a stray file.
_UNSUPPORTED_MAGIC = (
    (b"ID3", "MP3 (ID3v2 tag)"),
    (b"\xff\xfb", "MP3"),
    (b"\xff\xf3", "MP3"),
    (b"\xff\xf2", "MP3"),
    (b"\xff\xfa", "MP3"),
    (b"\xff\xf1", "AAC (ADTS)"),
    (b"\xff\xf9", "AAC (ADTS)"),
    (b"RF64", "RF64 (64-bit WAV)"),
    (b".snd", "AU"),
    (b"caff", "CAF"),
    (b"#!AMR", "AMR"),
    (b"wvpk", "WavPack"),
    (b"MAC ", "Monkey's Audio"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMA"),
)
# Data-chunk sizes written by streaming encoders that cannot seek back (espeak-ng --stdout,
# ffmpeg/sox to a pipe): "length unknown", not a truncation.
_STREAMED_SIZES = frozenset({0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000})
# WAV format tags libsndfile decodes; for any other it reports a misleading "Malformed 'fmt '
# chunk", so a refused file with another tag is UNSUPPORTED, named where we know the codec.
_WAV_CODECS = frozenset({0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0x0040, 0x0050, 0x0055, 0xFFFE})
_WAV_CODEC_NAMES = MappingProxyType({0x00FF: "AAC", 0x0160: "WMA", 0x0161: "WMA", 0x0162: "WMA Pro", 0x1610: "AAC",
                                     0x2000: "AC-3", 0x2001: "DTS"})
_INT16_SCALE = 32767.0


class BadAudio(BadInput):
    """A file that cannot become a training row; `reason` is one of REASONS."""


@dataclass(frozen=True)
class AudioRules:
    """Target clip and the limits a source file must respect."""

    sample_rate: int = 16000  # target rate after resampling
    seconds: float = 1.0  # fixed clip length after trimming/padding
    silence_db: float = -50.0  # whole clip's peak below this dBFS -> SILENT
    trim_db: float = -40.0  # leading/trailing samples below this dBFS are trimmed
    min_seconds: float = 0.1  # non-silent part shorter than this -> TOO_SHORT
    max_seconds: float = 600.0  # source longer than this -> TOO_LONG (from the header, before decoding)

    @property
    def samples(self) -> int:
        return round(self.sample_rate * self.seconds)


def sniff_format(data: bytes) -> str | None:
    """Decodable format from magic bytes, before any decoder touches the data."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "WAV"
    if data.startswith(b"fLaC"):
        return "FLAC"
    if data.startswith(b"OggS"):
        return "OGG"
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    return None


def unsupported_format(data: bytes) -> str | None:
    """Name of a recognised but undecodable audio format (MP3, MP4/M4A, ...), else None."""
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        return f"MP4/M4A (brand {brand!r})"
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    return None


def _find_chunk(data: bytes, byteorder: Literal["little", "big"], chunk: bytes) -> int:
    """Offset of a RIFF/IFF chunk's id, or -1."""
    pos = 12
    while pos + 8 <= len(data):
        if data[pos : pos + 4] == chunk:
            return pos
        size = int.from_bytes(data[pos + 4 : pos + 8], byteorder)
        pos += 8 + size + (size & 1)
    return data.find(chunk, 12)  # odd-sized chunks written without padding derail the walk


def _chunk_truncation(data: bytes, byteorder: Literal["little", "big"], chunk: bytes) -> str | None:
    """RIFF/IFF: does the sample chunk declare more bytes than the file holds? libsndfile would
    just read the remainder, turning a half-uploaded file into a plausible short clip."""
    found, name = _find_chunk(data, byteorder, chunk), chunk.decode("ascii").strip()
    if found < 0 or found + 8 > len(data):
        return f"file ends before the {name!r} chunk"
    size = int.from_bytes(data[found + 4 : found + 8], byteorder)
    held = len(data) - found - 8
    if size > held and size not in _STREAMED_SIZES:
        return f"{name!r} chunk declares {size} bytes, file holds {held}"
    return None


def _wav_codec(data: bytes) -> int | None:
    """The WAV 'fmt ' chunk's format tag (1 = PCM, 3 = float, 0x55 = MP3, ...)."""
    found = _find_chunk(data, "little", b"fmt ")
    return int.from_bytes(data[found + 8 : found + 10], "little") if 0 <= found <= len(data) - 10 else None


def _ogg_truncation(data: bytes) -> str | None:
    """Ogg: a page running past the end, or a stream whose last page lacks the end-of-stream
    flag. (libsndfile reports a cut Ogg/Vorbis as 0 frames, without an error.)"""
    pos, last_flags = 0, -1
    while pos < len(data) and data[pos : pos + 4] == b"OggS":
        if pos + 27 > len(data):
            return f"page header at byte {pos} is cut"
        segments = data[pos + 26]
        table = data[pos + 27 : pos + 27 + segments]
        if len(table) < segments:
            return f"page header at byte {pos} is cut"
        size = 27 + segments + sum(table)
        if pos + size > len(data):
            return f"page at byte {pos} declares {size} bytes, file holds {len(data) - pos}"
        last_flags, pos = data[pos + 5], pos + size
    if 0 < len(data) - pos < 4 and b"OggS".startswith(data[pos:]):
        return f"page header at byte {pos} is cut"
    if pos >= len(data) and last_flags >= 0 and not last_flags & 0x04:
        return "last page has no end-of-stream flag"
    return None  # walked off into trailing junk or corruption: not detectably a cut


def _crc(data: bytes, poly: int, width: int) -> int:
    """MSB-first CRC with zero init (FLAC's CRC-8 and CRC-16); only runs on a failing file."""
    top, mask, crc = 1 << (width - 1), (1 << width) - 1, 0
    for byte in data:
        crc ^= byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
    return crc


def _flac_frame_header(data: bytes, at: int) -> tuple[int, int, bool] | None:
    """(coded frame/sample number, block size, variable-blocksize?) of a CRC-8-valid frame header."""
    h = data[at : at + 16]
    if len(h) < 6 or h[0] != 0xFF or h[1] & 0xFE != 0xF8:
        return None
    bs_code, sr_code, channels, reserved = h[2] >> 4, h[2] & 0x0F, h[3] >> 4, h[3] & 0x01
    if bs_code == 0 or sr_code == 0x0F or channels > 10 or reserved or (h[3] >> 1) & 0x07 == 3:
        return None
    p, first = 4, h[4]
    if first < 0x80:
        number, p = first, 5
    else:
        ones = 8 - (~first & 0xFF).bit_length()  # leading 1 bits = UTF-8-style length
        if not 2 <= ones <= 7 or len(h) < 4 + ones:
            return None
        number = first & (0x7F >> ones)
        for c in h[5 : 4 + ones]:
            if c & 0xC0 != 0x80:
                return None
            number = (number << 6) | (c & 0x3F)
        p = 4 + ones
    if p + 3 > len(h):  # room for the longest block-size and sample-rate fields plus CRC-8
        return None
    if bs_code == 6:
        block, p = h[p] + 1, p + 1
    elif bs_code == 7:
        block, p = int.from_bytes(h[p : p + 2], "big") + 1, p + 2
    else:
        block = 192 if bs_code == 1 else 576 << (bs_code - 2) if bs_code <= 5 else 256 << (bs_code - 8)
    p += 1 if sr_code == 12 else 2 if sr_code in (13, 14) else 0
    if p >= len(h) or _crc(h[:p], 0x07, 8) != h[p]:
        return None
    return number, block, bool(h[1] & 0x01)


def _flac_truncation(data: bytes) -> str | None:
    """FLAC: metadata cut short, the last frame failing its CRC-16 (cut mid-frame), or the last
    frame ending before STREAMINFO's sample count (cut on a frame boundary). A file whose end is
    intact but whose middle is damaged is not a truncation."""
    pos, streaminfo = 4, b""
    while True:
        if pos + 4 > len(data):
            return "file ends inside the metadata"
        kind, length = data[pos], int.from_bytes(data[pos + 1 : pos + 4], "big")
        if pos + 4 + length > len(data):
            return f"metadata block {kind & 0x7F} declares {length} bytes, file holds {len(data) - pos - 4}"
        if kind & 0x7F == 0:
            streaminfo = data[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind & 0x80:
            break
    if pos >= len(data):
        return "no audio frames after the metadata"
    end, header, start = len(data), None, -1
    for _ in range(1000):  # the last real frame header; false syncs fail the CRC-8
        start = max(data.rfind(b"\xff\xf8", pos, end), data.rfind(b"\xff\xf9", pos, end))
        if start < 0:
            return None
        header = _flac_frame_header(data, start)
        if header is not None:
            break
        end = start + 1
    if header is None:
        return None
    if _crc(data[start:-2], 0x8005, 16) != int.from_bytes(data[-2:], "big"):
        return f"last frame (byte {start}) is cut"
    number, block, variable = header
    if len(streaminfo) >= 18:
        total = int.from_bytes(streaminfo[10:18], "big") & ((1 << 36) - 1)
        first = number if variable else number * int.from_bytes(streaminfo[2:4], "big")
        if total and first + block < total:
            return f"frames end at sample {first + block} of {total}"
    return None


def _container_truncation(fmt: str, data: bytes) -> str | None:
    if fmt == "WAV":
        return _chunk_truncation(data, "little", b"data")
    if fmt == "AIFF":
        return _chunk_truncation(data, "big", b"SSND")
    if fmt == "OGG":
        return _ogg_truncation(data)
    return None  # FLAC is only checked once its decoder fails (the CRC check costs a Python loop)


def _decoder_failure(fmt: str, data: bytes, where: str, exc: Exception) -> BadAudio:
    """A libsndfile error becomes TRUNCATED when the structure shows a cut, else UNREADABLE."""
    message = getattr(exc, "error_string", None) or str(exc)  # without the BytesIO's address
    cut = _flac_truncation(data) if fmt == "FLAC" else None
    if cut:
        return BadAudio(TRUNCATED, f"{fmt}: {cut} ({message})")
    codec = _wav_codec(data) if fmt == "WAV" else None
    if codec is not None and codec not in _WAV_CODECS:
        name = _WAV_CODEC_NAMES.get(codec, "codec")
        return BadAudio(UNSUPPORTED, f"WAV with {name} data (format tag {codec:#06x}); convert to PCM")
    return BadAudio(UNREADABLE, f"{fmt} {where}: {message}")


def _read(data: bytes, fmt: str, rules: AudioRules) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the source rate; the duration is checked from the header
    first, so a 3-hour recording is rejected without being decoded into memory."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as header:
            frames, rate = header.frames, header.samplerate
    except MemoryError:
        raise
    except Exception as exc:
        raise _decoder_failure(fmt, data, "header", exc) from None
    if rate <= 0:
        raise BadAudio(UNREADABLE, f"{fmt} header: sample rate {rate}")
    if frames / rate > rules.max_seconds:
        raise BadAudio(TOO_LONG, f"{frames / rate:.1f} s > {rules.max_seconds:g} s")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except MemoryError:
        raise
    except Exception as exc:
        raise _decoder_failure(fmt, data, "data", exc) from None
    if len(samples) < frames:
        cut = (_flac_truncation(data) if fmt == "FLAC" else None) or "decoder stopped early"
        raise BadAudio(TRUNCATED, f"{fmt}: {cut}; decoded {len(samples)} of {frames} frames")
    return samples, int(rate)


def resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling with up/down reduced by their gcd (44.1 kHz -> 16 kHz is 160/441)."""
    if rate == target:
        return mono
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(mono, target // g, rate // g).astype(np.float32)


def fit(mono: np.ndarray, rules: AudioRules) -> np.ndarray:
    """Silence check, trim, length check, then centre-crop or centre-pad to rules.samples, int16."""
    if mono.size == 0:
        raise BadAudio(TOO_SHORT, "no samples")
    peak = float(np.max(np.abs(mono)))
    peak_db = 20.0 * np.log10(peak) if peak > 0 else -np.inf
    if peak_db < rules.silence_db:
        raise BadAudio(SILENT, f"peak {peak_db:.1f} dBFS < {rules.silence_db:g} dBFS")
    loud = np.flatnonzero(np.abs(mono) >= 10.0 ** (rules.trim_db / 20.0))
    kept = mono[loud[0] : loud[-1] + 1] if loud.size else mono[:0]
    if kept.size < rules.min_seconds * rules.sample_rate:
        raise BadAudio(TOO_SHORT, f"{kept.size / rules.sample_rate:.3f} s above {rules.trim_db:g} dBFS "
                                  f"< {rules.min_seconds:g} s")
    target = rules.samples
    if kept.size >= target:
        start = (kept.size - target) // 2
        clip = kept[start : start + target]
    else:
        clip = np.zeros(target, dtype=np.float32)
        left = (target - kept.size) // 2
        clip[left : left + kept.size] = kept
    return np.clip(np.round(clip * _INT16_SCALE), -32768, 32767).astype(np.int16)


def decode_audio(data: bytes, rules: AudioRules) -> np.ndarray:
    """File bytes -> (rules.samples,) int16 mono clip at rules.sample_rate, or BadAudio with the reason."""
    if not data:
        raise BadAudio(EMPTY, "0 bytes")
    fmt = sniff_format(data)
    if fmt is None:
        other = unsupported_format(data)
        if other is not None:
            raise BadAudio(UNSUPPORTED, other)
        raise BadAudio(NOT_AUDIO, f"unknown signature {data[:12].hex()}")
    cut = _container_truncation(fmt, data)
    if cut:
        raise BadAudio(TRUNCATED, f"{fmt}: {cut}")
    samples, rate = _read(data, fmt, rules)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise BadAudio(UNREADABLE, f"{fmt}: NaN or infinite samples")
    return fit(resample(mono, rate, rules.sample_rate), rules)


def decode_or_reason(data: bytes, rules: AudioRules) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """`decode_audio` that never raises on bad data: (clip, None) or (None, (reason, detail)).
    One bad file, or a decoder bug, becomes a quarantine row; MemoryError propagates, since a
    transient failure must not become a permanent quarantine row."""
    return or_reason(lambda payload: decode_audio(payload, rules), data)
