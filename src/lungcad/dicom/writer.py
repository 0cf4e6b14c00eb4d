"""Results back to the PACS, per slice: a DICOM Secondary Capture of the Grad-CAM overlay (highdicom).

`lungcad predict --dicom-out DIR` and `lungcad dicom-node` write one per DICOM slice (or frame).
The picture is the source slice as the model saw it (windowed at the contract's window), at the
source's rows and columns, with the Grad-CAM heatmap mapped back from the model's input onto the
source geometry (`lungcad.data.transforms.to_source_geometry`) and blended where the model looked,
and a caption burnt in at the bottom: the calibrated p(malignant), the decision at the operating
threshold and "decision support, not a diagnosis" (so `BurnedInAnnotation` is YES; the caption holds
no patient data). It joins the source's patient and study in a new series per source series,
references the source image (SourceImageSequence), and is written in Explicit VR Little Endian.
UIDs are derived from the source UIDs and the model sha256, so writing the same result twice gives
the same object. The per-series result is the Structured Report of `lungcad.dicom.sr`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import lungcad
from lungcad.dicom.deid import hashed_uid
from lungcad.errors import LungcadError, first_line
from lungcad.inference.results import Prediction
from lungcad.utils import atomic_path

__all__ = [
    "DISCLAIMER", "SERIES_NUMBER", "build_secondary_capture", "caption_lines", "multiframe_class", "overlay_on_source",
    "patient_orientation", "write_secondary_capture",
]

logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module otherwise

SERIES_NUMBER = 9900  # high, so the overlays sort after the acquired series in a viewer
DISCLAIMER = "lungcad decision support, not a diagnosis"
HEAT_ALPHA = 0.5  # opacity of the heatmap where the model looked most; the anatomy stays visible under it
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # + / - direction of patient x, y, z (DICOM LPS)


def _hd():
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise LungcadError("DICOM results need highdicom: pip install 'lungcad[dicom]'") from None
    return hd, pydicom


def patient_orientation(iop) -> tuple[str, str]:
    """Row and column direction letters (e.g. ('L', 'P') for an axial slice) from ImageOrientationPatient."""
    if iop is None or len(iop) != 6:
        return ("L", "P")  # the axial default when the source does not say
    letters = []
    for vec in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        order = np.argsort(-np.abs(vec))
        letters.append("".join(_AXES[i][0 if vec[i] > 0 else 1] for i in order if abs(vec[i]) > 0.25)[:3] or "L")
    return letters[0], letters[1]


def multiframe_class(ds) -> bool:
    """Whether the dataset's SOP class (IOD) allows frames, so that a reference may name one (PS3.3 C.7.6.1.1.3).

    A legacy multi-frame file in CT Image Storage (a single-frame IOD) is referenced as a whole.
    """
    try:
        from highdicom._standard_utils import is_multiframe_image  # highdicom's own table of IODs
    except ImportError:  # a future highdicom that moved it: be conservative, name no frame
        return False
    return bool(is_multiframe_image(ds))


def caption_lines(prediction: Prediction, threshold: float | None = None) -> list[str]:
    """The burnt-in caption: probability and decision, then the decision-support statement."""
    at = f" (threshold {threshold:.2f})" if threshold is not None else ""
    first = f"p(malignant) {prediction.malignant_probability:.2f}: {prediction.decision}{at}"
    if prediction.ood:
        first += "; OUT OF DISTRIBUTION"
    return [first, DISCLAIMER]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _burn_caption(image: Image.Image, lines: list[str]) -> None:
    """Write `lines` at the bottom left on a black band, the font shrunk until the widest line fits."""
    cols, rows = image.size
    draw = ImageDraw.Draw(image)
    size = max(8, rows // 32)
    font = _font(size)
    while size > 6 and max(draw.textlength(line, font=font) for line in lines) > cols - 4:
        size -= 1
        font = _font(size)
    height = (size + 2) * len(lines) + 2
    draw.rectangle([0, rows - height, cols, rows], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((2, rows - height + 1 + i * (size + 2)), line, fill=(255, 255, 255), font=font)


def overlay_on_source(pixels: np.ndarray, heatmap: np.ndarray, caption: list[str] | None = None) -> np.ndarray:
    """RGB (rows, cols, 3) uint8: the heatmap (rows, cols, values in [0, 1]) blended over the slice.

    The opacity follows the heatmap (HEAT_ALPHA at its maximum, 0 where it is 0), so the
    anatomy is untouched where the model did not look.
    """
    from matplotlib import colormaps

    base = pixels.astype(np.float32) / 255.0
    base = base if base.ndim == 3 else np.repeat(base[..., None], 3, axis=2)
    heat = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} does not match the slice {base.shape[:2]}")
    colour = colormaps["jet"](heat)[..., :3].astype(np.float32)
    alpha = (HEAT_ALPHA * heat)[..., None]
    rgb = np.round((base * (1 - alpha) + colour * alpha) * 255.0).astype(np.uint8)
    if caption:
        image = Image.fromarray(rgb, "RGB")
        _burn_caption(image, caption)
        rgb = np.asarray(image)
    return rgb


def build_secondary_capture(ref, pixels: np.ndarray, heatmap: np.ndarray, prediction: Prediction,
                            frame: int | None = None, threshold: float | None = None):
    """The Secondary Capture dataset (highdicom SCImage) for one source slice `ref` (a pydicom header)."""
    hd, pydicom = _hd()
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    rows, cols = int(ref.Rows), int(ref.Columns)
    if pixels.shape[:2] != (rows, cols):
        raise LungcadError(f"decoded slice {pixels.shape[:2]} does not match the header's {rows}x{cols}")
    image = overlay_on_source(pixels, heatmap, caption_lines(prediction, threshold))
    key = prediction.model_sha256 or "lungcad"
    sop_source = f"{ref.SOPInstanceUID}#{frame}" if frame is not None else str(ref.SOPInstanceUID)
    spacing = ref.get("PixelSpacing")
    laterality = str(ref.get("Laterality", "") or "") or None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=image, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=patient_orientation(ref.get("ImageOrientationPatient")),
        series_instance_uid=hashed_uid(key, f"series:{ref.SeriesInstanceUID}"), series_number=SERIES_NUMBER,
        sop_instance_uid=hashed_uid(key, f"sop:{sop_source}"), instance_number=int(ref.get("InstanceNumber") or 1),
        manufacturer="lungcad", manufacturer_model_name="lungcad", software_versions=lungcad.__version__,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else None,
        laterality=laterality, transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if laterality is None:
        # Type 2C in the General Series module: required (possibly empty) for a paired body part
        # (the lungs) when no Image Laterality is given; empty = not known for this slice.
        sc.Laterality = ""
    source = Dataset()
    source.ReferencedSOPClassUID = ref.SOPClassUID
    source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if frame is not None and multiframe_class(ref):
        source.ReferencedFrameNumber = int(frame) + 1  # DICOM frame numbers start at 1
    sc.SourceImageSequence = [source]
    probs = ", ".join(f"{k} {v:.3f}" for k, v in prediction.probabilities.items())
    sc.SeriesDescription = f"Grad-CAM, {DISCLAIMER}"[:64]
    sc.ImageComments = (f"{DISCLAIMER}. Predicted {prediction.label}; {prediction.decision} at the "
                        f"operating threshold; calibrated probabilities: {probs}"
                        + ("; OUT OF DISTRIBUTION: not like the training images" if prediction.ood else "")
                        + f". Model sha256 {prediction.model_sha256}.")[:10240]
    sc.DerivationDescription = ("Grad-CAM heatmap of the model's input mapped back onto the source slice "
                                "(same rows and columns), caption burnt in")
    sc.BurnedInAnnotation = "YES"  # the caption; it holds no patient data
    return sc


def write_secondary_capture(source: str | Path, pixels: np.ndarray, heatmap: np.ndarray, prediction: Prediction,
                            out_dir: str | Path, frame: int | None = None, threshold: float | None = None) -> Path:
    """Write the overlay of one DICOM slice (decoded `pixels`, `heatmap` on them) as a Secondary Capture."""
    _, pydicom = _hd()
    try:
        ref = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:
        raise LungcadError(f"cannot re-read the DICOM header ({first_line(exc, 120)})", source) from None
    sc = build_secondary_capture(ref, pixels, heatmap, prediction, frame, threshold)
    out = Path(out_dir) / f"{ref.SOPInstanceUID}{'' if frame is None else f'_f{frame}'}_lungcad.dcm"
    with atomic_path(out) as tmp:
        sc.save_as(tmp, enforce_file_format=True)
    return out
