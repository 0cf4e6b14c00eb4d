"""Database schema (SQLAlchemy 2 ORM) and connection set-up; the schema itself is created by Alembic.

SQLite (a file in the data folder) is the zero-set-up default; PostgreSQL is used with a
`postgresql://` URL. Every change of schema goes through a migration in `web/migrations/`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, object_session, relationship, sessionmaker

from lungcad.errors import LungcadError

__all__ = [
    "ROLES",
    "ApiToken",
    "AuditEvent",
    "Base",
    "DicomOutbox",
    "ExamResult",
    "ModelResult",
    "ExamIdentifiers",
    "Feedback",
    "Image",
    "ImageIdentifiers",
    "LoginSession",
    "PilotSetting",
    "Read",
    "ReadRevision",
    "ReferenceDiagnosis",
    "SusResponse",
    "LoginThrottle",
    "Series",
    "Study",
    "User",
    "as_utc",
    "exam_result",
    "audit",
    "database_url",
    "make_db_engine",
    "new_id",
    "open_database",
    "private_dir",
    "utcnow",
]

log = logging.getLogger(__name__)

ROLES = ("clinician", "admin")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A stored timestamp as an aware UTC datetime (SQLite hands them back naive; all are written in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def new_id() -> str:
    """Random public id (URLs are not guessable or enumerable)."""
    return secrets.token_hex(12)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Pilot reader (issue 13 item 4): the AI result of a study stays hidden from this user, on the pages
    # and in the API, until their own unaided read of it is saved. Set by administrators on /users.
    reading_mode: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # never the token itself
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))  # refused from then on
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # ~1 min
    user: Mapped[User] = relationship()


class LoginSession(Base):
    """A signed-in browser. The session cookie carries a random id; only its sha256 is stored here.

    Deleting the row ends the session at once (sign-out, password change, account deactivated),
    whatever copies of the cookie exist.
    """

    __tablename__ = "login_sessions"
    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)  # absolute lifetime
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)  # idle timeout
    user: Mapped[User] = relationship()


class LoginThrottle(Base):
    """Recent failed sign-ins of one key (a client address, an account or a trusted device); see web.throttle."""

    __tablename__ = "login_throttle"
    key: Mapped[str] = mapped_column(String(160), primary_key=True)  # "ip:<address>", "user:<name>", "device:<id>"
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class Study(Base):
    """An exam: the worklist row and the unit a clinician reads (a DICOM study, or a JPG/PNG case).

    It holds one or more `Series`, each of one or more `Image`s. The exam's AI result is not a
    column: it is `lungcad.web.service.exam_result(study)`, derived from its series. What
    identifies the patient's exam (accession number, original Study UID, the uploader's case
    label; the patient and study attributes results for the PACS need) is in `ExamIdentifiers`,
    its own table, and the original UIDs of its images in `ImageIdentifiers`; nowhere else.
    """

    __tablename__ = "studies"
    __table_args__ = (Index("uq_studies_exam_key", "exam_key", unique=True),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # png / jpeg / dicom (sniffed from content; "image" for a mixed case)
    group_key: Mapped[str] = mapped_column(String(64))  # keyed hash of the study UID (DICOM) or of the case
    # keyed hash naming the exam for later uploads to find it (DICOM: Study UID; JPG/PNG: user + case label);
    # NULL for exams migrated from one-image studies (0005)
    exam_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    user: Mapped[User] = relationship()
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.number")
    identifiers: Mapped[ExamIdentifiers | None] = relationship(back_populates="study")
    feedback: Mapped[list[Feedback]] = relationship(back_populates="study", order_by="Feedback.id")

    # Read-only conveniences for code that reads an exam like the one-image study it used to be
    # (templates, the DICOM node's tests): the exam-level result comes from service.exam_result,
    # the one place it is derived; file fields are those of its key image.
    def _result(self) -> ExamResult:
        return exam_result(self)

    def _key_image(self, name: str, default: Any = None) -> Any:
        key = self._result().key_image
        return getattr(key, name) if key is not None else default

    label = property(lambda self: self._result().label)
    decision = property(lambda self: self._result().decision)
    malignant_probability = property(lambda self: self._result().malignant_probability)
    probabilities = property(lambda self: self._result().probabilities)
    ood = property(lambda self: self._result().ood)
    ood_score = property(lambda self: self._result().ood_score)
    ood_reasons = property(lambda self: self._result().ood_reasons)
    input_sha256 = property(lambda self: self._key_image("input_sha256", ""))
    image_file = property(lambda self: self._key_image("image_file", ""))
    dicom_file = property(lambda self: self._key_image("dicom_file"))
    width = property(lambda self: self._key_image("width", 0))
    height = property(lambda self: self._key_image("height", 0))
    dicom_meta = property(lambda self: self._key_image("dicom_meta", {}) or {})


class ExamIdentifiers(Base):
    """IDENTIFYING: how clinicians find the exam in the PACS, and (DICOM, since 0007) the original patient
    and General Study attributes a PACS files results under (`lungcad.web.pacs` puts them back into the
    results it sends). Accession, Study UID and case label are shown only on the worklist and exam page
    to users allowed to see the exam; the patient attributes are shown nowhere. Never exported, logged,
    audited or written into stored files."""

    __tablename__ = "exam_identifiers"
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")  # the original Study Instance UID
    case_label: Mapped[str] = mapped_column(String(128), default="")  # the uploader's name for a JPG/PNG case
    # False for exams stored before 0007 (and JPG/PNG cases): their results cannot go back to a PACS
    identity_kept: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    patient_name: Mapped[str] = mapped_column(String(324), default="", server_default="")  # PN: 3 groups of 64 + "="
    patient_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    patient_birth_date: Mapped[str] = mapped_column(String(16), default="", server_default="")  # DA as received
    patient_sex: Mapped[str] = mapped_column(String(16), default="", server_default="")
    study_date: Mapped[str] = mapped_column(String(16), default="", server_default="")
    study_time: Mapped[str] = mapped_column(String(32), default="", server_default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="", server_default="")
    dicom_study_id: Mapped[str] = mapped_column(String(16), default="", server_default="")  # (0020,0010) Study ID
    study: Mapped[Study] = relationship(back_populates="identifiers")


class ImageIdentifiers(Base):
    """IDENTIFYING: a stored DICOM image's original UIDs (the stored copy has keyed hashes instead), so that
    results sent to a PACS reference the instances it holds. Rows exist only for images stored since 0007.
    Never shown, exported, logged, audited or written into stored files."""

    __tablename__ = "image_identifiers"
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))  # the original Series Instance UID


class ModelResult:
    """The model's result columns, the same on a series (its aggregate) and on an image."""

    label: Mapped[str] = mapped_column(String(32), default="")
    decision: Mapped[str] = mapped_column(String(32), default="")
    malignant_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[dict] = mapped_column(JSON, default=dict)
    ood: Mapped[bool] = mapped_column(Boolean, default=False)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)


