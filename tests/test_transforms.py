"""Pure transforms: bytes -> tensor or a quarantine reason; no Spark needed."""

import numpy as np
import pytest

from deepspark.layout import assign_split
from deepspark.modality import TensorSpec, decode_raw_arrow
from pipelines.images import transforms as T
from pipelines.images.modality import IMAGE
from tests.conftest import _zoo, encode, gray

RULES = T.ImageRules(height=28, width=28, channels=1, max_pixels=1_000_000, min_side=8)


@pytest.mark.parametrize("name", sorted(_zoo()))
def test_zoo_file_gets_its_reason(name):
    data, reason = _zoo()[name]
    if name == "stray.png":  # only the layout makes it bad
        reason = None
    if reason is None:
        out = T.decode_image(data, RULES)
        assert out.shape == (28, 28, 1) and out.dtype == np.uint8
        reference, tolerance = _odd_reference(name)
        # Mean absolute difference from the same picture stored plainly (lossless 8-bit gray, or
        # the 16-bit samples' high bytes): 0 for lossless inputs, JPEG's own loss for JPEGs; an
        # all-zero or garbled decode is ~80-100 away.
        assert np.abs(out[:, :, 0].astype(int) - reference.astype(int)).mean() <= tolerance, name
    else:
        with pytest.raises(T.BadImage) as bad:
            T.decode_image(data, RULES)
        assert bad.value.reason == reason


def _odd_reference(name: str) -> tuple[np.ndarray, float]:
    """What a correct decode of a zoo file gives, computed without the decoder's colour handling."""
    from PIL import Image

    rgb = np.random.default_rng(7).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)  # as in _zoo
    plain_gray = T.decode_image(encode(np.asarray(Image.fromarray(rgb).convert("L")), "PNG"), RULES)[:, :, 0]
    wide = np.random.default_rng(8).integers(0, 65536, size=(28, 28)).astype(np.uint16)
    return {
        "train/Coat/cmyk.jpg": (plain_gray, 4.0),  # measured 1.4
        "train/Coat/rgba.png": (plain_gray, 0.0),  # alpha dropped, colour converted exactly
        "train/Coat/gray.jpg": (T.decode_image(encode(rgb[:, :, 0], "PNG"), RULES)[:, :, 0], 4.0),  # measured 1.9
        "train/Coat/sixteen.png": ((wide >> 8).astype(np.uint8), 0.0),  # scaled to 8 bits, not clipped
        "stray.png": (gray(99), 0.0),
    }[name]


def test_same_size_image_keeps_exact_pixels():
    pixels = gray(3)
    assert np.array_equal(T.decode_image(encode(pixels, "PNG"), RULES)[:, :, 0], pixels)


def test_sixteen_bit_is_scaled_not_clipped():
    wide = np.full((28, 28), 0xABCD, np.uint16)
    out = T.decode_image(encode(wide, "PNG"), RULES)
    assert int(out.max()) == 0xAB


@pytest.mark.parametrize("mode,expected", [("pad", (0, 0)), ("crop", (255, 255))])
def test_pad_and_crop_keep_aspect(mode, expected):
    tall = np.full((56, 28), 255, np.uint8)  # 2:1 portrait, all white
    out = T.fit(tall[:, :, None], T.ImageRules(28, 28, 1, resize_mode=mode))
    assert out.shape == (28, 28, 1)
    assert (int(out[14, 0, 0]), int(out[14, 27, 0])) == expected  # pad: black side bars; crop: none
    assert int(out[14, 14, 0]) == 255


def test_rgb_target_from_gray_source():
    out = T.decode_image(encode(gray(4), "PNG"), T.ImageRules(28, 28, 3))
    assert out.shape == (28, 28, 3) and np.array_equal(out[:, :, 0], out[:, :, 2])


def test_split_is_deterministic_and_follows_fractions():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    paths = [f"Coat/{i}.png" for i in range(5000)]
    first = [assign_split(p, 17, fractions) for p in paths]
    assert first == [assign_split(p, 17, fractions) for p in paths]
    share = first.count("train") / len(first)
    assert 0.77 < share < 0.83
    assert first != [assign_split(p, 18, fractions) for p in paths]  # the seed matters


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_storage_round_trip(encoding):
    spec = TensorSpec("image", (28, 28, 1), "uint8", encoding)
    batch = [gray(i)[:, :, None] for i in range(5)]
    stored = [IMAGE.encode(p, spec) for p in batch]
    assert np.array_equal(IMAGE.decode(stored, spec), np.stack(batch))


def test_encode_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected uint8"):
        IMAGE.encode(np.zeros((28, 27, 1), np.uint8), TensorSpec("image", (28, 28, 1), "uint8"))


def test_arrow_column_decodes_without_per_row_objects():
    import pyarrow as pa

    spec = TensorSpec("image", (28, 28, 1), "uint8")
    batch = [gray(i)[:, :, None] for i in range(6)]
    column = pa.chunked_array([[IMAGE.encode(p, spec) for p in batch[:4]], [IMAGE.encode(p, spec) for p in batch[4:]]])
    assert np.array_equal(decode_raw_arrow(column, spec), np.stack(batch))
    assert np.array_equal(decode_raw_arrow(column.chunk(0).slice(1, 2), spec), np.stack(batch[1:3]))
    with pytest.raises(ValueError, match="do not match"):
        decode_raw_arrow(pa.array([b"short"]), spec)


def test_arrow_column_of_wider_dtypes_keeps_values():
    import pyarrow as pa

    spec = TensorSpec("tokens", (4,), "int32")
    rows = [np.array([2, 70_000, 0, -1], np.int32), np.array([5, 6, 7, 8], np.int32)]
    column = pa.array([r.tobytes() for r in rows], pa.binary())
    assert np.array_equal(decode_raw_arrow(column, spec), np.stack(rows))


def test_decode_or_reason_never_raises():
    pixels, failure = T.decode_or_reason(encode(gray(1), "PNG"), RULES)
    assert failure is None and pixels.shape == (28, 28, 1)
    assert T.decode_or_reason(b"", RULES) == (None, (T.EMPTY, "0 bytes"))
    broken_rules = T.ImageRules(28, 28, 2)  # 2 channels: PIL cannot reshape, a decoder-level bug
    pixels, failure = T.decode_or_reason(encode(gray(1), "PNG"), broken_rules)
    assert pixels is None and failure[0] == T.UNREADABLE and "Error" in failure[1]
