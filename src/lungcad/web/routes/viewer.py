"""The image viewer's data: an image's pixel values and its heatmap at the image's rows and columns (.npy).

Per image (`/images/{id}/pixels.npy`, `/images/{id}/heatmap.npy`: the exam page's viewer shows each
series' images as its frames), and per exam (`/studies/{id}/...`: the exam's display image, see
routes.pages.display_image; for API scripts and links made before exams had series).

Same checks as the exam's other images (a signed-in user or an API token, 404 for an unknown image
or exam). Reading mode: the heatmap is 403 until the reader's unaided read of the exam. Reading the
pixels is audited as a study view of the exam, once per view: a fetch is not recorded again when the
same user's study view of that exam (the page, the API or an earlier fetch) is less than
`VIEW_WINDOW` old, so opening a 300-slice series is one audit event, not 300.
"""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.
# Plain `def`: FastAPI runs them in its thread pool (database, decoding and Grad-CAM all block).

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from lungcad.web import reading, viewer
from lungcad.web.db import AuditEvent, User, audit, utcnow
from lungcad.web.deps import DB, CurrentUser, StoreDep, get_study
from lungcad.web.routes.pages import display_image, get_image

__all__ = ["VIEW_WINDOW", "router"]

router = APIRouter()
NPY = "application/octet-stream"  # no registered media type for .npy; nosniff is set on every response
VIEW_WINDOW = dt.timedelta(minutes=10)


def audit_view(session: Session, user: User, study_id: str, **detail: Any) -> None:
    """A study view of the exam, unless this user's last study view of it is recent (see the module doc)."""
    recent = session.scalar(select(AuditEvent.id).where(
        AuditEvent.action == "study_view", AuditEvent.user_id == user.id, AuditEvent.target == study_id,
        AuditEvent.at >= utcnow() - VIEW_WINDOW).limit(1))
    if recent is None:
        audit(session, "study_view", user, target=study_id, **detail)
        session.commit()


def _pixels(session: Session, user: User, store: Any, frame: Any, study_id: str, **detail: Any) -> Response:
    arr = viewer.pixel_array(store, frame)
    audit_view(session, user, study_id, part="pixels", **detail)
    return Response(viewer.npy_bytes(arr), media_type=NPY,
                    headers={"X-Lungcad-Unit": viewer.unit_of(frame), "X-Lungcad-Shape": f"{arr.shape[0]}x{arr.shape[1]}"})


def _heatmap(session: Session, user: User, store: Any, frame: Any, study_id: str) -> Response:
    if reading.ai_hidden_id(session, user, study_id):  # the heatmap shows what the AI found
        raise HTTPException(403, "reading mode: the heatmap is shown after your unaided read")
    arr = viewer.heatmap_array(store, frame)
    return Response(viewer.npy_bytes(arr), media_type=NPY, headers={"X-Lungcad-Target": viewer.heatmap_target(frame)})


@router.get("/images/{image_id}/pixels.npy", include_in_schema=False)
def image_pixels(session: DB, user: CurrentUser, store: StoreDep, image_id: str) -> Response:
    """(rows, columns) int16/float32 HU for DICOM CT (after the modality rescale), uint8 grey for JPG/PNG."""
    image = get_image(session, image_id)
    return _pixels(session, user, store, image, image.study_id, image=image.id)


@router.get("/images/{image_id}/heatmap.npy", include_in_schema=False)
def image_heatmap(session: DB, user: CurrentUser, store: StoreDep, image_id: str) -> Response:
    """(rows, columns) uint8 Grad-CAM map of its series' class (255 = 1.0), aligned with pixels.npy."""
    image = get_image(session, image_id)
    return _heatmap(session, user, store, image, image.study_id)


@router.get("/studies/{study_id}/pixels.npy", include_in_schema=False)
def study_pixels(session: DB, user: CurrentUser, store: StoreDep, study_id: str) -> Response:
    """The exam's display image's pixels (see image_pixels)."""
    study = get_study(session, study_id)
    image = display_image(study, reading.ai_hidden(session, user, study))
    return _pixels(session, user, store, image, study.id)


@router.get("/studies/{study_id}/heatmap.npy", include_in_schema=False)
def study_heatmap(session: DB, user: CurrentUser, store: StoreDep, study_id: str) -> Response:
    """The heatmap of the exam's key image, for the exam's label (see image_heatmap)."""
    study = get_study(session, study_id)
    if reading.ai_hidden(session, user, study):
        raise HTTPException(403, "reading mode: the heatmap is shown after your unaided read")
    return _heatmap(session, user, store, display_image(study), study.id)
