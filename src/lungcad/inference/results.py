"""The result of one prediction (`Prediction`), its flat row, and writing rows to CSV or JSON.

A plain record with no model behind it, so what only reads or writes results (the DICOM writer,
sharded prediction merging parts) needs nothing from `lungcad.inference.predictor`.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lungcad.errors import LungcadError
from lungcad.utils import atomic_path

__all__ = [
    "DICOM_COLUMNS", "SERIES_TOP_K", "Prediction", "add_to_series", "aggregate_series", "decide", "prediction_columns",
    "series_key_indices", "write_predictions",
]

SERIES_TOP_K = 3  # slices averaged for a series' probabilities (see lungcad.inference.predictor's docstring)
DICOM_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "InstanceNumber", "frame")


@dataclass
class Prediction:
    source: str  # file path / upload name ("file.dcm#3" for frame 3; a folder for a series row)
    probabilities: dict[str, float]  # calibrated (contract temperature), by class name
    label: str  # predicted class at the contract's thresholds
    malignant_probability: float
    decision: str  # "malignant" or "not malignant" at contract.thresholds["malignant"]
    ood: bool  # the feature-space detector or the appearance check flagged it (reasons in ood_reasons)
    ood_score: float | None
    error: str = ""  # "" when fine; one line otherwise (the file is still reported)
    model_sha256: str = ""
    dicom: dict = field(default_factory=dict)  # UIDs (+ modality, instance, frame); never patient identity
    level: str = "image"  # "image", "frame" (of a multi-frame DICOM) or "series" (aggregate)
    slices: int = 1  # images aggregated into this row (series rows)
    cam_path: str = ""  # Grad-CAM overlay PNG, when asked for
    ood_reasons: list[str] = field(default_factory=list)  # why `ood` is set, one line each ("; " in CSV/JSON)

    @classmethod
    def failed(cls, source: str, error: str, model_sha256: str = "", dicom: dict | None = None) -> Prediction:
        return cls(source=source, probabilities={}, label="", malignant_probability=math.nan, decision="",
                   ood=False, ood_score=None, error=error, model_sha256=model_sha256, dicom=dict(dicom or {}))

    @classmethod
    def from_row(cls, row: dict, classes: list[str]) -> Prediction:
        """Inverse of `to_row` (merging sharded or resumed results)."""
        dicom = {k: row[k] for k in DICOM_COLUMNS if row.get(k) is not None}
        if row.get("error"):
            return cls.failed(row["source"], row["error"], row.get("model_sha256", ""), dicom)
        return cls(source=row["source"], probabilities={c: float(row[f"p_{c}"]) for c in classes},
                   label=row["label"], malignant_probability=float(row["malignant_probability"]),
                   decision=row["decision"], ood=bool(row["ood"]),
                   ood_score=None if row.get("ood_score") is None else float(row["ood_score"]),
                   model_sha256=row.get("model_sha256", ""), dicom=dicom, level=row.get("level", "image"),
                   slices=int(row.get("slices") or 1), cam_path=row.get("cam_path") or "",
                   ood_reasons=[r for r in (row.get("ood_reasons") or "").split("; ") if r])

    def to_row(self) -> dict:
        """Flat dict for CSV/JSON: p_<class> columns, DICOM UIDs as columns; None where not applicable."""
        ok = not self.error
        row: dict = {"source": self.source, "level": self.level, "label": self.label or None,
                     "decision": self.decision or None,
                     "malignant_probability": round(self.malignant_probability, 6) if ok else None}
        for name, p in self.probabilities.items():
            row[f"p_{name}"] = round(float(p), 6)
        row["ood"] = self.ood if ok else None
        row["ood_score"] = round(self.ood_score, 6) if self.ood_score is not None else None
        row["ood_reasons"] = "; ".join(self.ood_reasons) if ok else None
        row["error"] = self.error
        row["model_sha256"] = self.model_sha256
        row["slices"] = self.slices
        for key in DICOM_COLUMNS:
            row[key] = self.dicom.get(key)
        row["cam_path"] = self.cam_path or None
        return row


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """CSV columns of `Prediction.to_row` for a model's classes (fixed, whatever the rows hold)."""
    return (["source", "level", "label", "decision", "malignant_probability"]
            + [f"p_{c}" for c in classes]
            + ["ood", "ood_score", "ood_reasons", "error", "model_sha256", "slices", *DICOM_COLUMNS, "cam_path"])


