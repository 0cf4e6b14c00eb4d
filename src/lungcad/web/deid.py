"""De-identification of DICOM uploads before storage (bytes in, bytes out).

The profile itself is `lungcad.dicom.deid.deidentify` (PS3.15 basic profile); here UIDs are
always hashed with the site secret, and a PHI-free summary comes back for the database.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.errors import InvalidDicomError

from lungcad.dicom.deid import deidentify
from lungcad.errors import LungcadError


def deidentify_upload(raw: bytes, secret: str, name: str = "<upload>") -> tuple[bytes, dict]:
    """De-identified DICOM bytes and a PHI-free summary (hashed study/series UIDs, modality, flags)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise LungcadError(f"not a readable DICOM file ({str(exc).splitlines()[0][:120]})", name) from None
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
