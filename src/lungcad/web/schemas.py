"""Typed response models of the REST API (they are what /openapi.json documents).

Timestamps are ISO 8601 with their UTC offset (`+00:00`) in every response, GET and POST alike.
The exam resource is called Study (a DICOM study or a JPG/PNG case); it holds Series, which hold Images.
"""

# No `from __future__ import annotations`: pydantic and FastAPI resolve the annotations at runtime.

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PlainSerializer, WithJsonSchema

from lungcad.web.db import as_utc

__all__ = ["FileOut", "Identifiers", "ImageOut", "ReadOut", "SendOut", "SeriesOut", "SliceScore", "StudyOut",
           "Timestamp", "UploadOut"]

Timestamp = Annotated[
    dt.datetime,
    PlainSerializer(lambda v: as_utc(v).isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time",
                    "description": "ISO 8601 with UTC offset, e.g. 2025-01-31T08:15:00.123456+00:00"}),
]


class _Result(BaseModel):
    """The AI result fields. All null when `ai_hidden` is true: a reader in reading mode who has not yet
    saved their unaided read of the exam is not shown the AI result (of the exam, its series or images)."""

    label: str | None = Field(description="the predicted class under the decision rule ('' when nothing could be "
                              "scored; null when ai_hidden)")
    decision: str | None = Field(description='"malignant" or "not malignant" at the operating threshold')
    malignant_probability: float | None
    probabilities: dict[str, float] | None = Field(description="calibrated probabilities by class")
    ood: bool | None = Field(description="out of distribution: the result may be unreliable (reasons in ood_reasons)")
    ood_score: float | None
    ood_reasons: list[str] | None
    model_sha256: str
    ai_hidden: bool = Field(False, description="reading mode, before the caller's unaided read of the exam: the AI "
                            "result is withheld (its fields null, key images and slice scores empty)")


class ImageOut(_Result):
    """One uploaded image or DICOM instance and the model's result on it (stored de-identified)."""

    id: str
    study_id: str
    series_id: str
    created_at: Timestamp
    kind: Literal["png", "jpeg", "dicom"]
    input_sha256: str = Field(description="sha256 of the bytes as uploaded (the same bytes are not stored twice)")
    instance_number: int | None
    width: int
    height: int
    modality: str
    url: str = Field(description="the stored (de-identified) pixels as PNG")


class SliceScore(BaseModel):
    image_id: str | None
    malignant_probability: float
    ood: bool


class SeriesOut(_Result):
    """A DICOM series (or a JPG/PNG case's one series) with its series-level result: the rule of
    `lungcad predict` (mean of the top-3 slices by p(malignant) among in-distribution slices)."""

    id: str
    study_id: str
    number: int
    created_at: Timestamp
    modality: str
    images_count: int
    key_images: list[str] = Field(description="ids of the images the series result rests on, most malignant first")
    slice_scores: list[SliceScore] = Field(description="per-slice p(malignant), in slice order")
    images: list[ImageOut] | None = Field(None, description="its images (GET /api/series/{id} only)")


class ReadOut(BaseModel):
    """A reader's read of an exam (one per reader and exam; every change kept as a revision). `agree` and
    `changed` are derived from the labels."""

    id: int
    study_id: str
    user: str
    mode: str = Field(description='"pilot" (unaided read first), "direct" (AI result in view) or "legacy"')
    created_at: Timestamp | None
    updated_at: Timestamp | None
    unaided_label: str | None
    unaided_confidence: int | None
    label: str | None = Field(description="the final (aided) label; null before it is recorded")
    confidence: int | None
    model_label: str = Field(description="the AI's label the final read answered ('' before it)")
    agree: bool | None
    changed: bool | None
    comment: str
    revisions: int
    model_sha256: str


class Identifiers(BaseModel):
    """IDENTIFYING: how a clinician finds the exam in the PACS. Only in answers to users who may see
    the exam; never in exports, logs, the audit log or stored files."""

    accession_number: str
    study_uid: str = Field(description="the original Study Instance UID")
    case_label: str = Field(description="the uploader's label of a JPG/PNG case")


class StudyOut(_Result):
    """An exam (the worklist row): a DICOM study or a JPG/PNG case. Its result is that of its most
    suspicious series (highest p(malignant) among in-distribution series)."""

    id: str
    created_at: Timestamp
    kind: str
    result_series_id: str | None
    key_image_id: str | None
    series_count: int
    images_count: int
    series: list[SeriesOut]
    identifiers: Identifiers
    url: str
    feedback_count: int = Field(description="readers with a final read")
    disagreement: bool | None = Field(description="a final read differs from the AI's label (null when ai_hidden)")
    feedback: list[ReadOut] | None = Field(None, description="the final reads (GET /api/studies/{id} only; empty "
                                           "when ai_hidden: other readers' reads carry the AI result)")


class FileOut(BaseModel):
    """What became of one uploaded file (or zip member)."""

    index: int = Field(description="1-based position in the upload (zip members counted one by one)")
    status: Literal["created", "existing", "rejected", "error"] = Field(
        description="created: stored now; existing: the same SOP Instance UID or the same bytes were already "
                    "stored, nothing was stored again and the ids are the stored image's; rejected: unusable "
                    "input (reason in error); error: not saved (storage unavailable or an internal error)")
    study_id: str | None
    series_id: str | None
    image_id: str | None
    error: str


class UploadOut(BaseModel):
    """The result of an upload: every file's outcome and the exams they went into."""

    files: list[FileOut]
    studies: list[StudyOut]
    created: int
    existing: int
    rejected: int


class SendOut(BaseModel):
    """Results of an exam queued for the PACS (`lungcad serve --pacs`): sent in the background, retried
    with back-off while the PACS is unreachable; administrators see the queue on /dicom-outbox."""

    study_id: str
    queued: int = Field(description="result objects queued: per scored series, its SR and a Secondary Capture "
                        "per key slice")
    destination: str = Field(description="the PACS: AE@HOST:PORT or a DICOMweb URL")