def add_to_series(series: dict[str, dict[tuple, Prediction]], pred: Prediction) -> None:
    """File a slice's prediction under its SeriesInstanceUID (series: UID -> (SOP, frame) -> prediction).

    Failed rows, series rows and non-DICOM images are left out; the same instance twice (e.g.
    re-encoded copies) counts once.
    """
    uid = pred.dicom.get("SeriesInstanceUID")
    if uid and not pred.error and pred.level != "series":
        series.setdefault(uid, {})[(pred.dicom.get("SOPInstanceUID"), pred.dicom.get("frame"))] = pred


def decide(probs: Sequence[float], classes: Sequence[str], task: str, threshold: float | None) -> tuple[str, float, str]:
    """(label, p(malignant), decision) under the one decision rule (`lungcad.evaluation.metrics.predict_labels`)
    at `threshold` (the contract's `decision_threshold()`)."""
    import numpy as np

    from lungcad.evaluation.metrics import predict_labels

    probs = np.asarray(probs, dtype=float)
    classes = list(classes)
    label = classes[int(predict_labels(probs[None, :], task, threshold, classes)[0])]
    return label, float(probs[classes.index("malignant")]), "malignant" if label == "malignant" else "not malignant"


def series_key_indices(preds: Sequence[Prediction]):
    """Indices of the SERIES_TOP_K slices a series result is the mean of (the series rule in
    lungcad.inference.predictor's docstring): the highest p(malignant) among the slices that are
    not out of distribution (all slices if every one is), most malignant first."""
    import numpy as np

    flags = np.array([p.ood for p in preds], dtype=bool)
    use = np.flatnonzero(~flags) if (~flags).any() else np.arange(len(preds))
    p_mal = np.array([p.malignant_probability for p in preds], dtype=float)
    return use[np.argsort(-p_mal[use], kind="stable")[:SERIES_TOP_K]]


def aggregate_series(source: str, preds: Sequence[Prediction], classes: Sequence[str], task: str,
                     threshold: float | None, model_sha256: str = "") -> Prediction:
    """One series-level Prediction from its slices: what `lungcad predict` and the web app both use.

    Probabilities: the mean over `series_key_indices`; label and decision by `decide`; flagged OOD
    when more than half of the slices are; ood_score the median slice score.
    """
    import numpy as np

    classes = list(classes)
    probs = np.array([[p.probabilities[c] for c in classes] for p in preds], dtype=float)
    flags = np.array([p.ood for p in preds], dtype=bool)
    agg = probs[series_key_indices(preds)].mean(axis=0)
    scores = [p.ood_score for p in preds if p.ood_score is not None]
    label, p_mal, decision = decide(agg, classes, task, threshold)
    dicom = {k: preds[0].dicom[k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "Modality") if k in preds[0].dicom}
    ood = bool(flags.mean() > 0.5)
    return Prediction(
        source=source, probabilities={c: float(p) for c, p in zip(classes, agg)}, label=label,
        malignant_probability=p_mal, decision=decision, ood=ood,
        ood_score=float(np.median(scores)) if scores else None, model_sha256=model_sha256,
        dicom=dicom, level="series", slices=len(preds),
        ood_reasons=[f"{int(flags.sum())} of {len(preds)} slices out of distribution"] if ood else [],
    )


def write_predictions(predictions: Iterable[Prediction], out: str | Path | None, columns: list[str]
                      ) -> tuple[int, int]:
    """Stream rows to `out` (.csv or .json, written atomically) or CSV on stdout; returns (rows, failed)."""
    fmt = "csv" if out is None else Path(out).suffix.lower().lstrip(".")
    if fmt not in ("csv", "json"):
        raise LungcadError("output file must end in .csv or .json", out)
    counts = [0, 0]

    def emit(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
        if fmt == "csv":
            writer.writeheader()
        else:
            fh.write("[")
        for pred in predictions:
            row = pred.to_row()
            if fmt == "csv":
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            else:
                row = {k: row.get(k) for k in columns}  # the same keys in every object, null when n/a
                fh.write(("," if counts[0] else "") + "\n  " + json.dumps(row))
            counts[0] += 1
            counts[1] += bool(pred.error)
        if fmt == "json":
            fh.write("\n]\n")

    if out is None:
        emit(sys.stdout)
        sys.stdout.flush()
    else:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
            emit(fh)
    return counts[0], counts[1]