class Series(ModelResult, Base):
    """A DICOM series (or the one implicit series of a JPG/PNG case) and its series-level result,
    computed by the rule `lungcad predict` uses (`lungcad.inference.results.aggregate_series`)."""

    __tablename__ = "series"
    __table_args__ = (Index("ix_series_study_key", "study_id", "series_key", unique=True),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    series_key: Mapped[str] = mapped_column(String(64))  # keyed hash of the Series UID ("case" for a JPG/PNG case)
    number: Mapped[int] = mapped_column(Integer, default=1)  # order within the exam
    modality: Mapped[str] = mapped_column(String(16), default="")
    images_count: Mapped[int] = mapped_column(Integer, default=0)
    ood_reasons: Mapped[list] = mapped_column(JSON, default=list)
    key_images: Mapped[list] = mapped_column(JSON, default=list)  # image ids the result rests on, most malignant first
    # per-slice score strip: [[image id, p(malignant), ood], ...] in slice order (InstanceNumber, then upload order)
    slice_scores: Mapped[list] = mapped_column(JSON, default=list)
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    study: Mapped[Study] = relationship(back_populates="series")
    images: Mapped[list[Image]] = relationship(back_populates="series", order_by="Image.position")


class Image(ModelResult, Base):
    """One uploaded image or DICOM instance and the model's result on it (pixels stored de-identified)."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_sop_key", "sop_key", unique=True),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    series_id: Mapped[str] = mapped_column(ForeignKey("series.id"), index=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    input_sha256: Mapped[str] = mapped_column(String(64), index=True)  # of the bytes as uploaded (idempotency)
    sop_key: Mapped[str | None] = mapped_column(String(64), nullable=True)  # keyed hash of the SOP UID
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    position: Mapped[float] = mapped_column(Float, default=0.0)  # slice order in its series
    image_file: Mapped[str] = mapped_column(String(128))  # relative to the data folder
    dicom_file: Mapped[str | None] = mapped_column(String(128), nullable=True)  # de-identified copy
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    ood_reasons: Mapped[list | None] = mapped_column(JSON, nullable=True, default=list)
    error: Mapped[str] = mapped_column(Text, default="")
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    dicom_meta: Mapped[dict] = mapped_column(JSON, default=dict)  # hashed UIDs, modality: no PHI
    series: Mapped[Series] = relationship(back_populates="images")
    identifiers: Mapped[ImageIdentifiers | None] = relationship()  # original UIDs (DICOM, since 0007)


# ------------------------------------------------------------------------------------ exam result


@dataclass
class ExamResult:
    """The AI result of an exam: what pages, the API and the dashboard show (`exam_result`)."""

    label: str = ""
    decision: str = ""
    malignant_probability: float | None = None
    probabilities: dict = field(default_factory=dict)
    ood: bool = False
    ood_score: float | None = None
    ood_reasons: list = field(default_factory=list)
    model_sha256: str = ""
    series: Series | None = None  # the series the result is taken from
    key_image_id: str = ""  # its most malignant key image
    series_count: int = 0
    images_count: int = 0

    @property
    def key_image(self) -> Image | None:
        if self.series is None or not self.key_image_id:
            return None
        session = object_session(self.series)
        if session is None:
            return next((im for im in self.series.images if im.id == self.key_image_id), None)
        return session.get(Image, self.key_image_id)


def exam_result(study: Study) -> ExamResult:
    """The exam's AI result: the series result (the `lungcad predict` series rule, see
    `refresh_series`) of its most suspicious series, i.e. the highest p(malignant) among the
    series that are not out of distribution (all series when every one is).

    The one function that derives an exam-level result: pages, the API, the dashboard, the reading
    pilot and the exports call it (as `lungcad.web.service.exam_result`) instead of reading columns.
    Defined here, next to the tables it reads, so that `Study`'s read-only properties can use it
    without an import cycle.
    """
    series = list(study.series)
    images = sum(s.images_count for s in series)
    scored = [s for s in series if s.label]
    if not scored:
        return ExamResult(model_sha256=study.model_sha256, series_count=len(series), images_count=images)
    pool = [s for s in scored if not s.ood] or scored
    top = max(pool, key=lambda s: -1.0 if s.malignant_probability is None else s.malignant_probability)
    return ExamResult(
        label=top.label, decision=top.decision, malignant_probability=top.malignant_probability,
        probabilities=dict(top.probabilities or {}), ood=top.ood, ood_score=top.ood_score,
        ood_reasons=list(top.ood_reasons or []), model_sha256=top.model_sha256 or study.model_sha256, series=top,
        key_image_id=(top.key_images or [""])[0], series_count=len(series), images_count=images,
    )



class Feedback(Base):
    """Legacy (before migration 0006): one row per submission, `agree` as sent. Kept readable, no longer
    written; each row was copied into `read_revisions` and the latest per reader and study into `reads`."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    agree: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str] = mapped_column(String(32))  # the clinician's label
    confidence: Mapped[int] = mapped_column(Integer)  # 1..5
    comment: Mapped[str] = mapped_column(Text, default="")
    usability: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5 rating of the tool
    model_label: Mapped[str] = mapped_column(String(32), default="")  # the model's label it answered
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    study: Mapped[Study] = relationship(back_populates="feedback")
    user: Mapped[User] = relationship()


