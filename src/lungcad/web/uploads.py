"""What happens to an upload before it is stored: validation, modality check, zip expansion and
DICOM de-identification.

Validation: type by content (never by name or Content-Type), size and dimension caps.
Modality: a DICOM whose Modality is not the model's (CT for a greyscale model), or a colour image
given to a greyscale model (and the reverse), is refused with that reason, before it is scored.
Zips: members are read one at a time (never the whole archive), each under the per-file cap.
De-identification: the profile itself is `lungcad.dicom.deid.deidentify` (PS3.15 basic profile);
here UIDs are always hashed with the site secret, and a PHI-free summary comes back for the database.
The identifiers clinicians need to find the exam in the PACS, and the patient and study attributes
results sent back to it need (`UploadInfo.identifiers`, `UploadInfo.image_identifiers`), are read
from the original header and go only to the `exam_identifiers` and `image_identifiers` tables.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from lungcad.data.images import MAX_PIXELS, check_min_side, check_size
from lungcad.dicom.deid import deidentify
from lungcad.errors import LungcadError, first_line
from lungcad.inference.inputs import file_kind

__all__ = [
    "IDENTITY", "KINDS", "MAX_FILES", "MAX_PIXELS", "MAX_UPLOAD_BYTES", "MAX_ZIP_BYTES", "UploadInfo",
    "check_modality", "check_upload", "deidentify_upload", "exam_identity", "expand_upload", "inspect_upload", "is_zip",
    "sniff",
]

MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one file: a 512x512 CT slice is ~0.5 MB; a large DICOM ~30 MB
MAX_FILES = 1000  # files (or zip members) per upload: a 300-slice series with room for a few more
MAX_ZIP_BYTES = 1024 * 1024 * 1024  # uncompressed total of one zip (members are also capped one by one)
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


@dataclass
class UploadInfo:
    """What an acceptable upload is, from its header: kind, size and (DICOM) the original UIDs.

    The UIDs and `identifiers` are the ORIGINAL values: they are hashed before anything is stored,
    except `identifiers`, which only the exam_identifiers table receives.
    """

    kind: str
    width: int
    height: int
    modality: str = ""
    photometric: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    instance_number: int | None = None
    sop_class_uid: str = ""
    # ExamIdentifiers columns (accession_number, study_uid, and since 0007 the patient module and General
    # Study attributes, `identity_kept`): the table's keyword arguments, see `exam_identity`
    identifiers: dict = field(default_factory=dict)

    def image_identifiers(self) -> dict:
        """The ImageIdentifiers columns of this instance: its original UIDs (empty for JPG/PNG)."""
        return {"sop_instance_uid": self.sop_uid[:64], "sop_class_uid": self.sop_class_uid[:64],
                "series_uid": self.series_uid[:64]}


# DICOM keyword -> (ExamIdentifiers column, its length): what a PACS files a result under (the patient
# module) and the General Study attributes the result objects copy from their source image.
IDENTITY = {
    "PatientName": ("patient_name", 324), "PatientID": ("patient_id", 64),
    "IssuerOfPatientID": ("issuer_of_patient_id", 64), "PatientBirthDate": ("patient_birth_date", 16),
    "PatientSex": ("patient_sex", 16), "StudyDate": ("study_date", 16), "StudyTime": ("study_time", 32),
    "ReferringPhysicianName": ("referring_physician_name", 324), "StudyID": ("dicom_study_id", 16),
}


def _text(ds, keyword: str) -> str:
    """A header attribute as stripped text ("" when absent or empty)."""
    return str(ds.get(keyword, "") or "").strip()


def exam_identity(ds) -> dict:
    """The identifying exam attributes of an original DICOM header, as ExamIdentifiers columns."""
    out = {column: _text(ds, keyword)[:length] for keyword, (column, length) in IDENTITY.items()}
    return {"accession_number": _text(ds, "AccessionNumber")[:64], "study_uid": _text(ds, "StudyInstanceUID")[:64],
            **out, "identity_kept": True}


def inspect_upload(raw: bytes, label: str = "upload") -> UploadInfo:
    """`check_upload` plus what grouping and the modality check need (one header read for DICOM)."""
    kind, width, height = check_upload(raw, label)
    info = UploadInfo(kind, width, height)
    if kind == "dicom":
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        text = partial(_text, ds)
        info.modality, info.photometric = text("Modality").upper(), text("PhotometricInterpretation").upper()
        info.study_uid, info.series_uid, info.sop_uid = text("StudyInstanceUID"), text("SeriesInstanceUID"), text(
            "SOPInstanceUID")
        try:
            info.instance_number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
        except (TypeError, ValueError):
            info.instance_number = None
        info.sop_class_uid = text("SOPClassUID")
        info.identifiers = exam_identity(ds)
    return info


def check_modality(info: UploadInfo, raw: bytes, colour: str, label: str = "upload") -> None:
    """Refuse an input whose modality is not the model's (LungcadError with the reason).

    `colour` is the contract's `preprocessing.colour`: "grey" is a CT model (DICOM Modality must be
    CT; a colour photograph is refused), "rgb" a histopathology model (DICOM must be slide
    microscopy, SM; a greyscale image is refused). The colour rule is the appearance check's
    (`lungcad.inference.appearance.CHROMA`, `CHROMA_SHARE`).
    """
    expected = "CT" if colour == "grey" else "SM"
    if info.kind == "dicom":
        if not info.modality:  # Type 1 in General Series: without it nothing says the pixels are CT
            raise LungcadError(f"DICOM without a Modality: cannot tell it is {expected}; refused, not scored "
                               "(the DICOM node does not score such a series either)", label)
        if info.modality != expected:
            raise LungcadError(f"modality {info.modality} does not match the model ({expected}): refused, not scored",
                               label)
        if colour == "grey" and info.photometric and not info.photometric.startswith("MONOCHROME"):
            raise LungcadError(f"colour DICOM ({info.photometric}) given to a greyscale CT model: refused, not scored",
                               label)
        return
    share = _colour_share(raw)
    from lungcad.inference.appearance import CHROMA_SHARE

    if colour == "grey" and share > CHROMA_SHARE:
        raise LungcadError(f"colour image ({share:.0%} of its pixels are coloured) given to a greyscale CT model: "
                           "refused, not scored", label)
    if colour == "rgb" and share <= 0.01:
        raise LungcadError("greyscale image given to a colour (histopathology) model: refused, not scored", label)


def _colour_share(raw: bytes) -> float:
    """Share of pixels whose channels differ by more than the appearance check's CHROMA (0 for grey modes)."""
    from lungcad.inference.appearance import CHROMA

    with Image.open(io.BytesIO(raw)) as im:
        if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
            return 0.0
        im.draft("RGB", (256, 256))  # JPEG: decode at reduced scale
        im = im.convert("RGB")
        im.thumbnail((256, 256))
        arr = np.asarray(im)
    chroma = arr.max(axis=2).astype(np.int16) - arr.min(axis=2)
    return float((chroma > CHROMA).mean())


