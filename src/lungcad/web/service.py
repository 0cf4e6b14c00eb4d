"""What the web pages and the REST API do, independent of HTTP: uploads, predictions, feedback, stats."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from lungcad.errors import LungcadError
from lungcad.utils import atomic_path, keyed_hash, sha256_bytes
from lungcad.web.batcher import MicroBatcher
from lungcad.web.db import (
    ExamIdentifiers,
    ExamResult,
    Image,
    ImageIdentifiers,
    Read,
    Series,
    Study,
    User,
    as_utc,
    audit,
    exam_result,
    new_id,
    private_dir,
)
from lungcad.web.uploads import check_modality, deidentify_upload, inspect_upload

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
    "EXAM_AI_FIELDS",
    "ExamResult",
    "FileResult",
    "exam_result",
    "headline",
    "target_sensitivity",
    "find_existing",
    "image_dict",
    "ingest",
    "iso",
    "keep_identity",
    "read_dict",
    "refresh_series",
    "series_dict",
    "storage_health",
    "storage_problem",
    "store_image",
    "study_ai_result",
    "study_dict",
    "wilson",
]

log = logging.getLogger(__name__)

UPLOAD_WORKERS = 4  # files of one upload processed at once (see ingest)
EXPLAIN_SIZE = 384  # display size of the model-input / Grad-CAM images (upscaled from the model's size)


class PredictorLike(Protocol):
    """What the web app needs of lungcad.inference.predictor.Predictor (a fake in unit tests)."""

    contract: Any

    def load_pixels(self, data: bytes | Path, name: str | None = None) -> tuple[np.ndarray, dict]: ...

    def prepare(self, pixels: np.ndarray) -> Any: ...

    def predict_prepared(self, tensors: list[Any], sources: list[str] | None = None,
                         pixels: list[np.ndarray] | None = None) -> list[Any]: ...

    def explain(self, data: bytes | Path, target: Any = None) -> Any: ...

    def source_heatmap(self, exp: Any, pixels: np.ndarray) -> np.ndarray: ...  # results for a PACS (web.pacs)


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
    def colour(self) -> str:
        """The contract's input colour: "grey" (a CT model) or "rgb" (histopathology)."""
        pp = getattr(self.predictor.contract, "preprocessing", None)
        return str(getattr(pp, "colour", "grey") or "grey")

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
        PILImage.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=1)


# ------------------------------------------------------------------------------------ exam result


def refresh_series(session: Session, store: Store, series: Series) -> Series:
    """Recompute a series' result from its images with the rule `lungcad predict` uses for a series
    (`lungcad.inference.results.aggregate_series`; one image: that image's result), its key
    slices and its per-slice score strip (slice order: InstanceNumber, then upload order)."""
    from lungcad.inference.results import Prediction, aggregate_series, series_key_indices

    images = list(session.scalars(select(Image).where(Image.series_id == series.id)
                                  .order_by(Image.position, Image.created_at, Image.id)))
    scored = [im for im in images if im.label and im.malignant_probability is not None]
    series.images_count = len(images)
    series.slice_scores = [[im.id, round(float(im.malignant_probability), 4), bool(im.ood)] for im in scored]
    if not scored:
        return series
    preds = [Prediction(source=im.id, probabilities=dict(im.probabilities), label=im.label,
                        malignant_probability=float(im.malignant_probability), decision=im.decision, ood=bool(im.ood),
                        ood_score=im.ood_score, model_sha256=im.model_sha256, ood_reasons=list(im.ood_reasons or []))
             for im in scored]
    if len(preds) == 1:
        result, keys = preds[0], [0]
    else:
        contract = store.predictor.contract
        result = aggregate_series(f"series {series.id}", preds, store.classes, contract.task,
                                  contract.decision_threshold(), store.model_sha256)
        keys = [int(i) for i in series_key_indices(preds)]
    series.label, series.decision = result.label, result.decision
    series.malignant_probability = float(result.malignant_probability)
    series.probabilities = {k: float(v) for k, v in result.probabilities.items()}
    series.ood, series.ood_score = bool(result.ood), _float(result.ood_score)
    series.ood_reasons = list(result.ood_reasons or [])
    series.key_images = [scored[i].id for i in keys]
    series.model_sha256 = result.model_sha256 or store.model_sha256
    return series


