"""Pure image transforms: file bytes -> validated, resized uint8 tensor, or a reason why not.

No Spark here: the ETL's pandas UDF, the inference UDF and the benchmark's
multiprocessing limit all call these same functions, so tests need no Spark.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deepspark.modality import EMPTY, NO_LABEL, UNREADABLE, BadInput, or_reason

ResizeMode = Literal["pad", "crop", "stretch"]

# Quarantine reasons; each bad file gets exactly one (EMPTY, UNREADABLE, NO_LABEL are shared).
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNSUPPORTED_MODE = "unsupported_mode"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
REASONS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, UNREADABLE, UNSUPPORTED_MODE, TOO_MANY_PIXELS, TOO_SMALL, NO_LABEL)

# Magic numbers of the formats we accept; anything else is not an image.
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}
SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES}


class BadImage(BadInput):
    """A file that cannot become a training row; `reason` is one of REASONS."""


@dataclass(frozen=True)
class ImageRules:
    """Target tensor and the limits a source image must respect."""

    height: int
    width: int
    channels: int
    resize_mode: ResizeMode = "pad"
    max_pixels: int = 40_000_000
    min_side: int = 8
    encoding: Literal["raw", "png"] = "raw"  # how the tensor is stored (raw: see benchmarks/README.md)


def sniff_format(data: bytes) -> str | None:
    """Format from magic bytes, before any decoder touches the data."""
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _to_array(img: "object", fmt: str, channels: int) -> np.ndarray:
    """PIL image of any supported mode -> (H, W, channels) uint8."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode in SIXTEEN_BIT_MODES:
        if fmt != "PNG" and img.mode == "I":
            raise BadImage(UNSUPPORTED_MODE, f"32-bit integer {fmt}")
        wide = np.asarray(img).astype(np.uint32)
        gray = (wide >> 8).clip(0, 255).astype(np.uint8)  # 16-bit -> 8-bit by scaling, not clipping
        img = Image.fromarray(gray, mode="L")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def fit(pixels: np.ndarray, rules: ImageRules) -> np.ndarray:
    """Resize (H, W, C) to the target: `pad` letterboxes, `crop` centre-crops, `stretch` ignores aspect."""
    import cv2

    h, w = pixels.shape[:2]
    th, tw = rules.height, rules.width
    if (h, w) == (th, tw):
        return pixels
    if rules.resize_mode == "stretch":
        sh, sw = th, tw
    else:
        scale = min(th / h, tw / w) if rules.resize_mode == "pad" else max(th / h, tw / w)
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if sh * sw < h * w else cv2.INTER_LINEAR
    resized = cv2.resize(pixels, (sw, sh), interpolation=interp).reshape(sh, sw, rules.channels)
    if (sh, sw) == (th, tw):
        return resized
    out = np.zeros((th, tw, rules.channels), dtype=np.uint8)
    if rules.resize_mode == "pad":
        top, left = (th - sh) // 2, (tw - sw) // 2
        out[top : top + sh, left : left + sw] = resized
    else:
        top, left = (sh - th) // 2, (sw - tw) // 2
        out[:] = resized[top : top + th, left : left + tw]
    return out


def decode_image(data: bytes, rules: ImageRules) -> np.ndarray:
    """File bytes -> (height, width, channels) uint8, or BadImage with the reason."""
    from PIL import Image, ImageOps

    if not data:
        raise BadImage(EMPTY, "0 bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImage(NOT_AN_IMAGE, f"unknown signature {data[:8].hex()}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
    except Exception as exc:  # header does not parse
        raise BadImage(UNREADABLE, f"{fmt} header: {exc}") from None
    w, h = img.size
    if w * h > rules.max_pixels:
        raise BadImage(TOO_MANY_PIXELS, f"{w}x{h} > {rules.max_pixels} pixels")
    if min(w, h) < rules.min_side:
        raise BadImage(TOO_SMALL, f"{w}x{h}, min side {rules.min_side}")
    if img.mode not in SUPPORTED_MODES:
        raise BadImage(UNSUPPORTED_MODE, f"{fmt} mode {img.mode}")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        reason = TRUNCATED if "truncated" in str(exc) else UNREADABLE
        raise BadImage(reason, f"{fmt}: {exc}") from None
    if fmt in ("JPEG", "TIFF", "WEBP"):
        img = ImageOps.exif_transpose(img)
    return fit(_to_array(img, fmt, rules.channels), rules)


def decode_or_reason(data: bytes, rules: ImageRules) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """`decode_image` that never raises on bad data (ETL and inference alike)."""
    return or_reason(lambda payload: decode_image(payload, rules), data)