def is_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


def expand_upload(name: str, fh: IO[bytes], label: str) -> Iterator[tuple[str, str, bytes | LungcadError]]:
    """(display name, error label, bytes or the reason it is unusable) for an uploaded file, or for each
    member of an uploaded zip, read one at a time and each bounded by MAX_UPLOAD_BYTES.

    `fh` must be seekable (FastAPI spools uploads to a temporary file). Folders, dot-files and macOS
    resource forks in a zip are skipped; a zip inside a zip is not opened (an unusable member).
    """
    head = fh.read(4)
    fh.seek(0)
    if not is_zip(head):
        yield name, label, fh.read(MAX_UPLOAD_BYTES + 1)
        return
    try:
        archive = zipfile.ZipFile(fh)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        yield name, label, LungcadError(f"not a readable zip ({first_line(exc, 120)})", label)
        return
    total = 0
    for i, member in enumerate(m for m in members if not m.is_dir()):
        base = member.filename.rsplit("/", 1)[-1]
        if not base or base.startswith(".") or member.filename.startswith("__MACOSX/"):
            continue
        shown, where = f"{name}/{member.filename}"[:200], f"{label}, member {i + 1}"
        if member.file_size > MAX_UPLOAD_BYTES:
            yield shown, where, LungcadError(
                f"file too large ({member.file_size // 1024} KiB, limit {MAX_UPLOAD_BYTES // 1024 // 1024} MiB)", where)
            continue
        total += member.file_size
        if total > MAX_ZIP_BYTES:
            yield shown, where, LungcadError(f"zip too large (over {MAX_ZIP_BYTES // 1024 // 1024} MiB uncompressed)",
                                             where)
            return
        try:
            with archive.open(member) as src:
                data = src.read(MAX_UPLOAD_BYTES + 1)  # bounded even if the declared size lies
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
            yield shown, where, LungcadError(f"unreadable zip member ({first_line(exc, 120)})", where)
            continue
        yield shown, where, data


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