def target_sensitivity(contract: Any) -> float | None:
    """The sensitivity the operating threshold was chosen for, as recorded in the run contract."""
    op = (getattr(contract, "training", None) or {}).get("operating_point") or {}
    value = (op.get("validation") or {}).get("target_sensitivity", op.get("target_sensitivity"))
    return None if value is None else float(value)


def _two(p: float, other: float) -> tuple[str, str]:
    """Both numbers with as few decimals (2 to 4) as tell them apart, so "below" never reads 0.42 < 0.42."""
    for digits in (2, 3, 4):
        a, b = f"{p:.{digits}f}", f"{other:.{digits}f}"
        if a != b or digits == 4:
            return a, b
    return f"{p:.4f}", f"{other:.4f}"


def headline(result: Any, contract: Any) -> str:
    """The result in words, following the decision rule (`lungcad.evaluation.metrics.predict_labels`
    at the contract's `decision_threshold()`), e.g. "benign: p(malignant) 0.40 is below the operating
    threshold 0.42 chosen for 95 % sensitivity, and benign is the more probable of the other two"."""
    label, probs = result.label, dict(result.probabilities or {})
    if not label or "malignant" not in probs:
        return "no result: nothing in this exam could be scored"
    p_mal = float(probs["malignant"])
    threshold = contract.decision_threshold()
    if threshold is None:
        return (f"{label}: the most probable class (p {probs[label]:.2f}); this model has no fitted operating threshold, "
                "so the decision is the most probable class")
    target = target_sensitivity(contract)
    chosen = f" chosen for {target * 100:.0f} % sensitivity" if target is not None else ""
    pm, th = _two(p_mal, threshold)
    if label == "malignant":
        return f"malignant: p(malignant) {pm} is at or above the operating threshold {th}{chosen}"
    others = [c for c in probs if c != "malignant"]
    head = f"{label}: p(malignant) {pm} is below the operating threshold {th}{chosen}"
    if len(others) < 2:
        return head
    rest = sorted((c for c in others if c != label), key=lambda c: -probs[c])
    group = "the more probable of the other two" if len(others) == 2 else f"the most probable of the other {len(others)}"
    a, b = _two(float(probs[label]), float(probs[rest[0]]))
    return f"{head}, and {label} is {group} ({a} against {rest[0]} {b})"


# ------------------------------------------------------------------------------------ uploads


@dataclass
class FileResult:
    """What became of one uploaded file (or zip member): created, existing (idempotent), rejected, error."""

    name: str = ""  # shown back to the uploader only, never stored
    status: str = "rejected"
    study_id: str = ""
    series_id: str = ""
    image_id: str = ""
    error: str = ""
    label: str = ""  # the image's own result
    decision: str = ""
    storage: bool = False  # failed because storage cannot be written
    internal: bool = False  # failed unexpectedly (the server log has a reference)


def find_existing(session: Session, input_sha256: str, sop_key: str | None) -> Image | None:
    """An image already stored with this SOP Instance UID (keyed hash) or these exact bytes."""
    if sop_key:
        found = session.scalar(select(Image).where(Image.sop_key == sop_key).limit(1))
        if found is not None:
            return found
    return session.scalar(select(Image).where(Image.input_sha256 == input_sha256).order_by(Image.created_at).limit(1))


