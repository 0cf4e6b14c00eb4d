"""What the image viewer (templates/_viewer.html, static/viewer/) is sent: pixel values and heatmaps.

- Pixels: for a DICOM study, the stored de-identified DICOM's values after the modality rescale
  (RescaleSlope/Intercept: Hounsfield units on CT), so window/level in the browser acts on real HU;
  for a JPG/PNG study, the stored grey levels (0-255: window/level then re-windows an image that was
  already windowed once, and the viewer says so).
- Heatmap: the Grad-CAM map of the predicted class, mapped from the model's input square back onto
  the image's own rows and columns (`lungcad.data.transforms.to_source_geometry`: the inverse of the
  crop to the body, the padding and the resize), quantised to uint8 (255 = 1.0) and coloured in the
  browser, so the colour legend is the colour map actually applied.

Both are NumPy .npy arrays (self-describing: dtype and shape in the header); the viewer parses them.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lungcad.data.transforms import Preprocessing, to_source_geometry
from lungcad.errors import LungcadError
from lungcad.utils import atomic_path

__all__ = [
    "BUNDLE",
    "LUNG",
    "MEDIASTINUM",
    "base_url",
    "bundle_built",
    "heatmap_target",
    "heatmap_array",
    "npy_bytes",
    "pixel_array",
    "presets",
    "viewer_config",
]

log = logging.getLogger(__name__)

BUNDLE = Path(__file__).resolve().parent / "static" / "viewer" / "viewer.js"  # built by `make install`
LUNG = (-600.0, 1500.0)  # (level, width) HU
MEDIASTINUM = (40.0, 400.0)
GREY = (127.5, 255.0)  # the whole 0-255 range: the image as uploaded


def bundle_built() -> bool:
    """Whether the viewer's script was built (web/viewer: npm ci && npm run build; `make install` does it)."""
    return BUNDLE.is_file()


def _preprocessing(store: Any) -> Preprocessing:
    """The contract's preprocessing (a Predictor's own `pp` carries a --window override if any)."""
    pp = getattr(store.predictor, "pp", None) or getattr(store.predictor.contract, "preprocessing", None)
    return pp if isinstance(pp, Preprocessing) else Preprocessing()


def unit_of(study: Any) -> str:
    """'HU' for DICOM CT, 'value' for other DICOM (rescaled stored values), 'grey' for JPG/PNG."""
    if not study.dicom_file:
        return "grey"
    return "HU" if (study.dicom_meta or {}).get("modality") == "CT" else "value"  # as lungcad.dicom.reader


def presets(store: Any, unit: str) -> list[dict]:
    """Window presets for `unit`: the model's training window first (what the model saw), then lung, mediastinum."""
    if unit == "grey":
        return [{"key": "model", "name": "As uploaded (0-255)", "level": GREY[0], "width": GREY[1]}]
    if unit == "value":  # not CT: no Hounsfield scale, so no CT preset means anything; the viewer takes min-max
        return [{"key": "model", "name": "Full range", "level": None, "width": None}]
    pp = _preprocessing(store)
    level, width = pp.window
    note = "declared at training" if pp.window_source == "declared" else "lungcad default: not declared at training"
    return [
        {"key": "model", "name": f"Model window {level:g}/{width:g}", "level": level, "width": width, "title":
         f"The window the model's training images were rendered at ({note})"},
        {"key": "lung", "name": "Lung", "level": LUNG[0], "width": LUNG[1]},
        {"key": "mediastinum", "name": "Mediastinum", "level": MEDIASTINUM[0], "width": MEDIASTINUM[1]},
    ]


def base_url(frame: Any) -> str:
    """Where a frame's data lives: /images/{id} for an image of a series (the exam page's frames),
    /studies/{id} for an exam (its display image: see routes.pages.display_image)."""
    from lungcad.web.db import Image as ImageRow

    return f"/images/{frame.id}" if isinstance(frame, ImageRow) else f"/studies/{frame.id}"


def heatmap_target(frame: Any) -> str:
    """The class a frame's heatmap explains and the legend names: for an image of a series, the series'
    label (every slice of the series explains the same class, so one legend is true for all of them);
    otherwise the frame's own label."""
    from lungcad.web.db import Image as ImageRow

    if isinstance(frame, ImageRow) and frame.series is not None and frame.series.label:
        return frame.series.label
    return frame.label


