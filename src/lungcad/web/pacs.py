"""Results of a web-app exam back to the PACS (`lungcad serve --pacs`): re-identified SR + Secondary Captures,
queued in the DICOM outbox (`lungcad.dicom.queue.Outbox`) like the DICOM node's.

The data folder holds only de-identified DICOM (keyed-hash UIDs, no patient module). A result
built from that copy would land in the PACS under no patient and in a foreign study, so each key
slice's header is rebuilt IN MEMORY with the original identity kept in the identifying tables
(`ExamIdentifiers`: patient module, General Study attributes, Study UID; `ImageIdentifiers`: SOP
Instance, SOP Class and Series UIDs), and the node's builders (`lungcad.dicom.sr.build_series_report`,
`lungcad.dicom.writer.build_secondary_capture`) make the result objects from it, with the stored
series and image results. The objects go to `<data>/pacs-results/<exam>/<batch>/` under names that
identify nothing, are queued in `dicom_outbox` (so a failed send survives a restart and shows on
/admin/dicom-outbox), and are deleted by the outbox once the PACS has them.

Exams stored before identities were kept (migration 0007), JPG/PNG cases and exams without a
scored series are refused with the reason (`SendRefused`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from lungcad.inference.results import Prediction
from lungcad.utils import atomic_path
from lungcad.web.db import ExamIdentifiers, Image, ImageIdentifiers, Series, Study, User, audit, private_dir

__all__ = ["RESULTS_DIR", "SENDERS", "SendRefused", "queue_results", "reidentify", "send_exam", "send_refusal",
           "write_results"]

log = logging.getLogger(__name__)
# pynetdicom logs every association and DIMSE message at INFO (as in lungcad.dicom.node)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

RESULTS_DIR = "pacs-results"  # under the data folder: result objects waiting in the outbox (they identify the patient)
LEGACY = "uploaded before identities were kept; re-send from the PACS"
# set by lungcad.dicom.deid.deidentify on the stored copy: not true of a re-identified header
_DEID_MARKS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


class SendRefused(Exception):
    """Results of this exam cannot be sent: `status` is the HTTP status, the message the reason (one line)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def _scored_series(study: Study) -> list[Series]:
    return [s for s in study.series if s.label and s.key_images and s.malignant_probability is not None]


def send_refusal(session: Session, study: Study) -> str | None:
    """Why this exam's results cannot go to a PACS (one line), or None when they can."""
    if study.kind != "dicom":
        return "not a DICOM exam: only DICOM results can be filed in a PACS"
    series = _scored_series(study)
    if not series:
        return "no scored series to send"
    ids = study.identifiers
    if ids is None or not ids.identity_kept or not ids.study_uid:
        return LEGACY
    for image_id in (i for s in series for i in s.key_images):
        image = session.get(Image, image_id)
        kept = session.get(ImageIdentifiers, image_id)
        if image is None or not image.dicom_file or kept is None or not kept.sop_instance_uid:
            return LEGACY
    return None


def reidentify(ds: Any, exam: ExamIdentifiers, image: ImageIdentifiers) -> Any:
    """The stored (de-identified) header `ds`, changed in place back to the original patient, study and UIDs."""
    from lungcad.web.uploads import IDENTITY

    for keyword in _DEID_MARKS:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, (column, _) in IDENTITY.items():
        value = getattr(exam, column) or ""
        if value or keyword != "IssuerOfPatientID":  # the others are Type 2: present, possibly empty
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    ds.AccessionNumber = exam.accession_number or ""
    ds.StudyInstanceUID = exam.study_uid
    ds.SeriesInstanceUID = image.series_uid
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.SOPClassUID = image.sop_class_uid
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPInstanceUID = image.sop_instance_uid
        meta.MediaStorageSOPClassUID = image.sop_class_uid
    return ds


def _prediction(row: Series | Image, level: str) -> Prediction:
    """A stored series or image result as the Prediction the DICOM builders read."""
    return Prediction(
        source=row.id, probabilities={k: float(v) for k, v in (row.probabilities or {}).items()}, label=row.label,
        malignant_probability=float(row.malignant_probability), decision=row.decision, ood=bool(row.ood),
        ood_score=row.ood_score, model_sha256=row.model_sha256, level=level,
        ood_reasons=list(row.ood_reasons or []),
    )