def store_image(session: Session, store: Store, user: User, raw: bytes, label: str, batch_id: str,
                case_label: str = "") -> FileResult:
    """Validate, check the modality, de-identify, predict and record one file into its exam and series,
    and commit; LungcadError for unusable input. Idempotent: a file whose SOP Instance UID or bytes
    are already stored is not stored again (status "existing", the stored image's ids).

    Exam: the DICOM Study Instance UID, or for JPG/PNG the uploader's case label (one case per
    user and label; without a label, one case per upload). Series: the Series Instance UID, or
    the case's one implicit series. The decoded pixels are both what the model sees and what is
    stored. `label` names the file in error messages only (never stored or used as a path).
    """
    info = inspect_upload(raw, label)
    check_modality(info, raw, store.colour, label)
    input_sha = sha256_bytes(raw)
    sop_key = keyed_hash(store.secret, "sop:" + info.sop_uid) if info.sop_uid else None
    existing = find_existing(session, input_sha, sop_key)
    if existing is not None:
        audit(session, "upload_duplicate", user, target=existing.study_id, input_sha256=input_sha, image=existing.id)
        session.commit()
        return FileResult(status="existing", study_id=existing.study_id, series_id=existing.series_id,
                          image_id=existing.id, label=existing.label, decision=existing.decision)
    case_label = case_label.strip()[:128]
    if info.kind == "dicom" and info.study_uid:
        exam_key = keyed_hash(store.secret, "study:" + info.study_uid)
    elif case_label:
        exam_key = keyed_hash(store.secret, f"case:{user.id}:{case_label}")
    else:
        exam_key = keyed_hash(store.secret, f"upload:{batch_id}:{info.kind == 'dicom'}")
    series_key = (keyed_hash(store.secret, "series:" + info.series_uid) if info.kind == "dicom" and info.series_uid
                  else "case" if info.kind != "dicom" else keyed_hash(store.secret, f"upload:{batch_id}:series"))

    dicom_bytes, dicom_meta = None, {}
    if info.kind == "dicom":
        # De-identify first, then work only from the de-identified bytes: PHI never reaches disk.
        dicom_bytes, dicom_meta = deidentify_upload(raw, store.secret, label)
        raw = dicom_bytes
    pixels, _ = store.predictor.load_pixels(raw, name=label)
    image_id = new_id()  # known before the INSERT, so the files are named without an extra round trip
    # Files first, while other uploads' forward pass runs: after its own prediction a request only
    # has the database rows left to write (shorter turn-around, so batches fill up).
    image_file = f"images/{image_id}.png"
    dicom_file = f"dicom/{image_id}.dcm" if dicom_bytes is not None else None
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
        exam = session.scalar(select(Study).where(Study.exam_key == exam_key))
        if exam is None:
            exam = Study(id=new_id(), user_id=user.id, kind=info.kind, group_key=exam_key, exam_key=exam_key,
                         model_sha256=store.model_sha256, series=[], feedback=[])
            exam.identifiers = ExamIdentifiers(**info.identifiers, case_label=case_label)
            session.add(exam)
            audit(session, "exam_created", user, target=exam.id, kind=info.kind)  # no identifiers: they stay put
        else:
            keep_identity(exam, info.identifiers)
        series = session.scalar(select(Series).where(Series.study_id == exam.id, Series.series_key == series_key))
        if series is None:
            number = 1 + (session.scalar(select(func.count()).select_from(Series).where(Series.study_id == exam.id)) or 0)
            series = Series(id=new_id(), study_id=exam.id, series_key=series_key, number=number,
                            modality=info.modality[:16] or ("" if info.kind == "dicom" else "image"), images=[])
            session.add(series)
        position = float(info.instance_number) if info.instance_number is not None else float(
            1 + (session.scalar(select(func.count()).select_from(Image).where(Image.series_id == series.id)) or 0))
        image = Image(
            id=image_id, series_id=series.id, study_id=exam.id, user_id=user.id, kind=info.kind,
            input_sha256=input_sha, sop_key=sop_key, instance_number=info.instance_number, position=position,
            image_file=image_file, dicom_file=dicom_file, width=info.width, height=info.height,
            label=prediction.label, decision=prediction.decision,
            malignant_probability=_float(prediction.malignant_probability),
            probabilities={k: float(v) for k, v in prediction.probabilities.items()}, ood=bool(prediction.ood),
            ood_score=_float(prediction.ood_score), ood_reasons=list(getattr(prediction, "ood_reasons", None) or []),
            error="", model_sha256=prediction.model_sha256 or store.model_sha256,
            dicom_meta={k: v for k, v in dicom_meta.items() if v},
        )
        session.add(image)
        if info.kind == "dicom" and info.sop_uid:
            image.identifiers = ImageIdentifiers(image_id=image_id, **info.image_identifiers())
        audit(session, "upload", user, target=exam.id, input_sha256=input_sha, kind=info.kind, width=info.width,
              height=info.height, image=image_id)
        audit(session, "prediction", user, target=exam.id, input_sha256=input_sha, model_sha256=image.model_sha256,
              label=image.label, decision=image.decision, ood=image.ood, image=image_id)
        session.commit()
    except BaseException:
        session.rollback()
        discard_files(store, image_file, dicom_file)
        raise
    return FileResult(status="created", study_id=exam.id, series_id=series.id, image_id=image_id,
                      label=image.label, decision=image.decision)


