"""Results back to the PACS: a DICOM Secondary Capture of the Grad-CAM overlay (highdicom).

`lungcad predict --dicom-out DIR` writes one per DICOM slice (or frame). The image is the overlay
of the model's input (cropped to the body, padded square, resized, then upscaled for reading), so
it is a derived picture, not pixel-aligned with the source. It joins the source's patient and
study (that is what lets a PACS file it beside the scan) in a new series per source series, and
says what it is in SeriesDescription, ImageComments and DerivationDescription: decision support,
not a diagnosis, with the prediction and the model's sha256. UIDs are derived from the source
UIDs and the model sha256, so writing the same result twice gives the same object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import lungcad
from lungcad.dicom.deid import hashed_uid
from lungcad.errors import LungcadError, first_line
from lungcad.inference.results import Prediction
from lungcad.utils import atomic_path

__all__ = ["DISCLAIMER", "patient_orientation", "write_secondary_capture"]

SERIES_NUMBER = 9900  # high, so the overlays sort after the acquired series in a viewer
DISCLAIMER = "lungcad decision support, not a diagnosis"
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # + / - direction of patient x, y, z (DICOM LPS)


def patient_orientation(iop) -> tuple[str, str]:
    """Row and column direction letters (e.g. ('L', 'P') for an axial slice) from ImageOrientationPatient."""
    if iop is None or len(iop) != 6:
        return ("L", "P")  # the axial default when the source does not say
    letters = []
    for vec in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        order = np.argsort(-np.abs(vec))
        letters.append("".join(_AXES[i][0 if vec[i] > 0 else 1] for i in order if abs(vec[i]) > 0.25)[:3] or "L")
    return letters[0], letters[1]


def write_secondary_capture(source: str | Path, overlay: np.ndarray, prediction: Prediction, out_dir: str | Path,
                            frame: int | None = None, size: int = 512) -> Path:
    """Write the overlay (S, S, 3 uint8) of one DICOM slice as a Secondary Capture; returns its path."""
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise LungcadError("--dicom-out needs highdicom: pip install 'lungcad[dicom]'") from None
    try:
        ref = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:
        raise LungcadError(f"cannot re-read the DICOM header ({first_line(exc, 120)})", source) from None
    key = prediction.model_sha256 or "lungcad"
    sop_source = f"{ref.SOPInstanceUID}#{frame}" if frame is not None else str(ref.SOPInstanceUID)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(overlay, dtype=np.uint8), "RGB")
                       .resize((size, size), Image.Resampling.BILINEAR))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=image, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=patient_orientation(ref.get("ImageOrientationPatient")),
        series_instance_uid=hashed_uid(key, f"series:{ref.SeriesInstanceUID}"), series_number=SERIES_NUMBER,
        sop_instance_uid=hashed_uid(key, f"sop:{sop_source}"), instance_number=int(ref.get("InstanceNumber") or 1),
        manufacturer="lungcad", manufacturer_model_name="lungcad", software_versions=lungcad.__version__,
    )
    probs = ", ".join(f"{k} {v:.3f}" for k, v in prediction.probabilities.items())
    sc.SeriesDescription = f"Grad-CAM, {DISCLAIMER}"[:64]
    sc.ImageComments = (f"{DISCLAIMER}. Predicted {prediction.label}; {prediction.decision} at the "
                        f"operating threshold; calibrated probabilities: {probs}"
                        + ("; OUT OF DISTRIBUTION: not like the training images" if prediction.ood else "")
                        + f". Model sha256 {prediction.model_sha256}.")[:10240]
    sc.DerivationDescription = "Grad-CAM heatmap over the model's input image (derived, not pixel-aligned)"
    sc.BurnedInAnnotation = "NO"
    out = Path(out_dir) / f"{ref.SOPInstanceUID}{'' if frame is None else f'_f{frame}'}_lungcad.dcm"
    with atomic_path(out) as tmp:
        sc.save_as(tmp, enforce_file_format=True)
    return out
