"""Fuzzing the image and DICOM decoders (issue 15): bounded hypothesis runs, reproducible in CI.

The property, for arbitrary bytes, mutated valid PNG/JPEG/BMP/TIFF files and mutated valid DICOM
files (flipped bytes, truncation, random values on the attributes the reader interprets):
`decode_image` / `read_dicom` either return uint8 pixels within the size rules of
lungcad.data.images (MAX_PIXELS, MAX_ASPECT) or raise the project's own one-line error
(ImageReadError / DicomReadError, both LungcadError) - never another exception, never a hang
(pytest-timeout), and never more memory than the size rules allow (checked on the outputs and on
the process's peak resident size).

Derandomized with a fixed example count: the same inputs on every run. A failing input found here
is fixed in the decoder and kept below as an explicit @example.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lungcad.data.images import MAX_ASPECT, MAX_PIXELS, ImageReadError, decode_image
from lungcad.errors import LungcadError

# Per test; a few seconds each. LUNGCAD_FUZZ_EXAMPLES=20000 for a longer (still derandomized) run.
EXAMPLES = int(os.environ.get("LUNGCAD_FUZZ_EXAMPLES", "300"))
TIMEOUT = 240 * max(1, EXAMPLES // 300)  # s per test: catches a hang, not a slow shared machine
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                # bounded_memory is meant to span all examples of a test (a whole-run peak)
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
PEAK_GROWTH_MB = 1024  # the decoders' whole-run addition to the process's peak RSS


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


@pytest.fixture
def bounded_memory():
    before = peak_rss_mb()
    yield
    grown = peak_rss_mb() - before
    assert grown < PEAK_GROWTH_MB, f"decoding raised the peak resident size by {grown:.0f} MB"


def check_pixels(arr: np.ndarray, colour: str | None = None) -> None:
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
    assert arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3), arr.shape
    if colour == "grey":
        assert arr.ndim == 2
    elif colour == "rgb":
        assert arr.ndim == 3
    h, w = arr.shape[:2]
    assert h >= 1 and w >= 1 and h * w <= MAX_PIXELS
    assert max(h, w) <= MAX_ASPECT * min(h, w)


# ---------------------------------------------------------------- images


def _encoded(fmt: str, mode: str, size: tuple[int, int] = (40, 36), **kw) -> bytes:
    rng = np.random.default_rng(len(fmt) * 7 + len(mode))
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}.get(mode)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        arr = rng.integers(0, 255, (*size[::-1], channels), dtype=np.uint8)
        im = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


SEEDS = [
    _encoded("PNG", "L"), _encoded("PNG", "RGBA"), _encoded("PNG", "I;16"), _encoded("PNG", "LA"),
    _encoded("JPEG", "L"), _encoded("JPEG", "RGB", quality=80), _encoded("JPEG", "RGB", progressive=True),
    _encoded("BMP", "RGB"), _encoded("TIFF", "L"), _encoded("TIFF", "RGB", compression="tiff_lzw"),
    _encoded("GIF", "L"),
]


def png_with_size(width: int, height: int, raw: bytes = SEEDS[0]) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) over the seed's pixel data."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + raw[33:]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few random edits: flipped/overwritten bytes, an inserted or deleted run, truncation."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def assert_decodes_or_refuses(raw: bytes, colour: str) -> None:
    try:
        arr = decode_image(raw, colour, name="fuzz.img")
    except ImageReadError as exc:
        assert "fuzz.img: " in str(exc) and "\n" not in str(exc)
        return
    check_pixels(arr, colour)


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(raw=st.one_of(st.binary(max_size=2048), mutated(SEEDS)), colour=st.sampled_from(["grey", "rgb", "auto"]))
@example(raw=png_with_size(50000, 2), colour="grey")  # issue 15: a 185-byte PNG claiming 50000x2 px
@example(raw=png_with_size(30000, 30000), colour="grey")  # decompression bomb by header
@example(raw=png_with_size(0, 0), colour="grey")
@example(raw=b"", colour="rgb")
def test_decode_image_returns_bounded_uint8_or_its_own_error(raw, colour, bounded_memory):
    assert_decodes_or_refuses(raw, colour)


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), raw=st.sampled_from(SEEDS[:4]))
def test_decode_image_refuses_any_declared_size_it_cannot_afford(width, height, raw, bounded_memory):
    """The IHDR's declared size is checked before decoding, whatever it says."""
    assert_decodes_or_refuses(png_with_size(width, height, raw), "grey")


# ---------------------------------------------------------------- DICOM

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402

from lungcad.dicom.reader import DicomReadError, read_dicom  # noqa: E402