def keep_identity(exam: Study, identifiers: dict) -> None:
    """Fill in the patient and study attributes of an exam stored before they were kept (migration 0007)
    from a later instance of it, so that its results can go back to the PACS."""
    ids = exam.identifiers
    if ids is None or ids.identity_kept or not identifiers.get("identity_kept"):
        return
    for column, value in identifiers.items():
        if column not in ("accession_number", "study_uid"):  # what the exam was found under stays as it is
            setattr(ids, column, value)


def ingest(sessions: sessionmaker, store: Store, user: User, files: Iterable[tuple[str, str, bytes | LungcadError]],
           case_label: str = "", via: str = "web") -> list[FileResult]:
    """Store every file of one upload (`uploads.expand_upload` items: display name, error label,
    bytes or the reason they are unusable), then the results of the series they went into.

    Each file is its own transaction, with its own session (the request's connection goes back
    to the pool while a file waits for the model): a bad file is a per-file result, and no image
    row exists without its files or the reverse. A file that loses a race with a concurrent
    upload of the same instance (or of the first instance of an exam) is retried and comes back
    "existing" (or joins the exam the other upload created).
    """
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    batch = secrets.token_hex(8)
    results: list[FileResult] = []
    touched: dict[str, None] = {}
    it = iter(files)
    # A few files in flight at once, so a series' slices share forward passes (store.batcher) and
    # one slice's file writes overlap another's inference; results stay in upload order, and at
    # most UPLOAD_WORKERS files are held in memory.
    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="upload") as pool:
        while chunk := list(islice(it, UPLOAD_WORKERS)):
            done = pool.map(lambda item: _ingest_one(sessions, store, user, item[2], item[1], batch, case_label, via),
                            chunk)
            for (name, _, _), result in zip(chunk, done):
                result.name = name
                results.append(result)
                if result.status == "created":
                    touched[result.series_id] = None
    if touched:
        with sessions() as session:
            exams: dict[str, None] = {}
            for series_id in touched:
                series = session.get(Series, series_id)
                if series is not None:
                    refresh_series(session, store, series)
                    exams[series.study_id] = None
            for study_id in exams:  # series numbered in the order they arrived (files run concurrently)
                ordered = session.scalars(select(Series).where(Series.study_id == study_id)
                                          .order_by(Series.created_at, Series.id))
                for number, series in enumerate(ordered, 1):
                    series.number = number
            session.commit()
    return results


def _ingest_one(sessions: sessionmaker, store: Store, user: User, raw: bytes | LungcadError, label: str, batch: str,
                case_label: str, via: str) -> FileResult:
    for attempt in range(3):
        with sessions() as session:
            try:
                if isinstance(raw, LungcadError):
                    raise raw
                return store_image(session, store, user, raw, label, batch, case_label)
            except IntegrityError:
                session.rollback()  # a concurrent upload stored the same instance or created the exam: retry
                if attempt == 2:
                    raise
            except LungcadError as exc:
                session.rollback()
                audit(session, "upload_rejected", user, reason=str(exc)[:200], **({"via": via} if via != "web" else {}))
                session.commit()
                return FileResult(status="rejected", error=str(exc))
            except Exception as exc:
                # One file's unexpected failure must not drop the files after it (nor hide the ones before):
                # it gets a per-file result with a reference; the traceback goes to the server log only.
                session.rollback()
                if reason := storage_problem(exc):
                    log.error("storage unavailable storing %s of an upload: %s", label, exc)
                    return FileResult(status="error", error=f"not saved: {reason}", storage=True)
                ref = secrets.token_hex(4)
                log.error("unhandled error %s storing %s of an upload", ref, label, exc_info=exc)
                return FileResult(status="error", error=f"Something went wrong (reference {ref}).", internal=True)
    raise AssertionError("unreachable")


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


