"""What the web pages and the REST API do, independent of HTTP: uploads, predictions, feedback, stats."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload

from lungcad.errors import LungcadError
from lungcad.utils import atomic_path, keyed_hash, sha256_bytes
from lungcad.web.batcher import MicroBatcher
from lungcad.web.db import Feedback, Study, User, audit, new_id, private_dir
from lungcad.web.uploads import check_upload, deidentify_upload

__all__ = [
    "EXPLAIN_SIZE",
    "FeedbackInput",
    "PredictorLike",
    "Store",
    "add_feedback",
    "discard_files",
    "explain_images",
    "feedback_csv",
    "feedback_dict",
    "inference_workers",
    "list_studies",
    "pilot_stats",
    "process_upload",
    "record_upload",
    "storage_health",
    "storage_problem",
    "study_dict",
    "validate_feedback",
    "wilson",
]

log = logging.getLogger(__name__)

EXPLAIN_SIZE = 384  # display size of the model-input / Grad-CAM images (upscaled from the model's size)


class PredictorLike(Protocol):
    """What the web app needs of lungcad.inference.predictor.Predictor (a fake in unit tests)."""

    contract: Any

    def load_pixels(self, data: bytes | Path, name: str | None = None) -> tuple[np.ndarray, dict]: ...

    def prepare(self, pixels: np.ndarray) -> Any: ...

    def predict_prepared(self, tensors: list[Any], sources: list[str] | None = None,
                         pixels: list[np.ndarray] | None = None) -> list[Any]: ...

    def explain(self, data: bytes | Path, target: Any = None) -> Any: ...


@dataclass
class Store:
    """Files of the web app under the data folder; names are generated ids, never upload filenames."""

    root: Path
    secret: str
    predictor: PredictorLike
    # Grad-CAM is CPU-bound and torch already uses every core: explanations run one at a time.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Concurrent uploads share forward passes on dedicated inference threads (see web/batcher.py).
    batcher: MicroBatcher = field(init=False)

    def __post_init__(self) -> None:
        workers, threads = inference_workers()
        self.batcher = MicroBatcher(self._predict_batch, workers=workers, init_worker=lambda: _set_torch_threads(threads))
        for sub in ("images", "dicom", "explain"):
            private_dir(self.root / sub)

    def _predict_batch(self, items: list[tuple[np.ndarray, str]]) -> list[Any]:
        # Preparation (torch resize) runs here too, under the worker's thread setting: request
        # threads then never start torch thread teams of their own.
        tensors = [self.predictor.prepare(pixels) for pixels, _ in items]
        return self.predictor.predict_prepared(tensors, [label for _, label in items],
                                               pixels=[pixels for pixels, _ in items])  # appearance check

    def predict(self, pixels: np.ndarray, label: str) -> Any:
        """The Prediction for decoded pixels (micro-batched with concurrent uploads)."""
        return self.batcher.submit((pixels, label))

    @property
    def model_sha256(self) -> str:
        return str(getattr(self.predictor.contract, "model_sha256", "") or "")

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.predictor.contract, "classes", []) or [])

    def path(self, relative: str) -> Path:
        return self.root / relative


def inference_workers(cores: int | None = None) -> tuple[int, int]:
    """(inference worker threads, torch threads each) for the cores this process may use.

    Two workers as soon as there are two cores, splitting the cores between them (see
    web/batcher.py for why). On 2 cores under load from 8 clients, 2 workers x 1 thread served
    5-10 % more uploads than 1 x 2 for both a 128 px and a 224 px model; more workers would only
    make each forward pass, hence each request, slower.
    """
    from lungcad.inference.engines import default_threads

    cores = cores or default_threads()
    workers = 2 if cores >= 2 else 1
    return workers, max(1, cores // workers)


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)  # per thread under OpenMP: only this worker's forward passes


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # zlib level 1: 4 ms instead of 10 ms (level 6) for a 512x512 slice, for files about 15 % larger;
    # this runs once per upload, on the cores the model needs.
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=1)


def process_upload(session: Session, store: Store, user: User, raw: bytes, batch_id: str, label: str = "upload") -> Study:
    """Validate, de-identify, predict and record one uploaded file; LungcadError for unusable input.

    The upload is decoded once: those pixels are both what the model sees and what is stored.
    `label` names the file in error messages only (it is never stored or used as a path).
    """
    kind, width, height = check_upload(raw, label)
    input_sha = sha256_bytes(raw)
    dicom_bytes, dicom_meta = None, {}
    if kind == "dicom":
        # De-identify first, then work only from the de-identified bytes: PHI never reaches disk.
        dicom_bytes, dicom_meta = deidentify_upload(raw, store.secret, label)
        raw = dicom_bytes
    pixels, _ = store.predictor.load_pixels(raw, name=label)
    study_id = new_id()  # known before the INSERT, so the files are named without an extra round trip
    # Files first, while other uploads' forward pass runs: after its own prediction a request only
    # has the database rows left to write (shorter turn-around, so batches fill up).
    image_file = f"images/{study_id}.png"
    dicom_file = f"dicom/{study_id}.dcm" if dicom_bytes is not None else None
    try:
        _write_png(store.path(image_file), pixels)
        if dicom_file is not None:
            with atomic_path(store.path(dicom_file)) as tmp:
                tmp.write_bytes(dicom_bytes)
    except BaseException:  # e.g. the disk filled up between the two files: leave neither behind
        discard_files(store, image_file, dicom_file)
        raise
    try:
        prediction = store.predict(pixels, label)
    except BaseException:
        discard_files(store, image_file, dicom_file)
        raise
    group = dicom_meta.get("study_uid") or batch_id
    study = Study(
        id=study_id, user_id=user.id, kind=kind, input_sha256=input_sha, group_key=keyed_hash(store.secret, group),
        image_file=image_file, dicom_file=dicom_file, width=width, height=height, label=prediction.label,
        decision=prediction.decision, malignant_probability=_float(prediction.malignant_probability),
        probabilities={k: float(v) for k, v in prediction.probabilities.items()}, ood=bool(prediction.ood),
        ood_score=_float(prediction.ood_score), ood_reasons=list(getattr(prediction, "ood_reasons", None) or []),
        error="", model_sha256=prediction.model_sha256 or store.model_sha256,
        dicom_meta={k: v for k, v in dicom_meta.items() if v}, feedback=[],
    )
    session.add(study)
    audit(session, "upload", user, target=study_id, input_sha256=input_sha, kind=kind, width=width, height=height)
    audit(
        session, "prediction", user, target=study_id, input_sha256=input_sha, model_sha256=study.model_sha256,
        label=study.label, decision=study.decision, ood=study.ood,
    )
    return study


def record_upload(session: Session, store: Store, user: User, raw: bytes, batch_id: str, label: str = "upload") -> Study:
    """`process_upload` and commit; if the commit fails, the files written for the study go too."""
    study = process_upload(session, store, user, raw, batch_id, label)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        discard_files(store, study.image_file, study.dicom_file)
        raise
    return study


def discard_files(store: Store, *relative: str | None) -> None:
    for rel in relative:
        if rel:
            try:
                store.path(rel).unlink(missing_ok=True)
            except OSError:  # a read-only folder cannot have had the file written either
                log.warning("could not remove %s", rel)


# errno values that mean "this storage cannot take writes now", as opposed to a bug
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def storage_problem(exc: BaseException) -> str | None:
    """A one-line reason if `exc` means the data folder or the database cannot be written; else None."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return f"the data folder cannot be written ({os.strerror(exc.errno)})"
    if isinstance(exc, OperationalError):
        return "the database cannot be written or reached (full, read-only or down)"
    return None


