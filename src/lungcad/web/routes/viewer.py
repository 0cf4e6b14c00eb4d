"""The image viewer's data: a study's pixel values and its heatmap at the image's rows and columns (.npy).

Same checks as the study's other images (a signed-in user or an API token, 404 for an unknown
study); reading a study's pixels is audited as a study view, like opening its page.
"""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.
# Plain `def`: FastAPI runs them in its thread pool (database, decoding and Grad-CAM all block).

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from lungcad.web import reading, viewer
from lungcad.web.db import audit
from lungcad.web.deps import DB, CurrentUser, StoreDep, get_study

__all__ = ["router"]

router = APIRouter()
NPY = "application/octet-stream"  # no registered media type for .npy; nosniff is set on every response


@router.get("/studies/{study_id}/pixels.npy", include_in_schema=False)
def study_pixels(session: DB, user: CurrentUser, store: StoreDep, study_id: str) -> Response:
    """(rows, columns) int16/float32 HU for DICOM CT (after the modality rescale), uint8 grey for JPG/PNG."""
    study = get_study(session, study_id)
    arr = viewer.pixel_array(store, study)
    audit(session, "study_view", user, target=study.id, part="pixels")
    session.commit()
    return Response(viewer.npy_bytes(arr), media_type=NPY,
                    headers={"X-Lungcad-Unit": viewer.unit_of(study), "X-Lungcad-Shape": f"{arr.shape[0]}x{arr.shape[1]}"})


@router.get("/studies/{study_id}/heatmap.npy", include_in_schema=False)
def study_heatmap(session: DB, user: CurrentUser, store: StoreDep, study_id: str) -> Response:
    """(rows, columns) uint8 Grad-CAM map of the predicted class (255 = 1.0), aligned with pixels.npy."""
    study = get_study(session, study_id)
    if reading.ai_hidden(session, user, study):  # the heatmap shows what the AI found
        raise HTTPException(403, "reading mode: the heatmap is shown after your unaided read")
    arr = viewer.heatmap_array(store, study)
    return Response(viewer.npy_bytes(arr), media_type=NPY, headers={"X-Lungcad-Target": study.label})