def explain_images(store: Store, image: Image) -> tuple[Path, Path]:
    """(model-input image, Grad-CAM overlay) PNGs for an image, computed once and cached.

    Grad-CAM runs on the stored de-identified pixels, which are exactly what the model received
    (lossless PNG of the decoded/windowed image), so the map matches the stored prediction.
    """
    inp = store.path(f"explain/{image.id}_input.png")
    overlay = store.path(f"explain/{image.id}_overlay.png")
    if inp.is_file() and overlay.is_file():
        return inp, overlay
    with store.lock:
        exp = store.predictor.explain(store.path(image.image_file))
    for path, arr in ((inp, exp.image), (overlay, exp.overlay)):
        im = PILImage.fromarray(np.ascontiguousarray(np.asarray(arr, dtype=np.uint8)))
        im = im.resize((EXPLAIN_SIZE, EXPLAIN_SIZE), PILImage.Resampling.BILINEAR)
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
    return inp, overlay


class AiResult(NamedTuple):
    """The AI result of a study as the reading pilot sees it."""

    label: str  # the model's label (what a reader agrees or disagrees with)
    p_malignant: float | None
    decision: str


def study_ai_result(study: Study) -> AiResult:
    """The AI result of a study (exam) as the reading pilot (web.reading) reads it: the exam-level
    result, `exam_result` (the one place it is derived)."""
    result = exam_result(study)
    return AiResult(result.label, result.malignant_probability, result.decision)


AI_FIELDS = ("label", "decision", "malignant_probability", "probabilities", "ood", "ood_score", "ood_reasons")
# what else names the AI result of an exam or a series: which series and slices it rests on, the score strip
EXAM_AI_FIELDS = AI_FIELDS + ("result_series_id", "key_image_id")


def iso(value: Any) -> str | None:
    """A stored timestamp as ISO 8601 with its UTC offset (SQLite hands timestamps back naive)."""
    return None if value is None else as_utc(value).isoformat()


def image_dict(image: Image, hide_ai: bool = False) -> dict:
    """An image as the API returns it. `hide_ai` (a reader in reading mode before their unaided read of
    the exam): the model's result on it is null, `ai_hidden` true."""
    d = {
        "id": image.id, "study_id": image.study_id, "series_id": image.series_id, "created_at": iso(image.created_at),
        "kind": image.kind, "input_sha256": image.input_sha256, "instance_number": image.instance_number,
        "width": image.width, "height": image.height, "label": image.label, "decision": image.decision,
        "malignant_probability": image.malignant_probability, "probabilities": dict(image.probabilities or {}),
        "ood": bool(image.ood), "ood_score": image.ood_score, "ood_reasons": list(image.ood_reasons or []),
        "model_sha256": image.model_sha256, "modality": str((image.dicom_meta or {}).get("modality", "")),
        "url": f"/images/{image.id}.png", "ai_hidden": hide_ai,
    }
    if hide_ai:
        d.update(dict.fromkeys(AI_FIELDS))
    return d


def series_dict(series: Series, with_images: bool = False, hide_ai: bool = False) -> dict:
    """A series as the API returns it; `hide_ai`: its result, key images and score strip left out."""
    d = {
        "id": series.id, "study_id": series.study_id, "number": series.number, "created_at": iso(series.created_at),
        "modality": series.modality, "images_count": series.images_count, "label": series.label,
        "decision": series.decision, "malignant_probability": series.malignant_probability,
        "probabilities": dict(series.probabilities or {}), "ood": bool(series.ood), "ood_score": series.ood_score,
        "ood_reasons": list(series.ood_reasons or []), "key_images": list(series.key_images or []),
        "slice_scores": [{"image_id": i, "malignant_probability": p, "ood": bool(o)}
                         for i, p, o in (series.slice_scores or [])],
        "model_sha256": series.model_sha256, "ai_hidden": hide_ai,
    }
    if hide_ai:
        d.update(dict.fromkeys(AI_FIELDS), key_images=[], slice_scores=[])
    if with_images:
        d["images"] = [image_dict(im, hide_ai) for im in series.images]
    return d


