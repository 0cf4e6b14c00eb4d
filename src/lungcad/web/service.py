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
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload

from lungcad.utils import atomic_path, keyed_hash, sha256_bytes
from lungcad.web.batcher import MicroBatcher
from lungcad.web.db import Read, Study, User, as_utc, audit, new_id, private_dir
from lungcad.web.uploads import check_upload, deidentify_upload

__all__ = [
    "EXPLAIN_SIZE",
    "AI_FIELDS",
    "AiResult",
    "PredictorLike",
    "Store",
    "discard_files",
    "explain_images",
    "feedback_csv",
    "inference_workers",
    "list_studies",
    "process_upload",
    "record_upload",
    "storage_health",
    "storage_problem",
    "study_ai_result",
    "study_dict",
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


class AiResult(NamedTuple):
    """The AI result of a study as the reading pilot sees it."""

    label: str  # the model's label (what a reader agrees or disagrees with)
    p_malignant: float | None
    decision: str


def study_ai_result(study: Study) -> AiResult:
    """The AI result of a study: the one place the reading pilot (web.reading) reads it from, so it can
    be re-pointed when a study becomes an exam of series (the exam-level result then)."""
    return AiResult(study.label, study.malignant_probability, study.decision)


AI_FIELDS = ("label", "decision", "malignant_probability", "probabilities", "ood", "ood_score", "ood_reasons")


def study_dict(study: Study, with_feedback: bool = False, hide_ai: bool = False) -> dict:
    """A study as the API returns it. `hide_ai` (a reader in reading mode before their unaided read):
    the AI result, and other readers' reads (which carry it), are left out: null, `ai_hidden` true."""
    reads = [r for r in getattr(study, "reads", []) if r.final_label]
    d = {
        "id": study.id, "created_at": as_utc(study.created_at).isoformat(), "kind": study.kind,
        "input_sha256": study.input_sha256, "width": study.width, "height": study.height,
        "label": study.label, "decision": study.decision, "malignant_probability": study.malignant_probability,
        "probabilities": study.probabilities, "ood": study.ood, "ood_score": study.ood_score,
        "ood_reasons": list(study.ood_reasons or []),
        "model_sha256": study.model_sha256, "url": f"/studies/{study.id}",
        "feedback_count": len(reads),  # readers with a final read (one read per reader)
        "disagreement": any(not r.agree for r in reads),
        "ai_hidden": hide_ai,
    }
    if hide_ai:
        d.update(dict.fromkeys(AI_FIELDS), disagreement=None)
    if with_feedback:
        from lungcad.web.reading import read_dict

        d["feedback"] = [] if hide_ai else [read_dict(r) for r in reads]
    return d


def list_studies(session: Session, status: str = "all", limit: int = 100, offset: int = 0) -> list[Study]:
    """Recent studies; status: all / pending (no final read) / reviewed / disagree (a final read differs from the AI)."""
    q = select(Study).options(selectinload(Study.reads).selectinload(Read.user), selectinload(Study.user))
    final = select(Read.study_id).where(Read.final_label.is_not(None))
    if status == "disagree":  # derived from the labels: a final read that differs from the AI's label
        q = q.where(Study.id.in_(final.where(Read.final_label != Read.model_label)))
    elif status == "pending":
        q = q.where(~Study.id.in_(final))
    elif status == "reviewed":
        q = q.where(Study.id.in_(final))
    q = q.order_by(Study.created_at.desc(), Study.id).limit(max(1, min(limit, 1000))).offset(max(0, offset))
    return list(session.scalars(q))


def wilson(k: int, n: int) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion (scipy), None when n = 0."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _csv_safe(value: Any) -> Any:
    # Spreadsheet formula injection: a comment starting with = + - @ would run as a formula in Excel.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def feedback_csv(session: Session) -> str:
    """One row per read (the latest state of each reader's read of each study); `agree` derived."""
    from lungcad.web.db import ReferenceDiagnosis

    reads = session.scalars(
        select(Read).where(Read.final_label.is_not(None))
        .options(selectinload(Read.user), selectinload(Read.study)).order_by(Read.id)
    )
    refs = {r.study_id: r for r in session.scalars(select(ReferenceDiagnosis))}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([
        "read_id", "updated_at", "user", "study_id", "mode", "unaided_label", "unaided_confidence", "model_label",
        "model_malignant_probability", "model_decision", "clinician_label", "agree", "confidence", "revisions",
        "reference_label", "reference_source", "comment", "model_sha256",
    ])
    for r in reads:
        ref = refs.get(r.study_id)
        w.writerow([_csv_safe(v) for v in (
            r.id, as_utc(r.updated_at).isoformat(), r.user.username, r.study_id, r.mode, r.unaided_label or "",
            r.unaided_confidence or "", r.model_label, r.study.malignant_probability, r.study.decision, r.final_label,
            int(bool(r.agree)), r.final_confidence, r.revisions, ref.label if ref else "", ref.source if ref else "",
            r.comment, r.model_sha256,
        )])
    return buf.getvalue()