def viewer_config(request: Any, studies: list[Any], labels: list[str] | None = None, ai_hidden: bool = False) -> dict:
    """The viewer's JSON configuration for a list of frames (a series' images in slice order on the exam
    page; any objects with the fields `pixel_array` reads).

    Jinja global: templates call `viewer_config(request, frames)`. `labels` name the frames (default:
    "Image" for one frame, "Image k" for several). `ai_hidden` (a reader in reading mode before their
    unaided read): no heatmap, and no class named.
    """
    store = request.app.state.store
    unit = unit_of(studies[0]) if studies else "grey"
    if labels is None:
        labels = ["Image"] if len(studies) == 1 else [f"Image {k}" for k in range(1, len(studies) + 1)]
    frames = []
    for s, label in zip(studies, labels):
        base = base_url(s)
        png = f"{base}.png" if base.startswith("/images/") else f"{base}/image.png"
        frames.append({"pixels": f"{base}/pixels.npy", "heatmap": None if ai_hidden else f"{base}/heatmap.npy",
                       "image": png, "label": label})
    return {"frames": frames, "presets": presets(store, unit), "initial": "model", "unit": unit,
            "target": "" if ai_hidden or not studies else heatmap_target(studies[0]), "ai_hidden": ai_hidden}


# ------------------------------------------------------------------------------------------ arrays


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def pixel_array(store: Any, study: Any) -> np.ndarray:
    """(rows, columns) pixel values: int16 HU (float32 when they do not fit) for DICOM, uint8 grey otherwise.

    A multi-frame DICOM gives the frame the study was predicted on (the middle one, as
    `Predictor.load_pixels`). A colour DICOM has no HU: its stored image (grey) is sent instead.
    """
    if study.dicom_file:
        values = _dicom_values(store.path(study.dicom_file), study.id)
        if values is not None:
            return values
    with Image.open(store.path(study.image_file)) as im:
        grey = im if im.mode == "L" else im.convert("L")  # ITU-R 601 luma, as the model's grey decoding
        return np.asarray(grey, dtype=np.uint8)


def _dicom_values(path: Path, label: str) -> np.ndarray | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() not in ("MONOCHROME1", "MONOCHROME2"):
            return None
        arr = ds.pixel_array
    except Exception as exc:  # it decoded at upload: a failure now is the file or a missing plugin
        raise LungcadError(f"cannot decode the stored DICOM ({str(exc).splitlines()[0][:200]})", label) from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[len(arr) // 2]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = arr.astype(np.float64) * slope + intercept
    rounded = np.round(values)
    if np.array_equal(rounded, values) and rounded.min() >= -32768 and rounded.max() <= 32767:
        return rounded.astype(np.int16)
    return values.astype(np.float32)


def heatmap_array(store: Any, study: Any) -> np.ndarray:
    """The Grad-CAM map of the study's label on its own rows and columns, uint8 (0-255 = 0-1); cached per model.

    Grad-CAM runs on the stored pixels the model was given (the lossless PNG of the decoded, windowed
    image), and `to_source_geometry` undoes the contract's crop / pad / resize, so heatmap pixel
    (r, c) describes image pixel (r, c), which is also pixel (r, c) of `pixel_array`.
    """
    # per model: a server restarted on another run must not show the previous model's map
    # the label the page's legend names (`heatmap_target`: the series' label for an image of a series)
    label = heatmap_target(study)
    target = label if label in store.classes else None
    cached = store.path(f"explain/{study.id}_{store.model_sha256[:12] or 'model'}_{target or 'top'}_heatmap.npy")
    if cached.is_file():
        return np.load(cached, allow_pickle=False)
    source = store.path(study.image_file)
    pixels, _ = store.predictor.load_pixels(source)
    with store.lock:  # Grad-CAM runs one at a time (see service.Store)
        exp = store.predictor.explain(source, target=target)
    heat = to_source_geometry(np.asarray(exp.heatmap, dtype=np.float32), pixels, _preprocessing(store))
    out = np.round(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255).astype(np.uint8)
    with atomic_path(cached) as tmp:
        tmp.write_bytes(npy_bytes(out))
    return out