def study_dict(study: Study, with_feedback: bool = False, hide_ai: bool = False) -> dict:
    """The exam resource: its AI result (`exam_result`), its series, identifiers for the clinicians.
    `hide_ai` (a reader in reading mode before their unaided read): the AI result (of the exam, its
    series and images), and other readers' reads (which carry it), are left out: null, `ai_hidden` true."""
    result = exam_result(study)
    ids = study.identifiers
    reads = [r for r in getattr(study, "reads", []) if r.final_label]
    d = {
        "id": study.id, "created_at": iso(study.created_at), "kind": study.kind,
        "label": result.label, "decision": result.decision, "malignant_probability": result.malignant_probability,
        "probabilities": result.probabilities, "ood": result.ood, "ood_score": result.ood_score,
        "ood_reasons": result.ood_reasons, "model_sha256": result.model_sha256,
        "result_series_id": result.series.id if result.series is not None else None,
        "key_image_id": result.key_image_id or None,
        "series_count": result.series_count, "images_count": result.images_count,
        "series": [series_dict(s, hide_ai=hide_ai) for s in study.series],
        "identifiers": {"accession_number": ids.accession_number if ids else "",
                        "study_uid": ids.study_uid if ids else "", "case_label": ids.case_label if ids else ""},
        "url": f"/studies/{study.id}",
        "feedback_count": len(reads),  # readers with a final read (one read per reader)
        "disagreement": any(not r.agree for r in reads),
        "ai_hidden": hide_ai,
    }
    if hide_ai:
        d.update(dict.fromkeys(EXAM_AI_FIELDS), disagreement=None)
    if with_feedback:
        d["feedback"] = [] if hide_ai else [read_dict(r) for r in reads]
    return d


def read_dict(read: Read) -> dict:
    """A read as the API returns it (`agree` derived from the labels; also `lungcad.web.reading.read_dict`)."""
    return {
        "id": read.id, "study_id": read.study_id, "user": read.user.username if read.user else "",
        "mode": read.mode, "created_at": iso(read.created_at), "updated_at": iso(read.updated_at),
        "unaided_label": read.unaided_label, "unaided_confidence": read.unaided_confidence,
        "label": read.final_label, "confidence": read.final_confidence, "model_label": read.model_label,
        "agree": read.agree, "changed": read.changed, "comment": read.comment, "revisions": read.revisions,
        "model_sha256": read.model_sha256,
    }


def list_studies(session: Session, status: str = "all", limit: int = 100, offset: int = 0) -> list[Study]:
    """Recent exams; status: all / pending (no final read) / reviewed / disagree (a final read differs from the AI)."""
    q = select(Study).options(selectinload(Study.reads).selectinload(Read.user), selectinload(Study.user),
                              selectinload(Study.series), selectinload(Study.identifiers))
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
    """One row per read (the latest state of each reader's read of each exam); `agree` derived; the
    model columns are the exam's result (`exam_result`). De-identified: no exam identifiers."""
    from lungcad.web.db import ReferenceDiagnosis

    reads = session.scalars(
        select(Read).where(Read.final_label.is_not(None))
        .options(selectinload(Read.user), selectinload(Read.study).selectinload(Study.series)).order_by(Read.id)
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
        result = exam_result(r.study)
        w.writerow([_csv_safe(v) for v in (
            r.id, iso(r.updated_at), r.user.username, r.study_id, r.mode, r.unaided_label or "",
            r.unaided_confidence or "", r.model_label, result.malignant_probability, result.decision, r.final_label,
            int(bool(r.agree)), r.final_confidence, r.revisions, ref.label if ref else "", ref.source if ref else "",
            r.comment, r.model_sha256,
        )])
    return buf.getvalue()
