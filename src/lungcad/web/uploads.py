"""What happens to an upload before it is stored: validation and DICOM de-identification.

Validation: type by content (never by name or Content-Type), size and dimension caps.
De-identification: the profile itself is `lungcad.dicom.deid.deidentify` (PS3.15 basic profile);
here UIDs are always hashed with the site secret, and a PHI-free summary comes back for the database.
"""

from __future__ import annotations

import io
import warnings

import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from lungcad.data.images import MAX_PIXELS, check_min_side, check_size
from lungcad.dicom.deid import deidentify
from lungcad.errors import LungcadError, first_line
from lungcad.inference.inputs import file_kind

__all__ = [
    "KINDS", "MAX_FILES", "MAX_PIXELS", "MAX_UPLOAD_BYTES", "check_upload", "deidentify_upload", "sniff",
]

MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one file: a 512x512 CT slice is ~0.5 MB; a large DICOM ~30 MB
MAX_FILES = 50  # per upload form / request
# Decoded dimensions are checked from the header, before decoding, with the rules `lungcad predict`
# applies (lungcad.data.images: MAX_PIXELS, aspect ratio, minimum side).

KINDS = ("png", "jpeg", "dicom")


def sniff(raw: bytes) -> str | None:
    """The upload's type from its content: 'png', 'jpeg', 'dicom' or None (any other kind; one sniffer for
    predict and the web app: `lungcad.inference.inputs.file_kind`)."""
    kind = file_kind(raw)
    return kind if kind in KINDS else None


def check_upload(raw: bytes, label: str = "upload") -> tuple[str, int, int]:
    """(kind, width, height) of an acceptable upload; LungcadError naming `label` otherwise."""
    if not raw:
        raise LungcadError("empty file", label)
    if len(raw) > MAX_UPLOAD_BYTES:
        raise LungcadError(f"file too large ({len(raw) // 1024} KiB, limit {MAX_UPLOAD_BYTES // 1024 // 1024} MiB)", label)
    kind = sniff(raw)
    if kind is None:
        raise LungcadError("not a PNG, JPEG or DICOM file", label)
    if kind == "dicom":
        width, height = _dicom_size(raw, label)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(raw)) as im:  # reads the header only
                    width, height = im.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise LungcadError(f"image too large (decompression bomb guard; limit {MAX_PIXELS} pixels)", label) from None
        except Exception:
            raise LungcadError(f"not a readable {kind.upper()} image", label) from None
    check_size(width, height, label)
    check_min_side(width, height, label)
    return kind, width, height


def _dicom_size(raw: bytes, label: str) -> tuple[int, int]:
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        width, height = int(ds.Columns), int(ds.Rows)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise LungcadError("not a readable DICOM image (no Rows/Columns)", label) from None
    if frames > 1:
        raise LungcadError(f"multi-frame DICOM ({frames} frames) is not supported: upload single slices", label)
    return width, height


def deidentify_upload(raw: bytes, secret: str, name: str = "<upload>") -> tuple[bytes, dict]:
    """De-identified DICOM bytes and a PHI-free summary (hashed study/series UIDs, modality, flags)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise LungcadError(f"not a readable DICOM file ({first_line(exc, 120)})", name) from None
    ds = deidentify(ds, secret)
    meta = getattr(ds, "file_meta", None)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=meta is not None and "TransferSyntaxUID" in meta)
    summary = {
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")),
    }
    return out.getvalue(), summary