class Read(Base):
    """One reader's read of one study (the unit a clinician reads): at most one row per reader and study.

    `unaided_*`: the reader's own read recorded before the AI result was shown (pilot readers only;
    frozen once the AI result is revealed). `final_*`: the decision with the AI result in view (the
    label that counts, and the training label of `lungcad feedback export`). Whether the reader agrees
    with the AI is derived from the labels (`agree`), never stored. Every change appends a ReadRevision.
    """

    __tablename__ = "reads"
    __table_args__ = (UniqueConstraint("study_id", "user_id", name="uq_reads_study_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # "pilot": unaided read first, AI hidden until then; "direct": the AI result was in view from the start
    # (readers not in reading mode, API scripts); "legacy": migrated from the old feedback table.
    mode: Mapped[str] = mapped_column(String(8), default="direct")
    unaided_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    unaided_confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5
    unaided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    final_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    final_confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5
    final_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    model_label: Mapped[str] = mapped_column(String(32), default="")  # the AI label revealed to the reader
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    revisions: Mapped[int] = mapped_column(Integer, default=0)  # number of ReadRevision rows
    study: Mapped[Study] = relationship()
    user: Mapped[User] = relationship()

    @property
    def agree(self) -> bool | None:
        """Does the final read agree with the AI's label? None while there is no final read."""
        return None if not self.final_label else self.final_label == self.model_label

    @property
    def changed(self) -> bool | None:
        """Did the reader change their label after seeing the AI result? None without both reads."""
        return None if not (self.unaided_label and self.final_label) else self.unaided_label != self.final_label


# Set here rather than in Study's body (the reads are this module's later addition): a study's reads, oldest first.
Study.reads = relationship(Read, order_by=Read.id, viewonly=True)


class ReadRevision(Base):
    """Append-only history of reads: one row per saved step (enforced below, like the audit log)."""

    __tablename__ = "read_revisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    read_id: Mapped[int] = mapped_column(ForeignKey("reads.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stage: Mapped[str] = mapped_column(String(8))  # unaided / aided
    label: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    model_label: Mapped[str] = mapped_column(String(32), default="")  # "" for unaided (AI not yet shown)
    source: Mapped[str] = mapped_column(String(8), default="form")  # form / api / legacy
    legacy_feedback_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the migrated feedback row


class ReferenceDiagnosis(Base):
    """The reference standard of a study (pathology or follow-up), entered later; one per study, editable
    (each change audited with the previous values)."""

    __tablename__ = "reference_diagnoses"
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(16))  # pathology / follow-up / other
    diagnosed_on: Mapped[dt.date] = mapped_column(Date)
    note: Mapped[str] = mapped_column(Text, default="")
    entered_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    entered_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[User] = relationship()


class SusResponse(Base):
    """One user's System Usability Scale questionnaire for one pilot period (editable: the latest counts)."""

    __tablename__ = "sus_responses"
    __table_args__ = (UniqueConstraint("user_id", "period", name="uq_sus_user_period"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    period: Mapped[str] = mapped_column(String(64))
    answers: Mapped[list] = mapped_column(JSON)  # ten integers 1..5, items in the standard order
    score: Mapped[float] = mapped_column(Float)  # 0..100
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[User] = relationship()


class PilotSetting(Base):
    """Deployment-wide pilot settings, one row per key (e.g. `period`, the current SUS period)."""

    __tablename__ = "pilot_settings"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class DicomOutbox(Base):
    """A DICOM result file waiting to be C-STOREd to a PACS (`lungcad.dicom.queue`); survives restarts."""

    __tablename__ = "dicom_outbox"
    __table_args__ = (Index("ix_dicom_outbox_status_next", "status", "next_attempt_at"),)  # the sender's query
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    destination: Mapped[str] = mapped_column(String(160))  # AE@HOST:PORT
    file: Mapped[str] = mapped_column(String(255))  # relative to the data folder
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    study_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the worklist study it belongs to
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending / sent / failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEvent(Base):
    """Append-only: the application never updates or deletes rows (enforced below and by triggers)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    username: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str] = mapped_column(String(64), default="")
    input_sha256: Mapped[str] = mapped_column(String(64), default="")
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


@event.listens_for(AuditEvent, "before_update")
@event.listens_for(AuditEvent, "before_delete")
def _refuse_audit_change(mapper: Any, connection: Any, target: AuditEvent) -> None:
    raise PermissionError("the audit log is append-only")


@event.listens_for(ReadRevision, "before_update")
@event.listens_for(ReadRevision, "before_delete")
def _refuse_revision_change(mapper: Any, connection: Any, target: ReadRevision) -> None:
    raise PermissionError("read revisions are append-only")


def audit(
    session: Session,
    action: str,
    user: User | None = None,
    *,
    target: str = "",
    input_sha256: str = "",
    model_sha256: str = "",
    username: str = "",
    **detail: Any,
) -> None:
    """Add one audit row to the session (committed with the change it records)."""
    session.add(
        AuditEvent(
            user_id=user.id if user else None, username=user.username if user else username, action=action,
            target=target, input_sha256=input_sha256, model_sha256=model_sha256, detail=detail,
        )
    )


def database_url(db: str | None, data_dir: str | Path) -> str:
    """The SQLAlchemy URL: `db` if given (postgresql:// uses psycopg 3), else SQLite in the data folder."""
    if not db:
        return f"sqlite:///{Path(data_dir).resolve() / 'lungcad.sqlite3'}"
    try:
        url = make_url(db)
    except ArgumentError:
        raise LungcadError(f"not a database URL: {db.split('@')[-1]!r}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif not url.drivername.startswith(("postgresql", "sqlite")):
        raise LungcadError(f"unsupported database {url.drivername!r} (use sqlite or postgresql)")
    return url.render_as_string(hide_password=False)


def make_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # check_same_thread off: FastAPI runs sync handlers in a thread pool; each request has its own session.
        # Pool sized for FastAPI's 40 worker threads; SQLite serialises writers itself (WAL + busy timeout).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=30)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) readable by the owner only (0700); an existing folder of ours is tightened.

    The data folder holds patient images, the database and the session secret.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _owner_only(path, 0o700)
    return path


def _owner_only(path: Path, mode: int) -> None:
    try:
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, mode)
    except (OSError, AttributeError):  # not ours to change, or no POSIX permissions (Windows): leave it
        pass


def _private_sqlite_file(url: str) -> None:
    """The SQLite file (and its WAL/SHM files, which SQLite creates with the database's mode) at 0600."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # created empty, owner-only, before SQLite opens it
    except OSError:
        return  # SQLite will report it with a clear message
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists():
            _owner_only(p, 0o600)


def open_database(db: str | None, data_dir: str | Path, upgrade: bool = True) -> tuple[Engine, sessionmaker[Session]]:
    """Connect (creating the data folder and the SQLite file owner-only) and bring the schema up to date."""
    url = database_url(db, data_dir)
    if url.startswith("sqlite"):
        if not db:
            private_dir(data_dir)
        _private_sqlite_file(url)
    engine = make_db_engine(url)
    if upgrade:
        from lungcad.web.migrate import upgrade_database

        upgrade_database(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
