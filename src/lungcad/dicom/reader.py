"""DICOM slices -> windowed uint8 pixels, small and explicit (after torchxrayvision / MONAI).

    stored values --RescaleSlope/Intercept--> Hounsfield units (CT) --window, clip--> uint8
    MONOCHROME1 (bright = low values) is inverted so that air is always dark, as in the JPEGs
    the models are trained on.

Which window: an explicit `window` (the CLI's `--window L,W`) always wins. Otherwise CT slices get
the contract's window (the lung window, level -600 HU / width 1500 HU, by default); other
modalities (MR, ...) have no Hounsfield scale, so they get the file's own VOI window
(WindowCenter/WindowWidth) or, lacking one, the frame's min-max range. Such images are not what a
CT model was trained on; the out-of-distribution detector is what flags them.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcad.data.images import MAX_PIXELS, ImageReadError, check_size, read_regular_file
from lungcad.dicom.deid import safe_metadata
from lungcad.errors import LungcadError, first_line
from lungcad.inference.inputs import HEAD_BYTES, is_dicom  # the one file-type sniffer

__all__ = [
    "DEFAULT_WINDOW", "DicomFrames", "DicomReadError", "is_dicom", "parse_window", "read_dicom", "window_to_uint8",
]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = (-600.0, 1500.0)  # lung window (level, width) in HU, as in Preprocessing
MAX_TOTAL_PIXELS = 4 * MAX_PIXELS  # all frames of one file together (decompression-bomb guard)
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")  # pydicom converts these to RGB

# pylibjpeg plugin that decodes each compressed transfer-syntax family (for the error message).
_PLUGIN_FOR = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE (pydicom also decodes it natively)
}


class DicomReadError(ImageReadError):
    """A DICOM file whose pixels cannot be used."""


class _TracebacksToDebug(logging.Filter):
    """pydicom logs every decoder plugin that fails with a full traceback at ERROR (`LOGGER.exception`).

    Our caller gets one DicomReadError line naming the file instead; the tracebacks go to this
    module's logger at DEBUG (shown with --verbose), not to stderr or the server log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            log.debug("pydicom: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


# A logger's filters see only records logged to it, not its children's: name the ones that log tracebacks.
for _name in ("pydicom", "pydicom.pixels.decoders.base"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _TracebacksToDebug) for f in _logger.filters):
        _logger.addFilter(_TracebacksToDebug())


@dataclass
class DicomFrames:
    """The frames of one DICOM file as uint8 pixels, and only non-identifying metadata."""

    frames: list[np.ndarray]  # each HxW (grey) or HxWx3 (colour) uint8
    metadata: dict = field(default_factory=dict)  # UIDs, modality, instance number: see deid.safe_metadata
    window: tuple[float, float] | None = None  # (level, width) applied to grey frames, None = min-max


def parse_window(text: str) -> tuple[float, float]:
    """`"L,W"` (e.g. `-600,1500`) -> (level, width); raises LungcadError on anything else."""
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise LungcadError(f"--window must be LEVEL,WIDTH in HU (e.g. -600,1500), not {text!r}") from None
    if not width > 0:
        raise LungcadError(f"--window width must be positive, not {width:g}")
    return level, width