def _save(ds: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_results(session: Session, store: Any, study: Study, out_dir: Path) -> list[Path]:
    """Per scored series: a Secondary Capture per key slice and the series SR, re-identified, into `out_dir`.

    `store` is the web app's `service.Store` (files and predictor). The caller has checked that the
    exam can be sent (`send_refusal`; `queue_results` does).
    """
    import pydicom

    from lungcad.dicom.sr import build_series_report
    from lungcad.dicom.writer import build_secondary_capture

    predictor = store.predictor
    threshold = predictor.contract.decision_threshold()
    info = {"model_sha256": store.model_sha256, "threshold": threshold, "classes": store.classes}
    issuer = study.identifiers.issuer_of_patient_id
    files: list[Path] = []
    for series in _scored_series(study):
        key_images = []
        for image_id in series.key_images:
            image = session.get(Image, image_id)
            source = store.path(image.dicom_file)
            ref = reidentify(pydicom.dcmread(source, stop_before_pixels=True), study.identifiers, session.get(ImageIdentifiers, image_id))
            pixels, _ = predictor.load_pixels(source, name="stored slice")  # what the model saw, at source size
            with store.lock:  # Grad-CAM, one at a time (as service.explain_images)
                heatmap = predictor.source_heatmap(predictor.explain(source, target=image.label), pixels)
            sc = build_secondary_capture(ref, pixels, heatmap, _prediction(image, "image"), threshold=threshold)
            files.append(_save(_with_issuer(sc, issuer), out_dir / f"series{series.number}-{image.id}-sc.dcm"))
            key_images.append((ref, None))
        sr = build_series_report(_prediction(series, "series"), key_images, info)
        files.append(_save(_with_issuer(sr, issuer), out_dir / f"series{series.number}-sr.dcm"))
    return files


def _with_issuer(ds: Any, issuer: str) -> Any:
    """The builders copy PatientID but not its issuer, which a PACS may need to tell patients apart."""
    if issuer:
        ds.IssuerOfPatientID = issuer
    return ds


def queue_results(session: Session, store: Any, outbox: Any, destination: Any, study: Study, user: User) -> int:
    """Write the exam's re-identified results and queue them for `destination` in the caller's session
    (committed by the caller, with the "results-sent" audit row); returns the number of objects.

    The objects go to a folder of their own per request, so that sending again never touches
    files an earlier request still has queued. Nothing is left behind when writing fails.
    """
    reason = send_refusal(session, study)
    if reason is not None:  # before any folder is made
        raise SendRefused(409, reason)
    out = private_dir(store.root / RESULTS_DIR / study.id / secrets.token_hex(6))
    try:
        files = write_results(session, store, study, out)
        outbox.enqueue(session, destination, files, study.id)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    audit(session, "results-sent", user, target=study.id, objects=len(files), destination=str(destination))
    log.info("exam %s: %d result object(s) queued for %s", study.id, len(files), destination)
    return len(files)


SENDERS = ("clinician", "admin")  # roles that may send an exam's results to the PACS


def send_exam(session: Session, store: Any, outbox: Any, destination: Any, study: Study, user: User,
              ai_hidden: bool) -> int:
    """The checks of a send request, then `queue_results`; SendRefused (403 role or reading mode, 409 no PACS
    or the exam cannot be sent) otherwise. `ai_hidden`: the user may not see this exam's AI result yet."""
    if user.role not in SENDERS:
        raise SendRefused(403, "clinicians and administrators only")
    if ai_hidden:  # the results are the AI result: not before the pilot reader's own read
        raise SendRefused(403, "reading mode: send the results after your unaided read")
    if destination is None:
        raise SendRefused(409, "no PACS configured: start lungcad serve with --pacs AE@HOST:PORT or a DICOMweb URL")
    return queue_results(session, store, outbox, destination, study, user)
