"""Decoding image files into arrays, with clear errors for anything that is not a usable image.

This is the single entry point from bytes on disk to pixels for training and inference, so both
see exactly the same decoded values.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lungcad.errors import LungcadError

__all__ = [
    "IMAGE_SUFFIXES", "MAX_ASPECT", "MAX_FILE_BYTES", "MAX_PIXELS", "MIN_SIDE", "ImageReadError", "check_min_side",
    "check_size", "decode_image", "read_regular_file",
]

# Size rules, one set for training, `lungcad predict` and the web app (the first two are checked
# from the header, before anything is decoded):
# - MAX_PIXELS: decompression-bomb guard. CT slices are 512x512, radiographs a few thousand pixels
#   a side; a whole-slide image needs tiling first.
# - MAX_ASPECT: a 185-byte PNG can declare 50000x2 pixels; refusing extreme shapes keeps every later
#   step (foreground crop, square padding, resizing) bounded by the pixel count as well.
# - MIN_SIDE: below this a model input is mostly interpolation. Predictions refuse such files
#   (`check_min_side`: a per-file error in predict, a rejected upload in the web app); training and
#   the audit only skip what cannot be decoded at all.
MAX_PIXELS = 40_000_000
# - MAX_FILE_BYTES: what one input file may hold at all (a multi-frame DICOM series file can reach a
#   few hundred MB); read_regular_file refuses more before reading it, and anything but a regular file.
MAX_FILE_BYTES = 1 << 30
MAX_ASPECT = 8
MIN_SIDE = 32
# Pillow's own guard is the backstop, above ours: every open in lungcad is followed by check_size,
# whose message names the dimensions.
Image.MAX_IMAGE_PIXELS = 4 * MAX_PIXELS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class ImageReadError(LungcadError):
    """A file that cannot be decoded as an image."""


def read_regular_file(path: str | Path, label: str | Path | None = None, limit: int = MAX_FILE_BYTES,
                      error: type[ImageReadError] | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `error` (ImageReadError) for anything else.

    A FIFO named `.jpg` would block the reader forever and `/dev/zero` would fill the memory: the
    file is opened without blocking (O_NONBLOCK) and its type and size checked on the open handle.
    """
    label = path if label is None else label
    error = error or ImageReadError
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"cannot read file ({exc.strerror or exc})", label) from None
    with os.fdopen(fd, "rb") as fh:
        try:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error("not a regular file (a FIFO, device or socket cannot be an image)", label)
            if st.st_size > limit:
                raise error(f"file too large ({st.st_size >> 20} MiB, limit {limit >> 20} MiB)", label)
            raw = fh.read(limit + 1)  # + 1: a file that grew while being read is caught too
        except OSError as exc:
            raise error(f"cannot read file ({exc.strerror or exc})", label) from None
    if len(raw) > limit:
        raise error(f"file too large (over {limit >> 20} MiB)", label)
    return raw


def decode_image(data: bytes | Path | str, colour: str = "grey", name: str | Path | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to uint8 pixels: HxW for `grey`, HxWx3 for `rgb`; `auto`
    keeps what the file holds (HxW for greyscale modes, HxWx3 otherwise: prediction uses it to see
    a colour photograph given to a greyscale model).

    16-bit images are rescaled to 8 bits over their own value range; alpha is dropped onto black.
    Raises ImageReadError naming the file for empty, truncated, oversized or non-image input.
    """
    if colour not in ("grey", "rgb", "auto"):
        raise ValueError(f"colour must be 'grey', 'rgb' or 'auto', not {colour!r}")
    label = name if name is not None else (data if isinstance(data, (str, Path)) else "<bytes>")
    raw = read_regular_file(data, label) if isinstance(data, (str, Path)) else data
    if not raw:
        raise ImageReadError("empty file (0 bytes)", label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                check_size(im.width, im.height, label)
                im.load()  # force full decode so truncation is detected here
                return _to_array(im, colour)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(f"image too large (decompression bomb guard, limit {MAX_PIXELS} pixels)", label) from None
    except UnidentifiedImageError:
        raise ImageReadError("not a recognised image format", label) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"corrupt or truncated image ({exc})", label) from None


def check_size(width: int, height: int, label: str | Path | None = None,
               error: type[ImageReadError] = ImageReadError) -> None:
    """Refuse decoded sizes that would cost unbounded memory: more than MAX_PIXELS pixels, or a
    side more than MAX_ASPECT times the other. Raises `error` (one line, naming `label`)."""
    if width * height > MAX_PIXELS:
        raise error(f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})", label)
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise error(
            f"extreme aspect ratio ({width}x{height} pixels; at most {MAX_ASPECT}:1 is accepted)", label
        )


def check_min_side(width: int, height: int, label: str | Path | None = None) -> None:
    """Refuse images too small to predict on (under MIN_SIDE pixels a side): ImageReadError."""
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(f"image too small ({width}x{height} px; the minimum is {MIN_SIDE})", label)


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})


def _to_array(im: Image.Image, colour: str) -> np.ndarray:
    if colour == "auto":
        colour = "grey" if im.mode in GREY_MODES else "rgb"
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        grey = np.round(arr).astype(np.uint8)
        return grey if colour == "grey" else np.repeat(grey[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("L" if colour == "grey" else "RGB"), dtype=np.uint8).copy()