def _base_dicom() -> bytes:
    """pydicom's CT_small.dcm (128x128, 16 bit) in explicit VR little endian, with a VOI window."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.NumberOfFrames = "1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BASE_DICOM = _base_dicom()


def _rgb_with_one_sample() -> bytes:
    """PhotometricInterpretation RGB over 8-bit samples with SamplesPerPixel still 1."""
    raw = BASE_DICOM
    for keyword, value in (("PhotometricInterpretation", b"RGB "), ("BitsAllocated", struct.pack("<H", 8)),
                           ("BitsStored", struct.pack("<H", 8)), ("HighBit", struct.pack("<H", 7))):
        raw = with_value(raw, keyword, value)
    return raw


def _no_pixels(sop_class) -> bytes:
    """No PixelData, and `sop_class` as the SOPClassUID the error message names."""
    ds = pydicom.dcmread(io.BytesIO(BASE_DICOM))
    del ds.PixelData
    ds.SOPClassUID = sop_class
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
# The attributes read_dicom interprets: (group, element) -> VR in the explicit-VR encoding above.
ATTRIBUTES = {
    "Rows": ((0x0028, 0x0010), b"US"), "Columns": ((0x0028, 0x0011), b"US"),
    "BitsAllocated": ((0x0028, 0x0100), b"US"), "BitsStored": ((0x0028, 0x0101), b"US"),
    "HighBit": ((0x0028, 0x0102), b"US"), "PixelRepresentation": ((0x0028, 0x0103), b"US"),
    "SamplesPerPixel": ((0x0028, 0x0002), b"US"),
    "PhotometricInterpretation": ((0x0028, 0x0004), b"CS"), "Modality": ((0x0008, 0x0060), b"CS"),
    "NumberOfFrames": ((0x0028, 0x0008), b"IS"), "InstanceNumber": ((0x0020, 0x0013), b"IS"),
    "RescaleSlope": ((0x0028, 0x1053), b"DS"), "RescaleIntercept": ((0x0028, 0x1052), b"DS"),
    "WindowCenter": ((0x0028, 0x1050), b"DS"), "WindowWidth": ((0x0028, 0x1051), b"DS"),
}


def with_value(raw: bytes, keyword: str, value: bytes) -> bytes:
    """The file with one attribute's raw value replaced (pydicom would refuse to write most of these)."""
    (group, elem), vr = ATTRIBUTES[keyword]
    tag = struct.pack("<HH", group, elem) + vr
    start = raw.find(tag)
    if start < 0:
        return raw
    length = struct.unpack("<H", raw[start + 6 : start + 8])[0]
    value = value[:0xFFFF]
    return raw[:start] + tag + struct.pack("<H", len(value)) + value + raw[start + 8 + length :]


NUMBER_TEXT = st.one_of(
    st.sampled_from([b"abc", b"inf", b"-inf", b"nan", b"1e999", b"-1e999", b"0", b"-0", b"1\\2", b"\\", b" ", b"",
                     b"1e-320", b"9" * 16, b"\x00\x00", b"1,5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode()[:16]),
    st.integers(-(2**40), 2**40).map(lambda i: str(i).encode()[:16]),
    st.binary(max_size=18),
)
US_VALUE = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 33, 64, 0xFFFF]).map(lambda v: struct.pack("<H", v)),
    st.integers(0, 0xFFFF).map(lambda v: struct.pack("<H", v)),
    st.binary(max_size=6),
)
CS_VALUE = st.one_of(
    st.sampled_from([b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"YBR_FULL", b"YBR_FULL_422", b"PALETTE COLOR",
                     b"CT", b"MR", b"", b"  ", b"monochrome2"]),
    st.binary(max_size=18),
)
VALUES = {b"US": US_VALUE, b"CS": CS_VALUE, b"IS": NUMBER_TEXT, b"DS": NUMBER_TEXT}


@st.composite
def mutated_dicom(draw) -> bytes:
    raw = BASE_DICOM
    for keyword in draw(st.lists(st.sampled_from(sorted(ATTRIBUTES)), min_size=1, max_size=3, unique=True)):
        raw = with_value(raw, keyword, draw(VALUES[ATTRIBUTES[keyword][1]]))
    if draw(st.integers(0, 3)) == 0:  # sometimes also damage the bytes themselves
        raw = draw(mutated([raw]))
    return raw


def assert_reads_or_refuses(raw: bytes) -> None:
    try:
        result = read_dicom(raw, name="fuzz.dcm")
    except DicomReadError as exc:
        assert "fuzz.dcm: " in str(exc) and "\n" not in str(exc)
        return
    except LungcadError as exc:  # e.g. pydicom missing: still the project's one-line error
        assert "\n" not in str(exc)
        return
    assert result.frames, "no frames and no error"
    for frame in result.frames:
        check_pixels(frame)


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(raw=st.one_of(mutated_dicom(), mutated([BASE_DICOM])))
@example(raw=BASE_DICOM)
@example(raw=with_value(BASE_DICOM, "RescaleSlope", b"abc"))  # issue 15, item 8: was a ValueError (HTTP 500)
@example(raw=BASE_DICOM[:128] + b"DICM")
@example(raw=with_value(BASE_DICOM, "NumberOfFrames", b"inf"))  # found here: OverflowError from int(IS "inf")
@example(raw=with_value(BASE_DICOM, "NumberOfFrames", b"-3"))
@example(raw=with_value(BASE_DICOM, "Columns", b"\x00"))  # found here: pydicom's BytesLengthException
@example(raw=with_value(BASE_DICOM, "InstanceNumber", b"inf"))  # OverflowError in the reported metadata
@example(raw=BASE_DICOM.replace(b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00QI", 1))  # found here: NotImplementedError
@example(raw=_rgb_with_one_sample())  # found here: frames of shape (2, 128, 128) returned
@example(raw=BASE_DICOM[: BASE_DICOM.index(b"\x02\x00\x01\x00OB\x00\x00") + 9])  # found here: struct.error
@example(raw=_no_pixels(["1.2.840.10008.5.1.4.1.1.2", "1.2.3"]))  # found here: AttributeError ('MultiValue'.name)
@example(raw=_no_pixels("1.2.840.10008.\n5.1.4"))  # found here: a newline in the one-line message
def test_read_dicom_returns_bounded_uint8_or_its_own_error(raw, bounded_memory):
    assert_reads_or_refuses(raw)


def test_base_dicom_decodes():
    """The fuzzer's seed is a valid file: mutations start from something the reader accepts."""
    frames = read_dicom(BASE_DICOM, name="seed.dcm").frames
    assert len(frames) == 1 and frames[0].shape == (128, 128)
    for seed in SEEDS:
        check_pixels(decode_image(seed, "auto"))
