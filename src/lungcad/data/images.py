"""Decoding image files into arrays, with clear errors for anything that is not a usable image.

This is the single entry point from bytes on disk to pixels for training and inference, so both
see exactly the same decoded values.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lungcad.errors import LungcadError

# Decompression-bomb guard: no lung image we accept has more pixels than this (a 16k x 16k
# whole-slide tile would be refused too; such inputs need tiling first).
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class ImageReadError(LungcadError):
    """A file that cannot be decoded as an image."""


def decode_image(data: bytes | Path | str, colour: str = "grey", name: str | Path | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to uint8 pixels: HxW for `grey`, HxWx3 for `rgb`.

    16-bit images are rescaled to 8 bits over their own value range; alpha is dropped onto black.
    Raises ImageReadError naming the file for empty, truncated, oversized or non-image input.
    """
    if colour not in ("grey", "rgb"):
        raise ValueError(f"colour must be 'grey' or 'rgb', not {colour!r}")
    label = name if name is not None else (data if isinstance(data, (str, Path)) else "<bytes>")
    try:
        raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    except OSError as exc:
        raise ImageReadError(f"cannot read file ({exc.strerror or exc})", label) from None
    if not raw:
        raise ImageReadError("empty file (0 bytes)", label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageReadError(
                        f"image too large ({im.width}x{im.height} pixels, limit {MAX_PIXELS})", label
                    )
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


def _to_array(im: Image.Image, colour: str) -> np.ndarray:
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