def storage_health(data_dir: Path, min_free_bytes: int = 64 * 1024 * 1024) -> str:
    """'ok', or why the data folder cannot take uploads (read-only, not writable, nearly full)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".health.", dir=data_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"not writable ({os.strerror(exc.errno) if exc.errno else exc})"
    try:
        st = os.statvfs(data_dir)
    except (OSError, AttributeError):  # no statvfs (Windows): the write probe above has to do
        return "ok"
    free = st.f_bavail * st.f_frsize
    return "ok" if free >= min_free_bytes else f"nearly full ({free // 1024 // 1024} MiB free)"


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def explain_images(store: Store, study: Study) -> tuple[Path, Path]:
    """(model-input image, Grad-CAM overlay) PNGs for a study, computed once and cached.

    Grad-CAM runs on the stored de-identified pixels, which are exactly what the model received
    (lossless PNG of the decoded/windowed image), so the map matches the stored prediction.
    """
    inp = store.path(f"explain/{study.id}_input.png")
    overlay = store.path(f"explain/{study.id}_overlay.png")
    if inp.is_file() and overlay.is_file():
        return inp, overlay
    with store.lock:
        exp = store.predictor.explain(store.path(study.image_file))
    for path, arr in ((inp, exp.image), (overlay, exp.overlay)):
        im = Image.fromarray(np.ascontiguousarray(np.asarray(arr, dtype=np.uint8)))
        im = im.resize((EXPLAIN_SIZE, EXPLAIN_SIZE), Image.Resampling.BILINEAR)
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
    return inp, overlay


@dataclass
class FeedbackInput:
    agree: bool
    label: str
    confidence: int
    comment: str = ""
    usability: int | None = None


def validate_feedback(fb: FeedbackInput, classes: list[str]) -> FeedbackInput:
    if fb.label not in classes:
        raise LungcadError(f"label must be one of {', '.join(classes)}")
    if not 1 <= int(fb.confidence) <= 5:
        raise LungcadError("confidence must be 1-5")
    if fb.usability is not None and not 1 <= int(fb.usability) <= 5:
        raise LungcadError("usability rating must be 1-5")
    if len(fb.comment) > 4000:
        raise LungcadError("comment too long (4000 characters at most)")
    return fb


def add_feedback(session: Session, store: Store, study: Study, user: User, fb: FeedbackInput) -> Feedback:
    """Store a clinician's feedback on a study (with the model sha it answers) and audit it."""
    fb = validate_feedback(fb, store.classes)
    # "agree" is derived from the labels when they contradict it, so the statistics stay coherent.
    agree = bool(fb.agree) if fb.label == study.label else False
    row = Feedback(
        study=study, user=user, agree=agree, label=fb.label, confidence=int(fb.confidence),
        comment=fb.comment.strip(), usability=fb.usability, model_label=study.label, model_sha256=study.model_sha256,
    )
    session.add(row)
    session.flush()
    audit(
        session, "feedback", user, target=study.id, input_sha256=study.input_sha256, model_sha256=study.model_sha256,
        feedback_id=row.id, agree=agree, label=fb.label,
    )
    return row


