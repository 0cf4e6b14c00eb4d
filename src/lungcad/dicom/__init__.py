"""DICOM input/output: reading and windowing slices, de-identification helpers, result export.

pydicom is an optional dependency (`pip install 'lungcad[dicom]'`); importing this package works
without it, and functions that need it raise a LungcadError saying what to install.
"""

from lungcad.dicom.deid import SAFE_UID_KEYS, deidentify, safe_metadata
from lungcad.dicom.reader import (
    DEFAULT_WINDOW,
    DicomFrames,
    is_dicom,
    parse_window,
    read_dicom,
    window_to_uint8,
)

__all__ = [
    "DEFAULT_WINDOW",
    "DicomFrames",
    "SAFE_UID_KEYS",
    "deidentify",
    "is_dicom",
    "parse_window",
    "read_dicom",
    "safe_metadata",
    "window_to_uint8",
]