def window_to_uint8(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear window: level - width/2 -> 0, level + width/2 -> 255, clipped outside."""
    lo = level - width / 2.0
    scaled = (values.astype(np.float64) - lo) / width * 255.0
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values.astype(np.float64) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise LungcadError("reading DICOM needs pydicom: pip install 'lungcad[dicom]'") from None
    return pydicom


def _first(value, default=None):
    """Multi-valued DICOM attributes (e.g. several VOI windows): use the first."""
    if value is None:
        return default
    try:
        return value[0] if not isinstance(value, (str, bytes)) and len(value) else value
    except TypeError:
        return value


def _number(ds, keyword: str, default: float | None, label) -> float | None:
    """A numeric (DS/IS) attribute as a finite float, `default` when absent; DicomReadError when unusable.

    Read from the raw element: pydicom would raise its own ValueError (or warn) on a malformed value.
    """
    from pydicom.errors import BytesLengthException

    if keyword not in ds:
        return default
    try:
        raw = ds[keyword].value
    except (ValueError, TypeError, OverflowError, BytesLengthException) as exc:  # pydicom's conversion of a malformed value
        raise DicomReadError(f"invalid {keyword} ({first_line(exc, 80)})", label) from None
    value = _first(raw)
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    try:
        number = float(value)
    except (ValueError, TypeError, OverflowError):
        raise DicomReadError(f"invalid {keyword} {str(value)[:32]!r} (not a number)", label) from None
    if not np.isfinite(number):
        raise DicomReadError(f"invalid {keyword} {str(value)[:32]!r} (not finite)", label)
    return number


def read_dicom(
    data: bytes | Path | str,
    name: str | Path | None = None,
    window: tuple[float, float] | None = None,
    ct_window: tuple[float, float] = DEFAULT_WINDOW,
) -> DicomFrames:
    """Decode every frame of a DICOM file to windowed uint8 pixels (see the module docstring).

    `window` overrides everything; `ct_window` is the contract's window for CT. Raises
    DicomReadError (a LungcadError) naming the file for anything that cannot be used.
    """
    pydicom = _pydicom()
    from pydicom.errors import BytesLengthException, InvalidDicomError

    label = name if name is not None else (data if isinstance(data, (str, Path)) else "<bytes>")
    raw = read_regular_file(data, label, error=DicomReadError) if isinstance(data, (str, Path)) else data
    if not is_dicom(raw[:HEAD_BYTES]):
        raise DicomReadError("not a DICOM file (no DICM magic at byte 128)", label)
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, BytesLengthException,
            NotImplementedError, struct.error) as exc:  # the last three found by tests/test_fuzz.py
        # (odd-length values, unknown VRs, a length field cut short)
        raise DicomReadError(f"corrupt DICOM file ({first_line(exc)})", label) from None
    metadata = safe_metadata(ds)
    if "PixelData" not in ds:
        kind = "FloatPixelData" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else None
        what = f"float pixel data ({kind}) is not supported" if kind else "DICOM without pixel data"
        try:  # only to name it: a malformed or multi-valued SOPClassUID (found by tests/test_fuzz.py) is shown as is
            sop = _first(getattr(ds, "SOPClassUID", None))
        except Exception:
            sop = None
        sop_name = str(getattr(sop, "name", None) or sop or "")[:64]
        sop_name = sop_name if sop_name.isprintable() else repr(sop_name)  # one line, whatever the file holds
        raise DicomReadError(f"{what}{f' (SOP class {sop_name})' if sop_name else ''}", label)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    if photometric not in GREY + COLOUR:
        raise DicomReadError(f"unsupported photometric interpretation {photometric or '(missing)'!r}", label)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, ValueError, TypeError, OverflowError, BytesLengthException):
        # found by tests/test_fuzz.py: NumberOfFrames "inf" (OverflowError), a 1-byte US Columns (BytesLengthException)
        raise DicomReadError("missing or invalid Rows/Columns/NumberOfFrames", label) from None
    if min(rows, cols, n_frames) < 1:
        raise DicomReadError(f"invalid size ({n_frames} frame(s) of {cols}x{rows} pixels)", label)
    if rows * cols > MAX_PIXELS or rows * cols * n_frames > MAX_TOTAL_PIXELS:
        raise DicomReadError(
            f"image too large ({n_frames} frame(s) of {cols}x{rows} pixels, limit {MAX_PIXELS} per frame)", label
        )
    check_size(cols, rows, label, error=DicomReadError)  # and the aspect-ratio rule of every image
    _check_decoder(ds, label)
    try:
        arr = ds.pixel_array  # YBR_* colour is converted to RGB by pydicom here
    except Exception as exc:  # pydicom raises many types for broken pixel data; all mean "unusable"
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # "Unable to decode as exceptions were raised by all available plugins:" names them on the next line
        reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        raise DicomReadError(f"cannot decode pixel data ({reason[:200]})", label) from None

    colour = photometric in COLOUR
    if n_frames == 1:
        arr = arr[None]
    expected = (n_frames, rows, cols, 3) if colour else (n_frames, rows, cols)
    if arr.shape != expected:  # e.g. RGB with SamplesPerPixel 1 (found by tests/test_fuzz.py: 2 frames of 128x128)
        raise DicomReadError(f"unexpected pixel array shape {arr.shape} for {photometric} "
                             f"({n_frames} frame(s) of {cols}x{rows})", label)

    frames: list[np.ndarray] = []
    used: tuple[float, float] | None = None
    if colour:
        for frame in arr:
            frames.append(frame if frame.dtype == np.uint8 else _minmax_to_uint8(frame))
        return DicomFrames(frames, metadata, None)

    slope = _number(ds, "RescaleSlope", 1.0, label) or 1.0
    intercept = _number(ds, "RescaleIntercept", 0.0, label)
    values = arr.astype(np.float64) * slope + intercept  # stored values -> HU on CT (linear modality LUT)
    if window is not None:
        used = window
    elif metadata.get("Modality") == "CT":
        used = ct_window
    else:
        centre, width = _number(ds, "WindowCenter", None, label), _number(ds, "WindowWidth", None, label)
        if centre is not None and width is not None and width > 0:
            used = (centre, width)
    for frame in values:
        grey = window_to_uint8(frame, *used) if used is not None else _minmax_to_uint8(frame)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        frames.append(grey)
    return DicomFrames(frames, metadata, used)


def _check_decoder(ds, label) -> None:
    """Compressed pixel data needs a plugin; say which one instead of pydicom's long message."""
    from pydicom.pixels import get_decoder

    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None:
        return
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise DicomReadError(f"unsupported transfer syntax {tsuid.name} ({tsuid})", label) from None
    if decoder.is_available:
        return
    plugin = _PLUGIN_FOR.get(str(tsuid))
    alternatives = "; ".join(decoder.missing_dependencies)
    raise DicomReadError(
        f"compressed DICOM ({tsuid.name}) needs a pixel-data plugin that is not installed: "
        + (f"pip install pylibjpeg {plugin}" if plugin else "no pylibjpeg plugin known")
        + (f" (or: {alternatives})" if alternatives else ""),
        label,
    )