def study_dict(study: Study, with_feedback: bool = False) -> dict:
    d = {
        "id": study.id, "created_at": study.created_at.isoformat(), "kind": study.kind,
        "input_sha256": study.input_sha256, "width": study.width, "height": study.height,
        "label": study.label, "decision": study.decision, "malignant_probability": study.malignant_probability,
        "probabilities": study.probabilities, "ood": study.ood, "ood_score": study.ood_score,
        "ood_reasons": list(study.ood_reasons or []),
        "model_sha256": study.model_sha256, "url": f"/studies/{study.id}",
        "feedback_count": len(study.feedback),
        "disagreement": any(not f.agree for f in study.feedback),
    }
    if with_feedback:
        d["feedback"] = [feedback_dict(f) for f in study.feedback]
    return d


def feedback_dict(f: Feedback) -> dict:
    return {
        "id": f.id, "study_id": f.study_id, "user": f.user.username if f.user else "", "created_at": f.created_at.isoformat(),
        "agree": f.agree, "label": f.label, "model_label": f.model_label, "confidence": f.confidence,
        "comment": f.comment, "usability": f.usability, "model_sha256": f.model_sha256,
    }


def list_studies(session: Session, status: str = "all", limit: int = 100, offset: int = 0) -> list[Study]:
    """Recent studies; status: all / pending (no feedback) / disagree (some clinician disagreed)."""
    q = select(Study).options(selectinload(Study.feedback).selectinload(Feedback.user), selectinload(Study.user))
    if status == "disagree":
        q = q.where(Study.id.in_(select(Feedback.study_id).where(Feedback.agree.is_(False))))
    elif status == "pending":
        q = q.where(~Study.id.in_(select(Feedback.study_id)))
    elif status == "reviewed":
        q = q.where(Study.id.in_(select(Feedback.study_id)))
    q = q.order_by(Study.created_at.desc(), Study.id).limit(max(1, min(limit, 1000))).offset(max(0, offset))
    return list(session.scalars(q))


def wilson(k: int, n: int) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion (scipy), None when n = 0."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def pilot_stats(session: Session, classes: list[str]) -> dict:
    """Agreement overall and per model class (with CIs), model-vs-clinician confusion, usability, comments."""
    rows = list(session.scalars(select(Feedback).options(selectinload(Feedback.user)).order_by(Feedback.id)))
    n = len(rows)
    k = sum(r.agree for r in rows)
    per_class = []
    for c in classes:
        sub = [r for r in rows if r.model_label == c]
        kc = sum(r.agree for r in sub)
        per_class.append({"label": c, "n": len(sub), "agree": kc, "rate": kc / len(sub) if sub else None, "ci": wilson(kc, len(sub))})
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)  # rows: clinician, columns: model
    for r in rows:
        if r.label in index and r.model_label in index:
            confusion[index[r.label], index[r.model_label]] += 1
    ratings = [r.usability for r in rows if r.usability is not None]
    return {
        "feedback": n,
        "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
        "agree": k,
        "agreement": k / n if n else None,
        "agreement_ci": wilson(k, n),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": classes,
        "usability_n": len(ratings),
        "usability_mean": float(np.mean(ratings)) if ratings else None,
        "usability_hist": [ratings.count(i) for i in range(1, 6)],
        "comments": [feedback_dict(r) for r in reversed(rows) if r.comment][:100],
    }


def _csv_safe(value: Any) -> Any:
    # Spreadsheet formula injection: a comment starting with = + - @ would run as a formula in Excel.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def feedback_csv(session: Session) -> str:
    rows = session.scalars(
        select(Feedback).options(selectinload(Feedback.user), selectinload(Feedback.study)).order_by(Feedback.id)
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([
        "feedback_id", "created_at", "user", "study_id", "model_label", "model_malignant_probability",
        "model_decision", "clinician_label", "agree", "confidence", "usability", "comment", "model_sha256",
    ])
    for f in rows:
        w.writerow([_csv_safe(v) for v in (
            f.id, f.created_at.isoformat(), f.user.username, f.study_id, f.model_label,
            f.study.malignant_probability, f.study.decision, f.label, int(f.agree), f.confidence,
            "" if f.usability is None else f.usability, f.comment, f.model_sha256,
        )])
    return buf.getvalue()
