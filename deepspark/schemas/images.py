"""The image modality's schema: one definition for the ETL writer, the training loader
and the inference UDF, so what is trained on is exactly what is served.

Pixels are stored as one binary column per row: either the raw uint8 tensor in
(height, width, channels) C order (`raw`), or a PNG of it (`png`). A batch of raw rows
decodes with one `np.frombuffer` + reshape; `benchmarks/README.md` has the numbers
that made `raw` the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

if TYPE_CHECKING:
    from petastorm.unischema import Unischema

Encoding = Literal["raw", "png"]

IMAGE = "image"
LABEL = "label"
LABEL_NAME = "label_name"
PATH = "path"
CONTENT_HASH = "content_hash"

DATA_COLUMNS = (IMAGE, LABEL, LABEL_NAME, PATH, CONTENT_HASH)
QUARANTINE_COLUMNS = ("path", "size", "reason", "detail")

# Spark DDL of a written row, in the Unischema's field order.
ROW_DDL = f"{IMAGE} binary, {LABEL} int, {LABEL_NAME} string, {PATH} string, {CONTENT_HASH} string"
QUARANTINE_DDL = "path string, size long, reason string, detail string"


@dataclass(frozen=True)
class ImageSpec:
    """Shape and storage of the image tensor, recorded in every dataset's manifest."""

    height: int
    width: int
    channels: int
    encoding: Encoding = "raw"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def raw_bytes(self) -> int:
        return self.height * self.width * self.channels

    def to_dict(self) -> dict[str, object]:
        return {"height": self.height, "width": self.width, "channels": self.channels, "encoding": self.encoding}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "ImageSpec":
        return cls(int(data["height"]), int(data["width"]), int(data["channels"]), data["encoding"])  # type: ignore[arg-type]


def encode_pixels(pixels: np.ndarray, spec: ImageSpec) -> bytes:
    """(H, W, C) uint8 -> the stored bytes."""
    if pixels.shape != spec.shape or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 {spec.shape}, got {pixels.dtype} {pixels.shape}")
    if spec.encoding == "raw":
        return np.ascontiguousarray(pixels).tobytes()
    import cv2

    ok, buf = cv2.imencode(".png", pixels if spec.channels == 1 else pixels[:, :, ::-1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_pixels(values: Sequence[bytes], spec: ImageSpec) -> np.ndarray:
    """Stored bytes of a batch -> (N, H, W, C) uint8, one copy for raw storage."""
    if spec.encoding == "raw":
        joined = b"".join(values)
        if len(joined) != len(values) * spec.raw_bytes:
            raise ValueError(f"raw image bytes do not match shape {spec.shape}")
        return np.frombuffer(joined, dtype=np.uint8).reshape((len(values), *spec.shape))
    import cv2

    out = np.empty((len(values), *spec.shape), dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
    for i, value in enumerate(values):
        img = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), flag)
        out[i] = img.reshape(spec.shape) if spec.channels == 1 else img[:, :, ::-1]
    return out


def decode_arrow_column(column: "object", spec: ImageSpec) -> np.ndarray:
    """A pyarrow (chunked) binary column of raw tensors -> (N, H, W, C) uint8 without creating a
    Python object per row: the values buffer already holds the rows back to back."""
    import pyarrow as pa

    if spec.encoding != "raw":
        return decode_pixels(column.to_pylist(), spec)  # type: ignore[attr-defined]
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if len(chunk) and not np.all(np.diff(offsets) == spec.raw_bytes):
            raise ValueError(f"raw image bytes do not match shape {spec.shape}")
        values = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        parts.append(values.reshape((len(chunk), *spec.shape)))
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def unischema(spec: ImageSpec) -> "Unischema":
    """The Petastorm Unischema of a dataset written with `spec`."""
    from petastorm.codecs import ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    return Unischema(
        f"DeepSparkImages_{spec.encoding}_{spec.height}x{spec.width}x{spec.channels}",
        [
            UnischemaField(IMAGE, np.bytes_, (), ScalarCodec(BinaryType()), False),
            UnischemaField(LABEL, np.int32, (), ScalarCodec(IntegerType()), False),
            UnischemaField(LABEL_NAME, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(PATH, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(CONTENT_HASH, np.str_, (), ScalarCodec(StringType()), False),
        ],
    )
