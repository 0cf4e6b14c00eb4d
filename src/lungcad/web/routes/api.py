"""Machine-facing endpoints: health probe (no authentication), OpenAPI schema, the REST API and a
DICOMweb STOW-RS endpoint (`POST /api/dicomweb/studies`) for PACS that push studies over HTTP.

API clients authenticate with `Authorization: Bearer lcd_...`; cookie-authenticated calls (the
pages' own scripts) must send the session's CSRF token in `X-CSRF-Token`. Errors are RFC 9457
problem documents (see lungcad.web.app).
"""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

import io
import os
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import lungcad
from lungcad.errors import LungcadError
from lungcad.web import reading, service
from lungcad.web.db import ApiToken, Image, Read, Series, Study, User, as_utc, audit, utcnow
from lungcad.web.deps import DB, CurrentUser, Sessions, SettingsDep, StoreDep, check_csrf
from lungcad.web.routes.pages import owned_token, send_results, upload_items
from lungcad.web.schemas import ImageOut, ReadOut, SendOut, SeriesOut, StudyOut, UploadOut
from lungcad.web.security import revoke_token
from lungcad.web.uploads import MAX_FILES, MAX_UPLOAD_BYTES

__all__ = ["PROBLEM", "SECURITY", "SECURITY_SCHEMES", "FeedbackIn", "Problem", "problems", "router", "token_dict"]

router = APIRouter()

PROBLEM = "application/problem+json"
# How API clients authenticate (declared in /openapi.json; lungcad.web.app adds them to every
# operation but /health): an API token, or the pages' own session cookie (with X-CSRF-Token on writes).
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API token: `Authorization: Bearer lcd_...`"},
    "session": {"type": "apiKey", "in": "cookie", "name": "lungcad_session",
                "description": "a signed-in browser session; writes also need the `X-CSRF-Token` header"},
}
SECURITY = [{"bearer": []}, {"session": []}]


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every API error (lungcad.web.app.problem)."""

    model_config = ConfigDict(extra="allow", title="Problem")  # e.g. `errors` on 422 "Invalid request"

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""


_PROBLEM_WHEN = {
    400: "a body that cannot be parsed (malformed JSON or multipart)",
    401: "no credentials, or an invalid, expired or revoked API token",
    403: "not allowed for this user, or a cookie-authenticated write without its CSRF token",
    404: "no such resource (or not one this user may see)",
    409: "not allowed in the current state (reading mode: unaided read first, a read cannot change once saved; "
         "results cannot go to the PACS: none configured, not DICOM, nothing scored, identities not kept)",
    413: "request body over the server's limit",
    415: "a content type this operation does not take",
    422: "invalid request parameters or body, or an unusable upload",
    503: "database busy or storage unavailable: retry later (see Retry-After and /health)",
}


def problems(*codes: int) -> dict:
    """`responses=` entries documenting `codes` as problem+json answers (and 401/503, which any
    authenticated operation can give)."""
    return {
        code: {"description": _PROBLEM_WHEN[code],
               "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for code in sorted({401, 503, *codes})
    }


class FeedbackIn(BaseModel):
    """A reader's read of a study. One read per reader and study: posting again revises it (history kept)."""

    study_id: str = Field(max_length=32)
    label: str = Field(max_length=32, description="the clinician's label (one of the model's classes)")
    confidence: int = Field(ge=1, le=5)
    stage: Literal["unaided", "aided"] = Field(
        "aided", description="`aided` (default): the final decision with the AI result in view; `unaided`: "
        "the reader's own read before the AI result (readers in reading mode, once, before `aided`)")
    comment: str = Field("", max_length=4000)
    agree: bool | None = Field(None, description="optional and derived: the label equals the model's label. "
                               "A value contradicting the labels is refused (422), never stored")
    usability: int | None = Field(None, ge=1, le=5, deprecated=True,
                                  description="ignored: the System Usability Scale (/sus) replaced the 1-5 rating")


@router.get("/health", tags=["meta"], openapi_extra={"security": []},
            responses={503: {"description": "degraded: see `database` and `data_dir`",
                             "content": {"application/json": {"schema": {"type": "object"}}}}})
def health(session: DB, store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Liveness and readiness (no authentication): the database answers and, for SQLite, can be written;
    the data folder can be written and has room; the model is loaded. 503 with the reasons when degraded."""
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
        if session.get_bind().dialect.name == "sqlite":
            path = session.get_bind().url.database or ""
            if path and not os.access(path, os.W_OK):
                database = "read-only"
    except SQLAlchemyError as exc:
        database = f"unavailable ({type(exc).__name__})"
    data_dir = service.storage_health(settings.data_dir)
    ok = database == "ok" and data_dir == "ok"
    body = {"status": "ok" if ok else "degraded", "version": lungcad.__version__,
            "model_sha256": store.model_sha256, "database": database, "data_dir": data_dir}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request, user: CurrentUser) -> JSONResponse:
    return JSONResponse(request.app.openapi())


# Swagger UI, offline: swagger-ui-dist's files, copied into static/viewer/ by the web build (web/viewer,
# `make install`), started by static/api-docs.js because the Content-Security-Policy allows no inline script.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lungcad API</title>
<link rel="stylesheet" href="/static/viewer/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static/viewer/swagger-ui-bundle.js"></script><script src="/static/api-docs.js"></script></body></html>
"""


@router.get("/docs", include_in_schema=False)
def api_docs(user: CurrentUser) -> HTMLResponse:
    """Interactive API documentation of /openapi.json (signed-in users, like the schema itself)."""
    return HTMLResponse(DOCS_PAGE)


@router.post("/api/predict", status_code=201, tags=["api"], response_model=StudyOut,
             responses={200: {"model": StudyOut, "description": "the same image (SOP Instance UID or bytes) was "
                              "already stored: nothing was stored again; the exam holding it is returned"},
                        201: {"description": "stored and scored: the exam holding the new image"},
                        **problems(400, 403, 413, 422)})
async def api_predict(request: Request, response: Response, user: CurrentUser, sessions: Sessions, store: StoreDep,
                      file: Annotated[UploadFile, File()],
                      case_label: Annotated[str, Form(max_length=128)] = "") -> dict:
    """Upload one PNG/JPEG/DICOM image (multipart field `file`): the exam it went into, with its result.

    Idempotent: the same SOP Instance UID or the same bytes give 200 and the exam already holding
    it. An image whose modality is not the model's (DICOM Modality not CT, a colour photograph) is
    refused with 422 and the reason.
    """
    check_csrf(request, None)
    raw = await file.read(MAX_UPLOAD_BYTES + 1)
    results = await run_in_threadpool(service.ingest, sessions, store, user, [("file", "file", raw)], case_label,
                                      "api")
    (result,) = results
    _raise_for(result)
    response.status_code = 201 if result.status == "created" else 200
    response.headers["Location"] = f"/api/studies/{result.study_id}"
    with sessions() as session:
        study = _exam(session, result.study_id)
        return service.study_dict(study, hide_ai=reading.ai_hidden(session, user, study))  # reading mode


@router.post("/api/uploads", status_code=201, tags=["api"], response_model=UploadOut,
             responses={200: {"model": UploadOut, "description": "nothing new: every usable file was already stored "
                              "(status `existing`, with the stored image's ids)"},
                        201: {"description": "at least one image stored; per-file outcomes in `files`"},
                        **problems(400, 403, 413, 422)})
async def api_upload(request: Request, response: Response, user: CurrentUser, sessions: Sessions, store: StoreDep,
                     files: Annotated[list[UploadFile], File(description="DICOM, PNG, JPEG files or zips of them")],
                     case_label: Annotated[str, Form(max_length=128)] = "") -> dict:
    """Upload several files or zips: DICOM grouped into exams and series by Study and Series Instance
    UID, PNG/JPEG into one case (named by `case_label`). Bad files are per-file results; 422 when no
    file was usable. Idempotent per image (SOP Instance UID or bytes)."""
    check_csrf(request, None)
    if len(files) > MAX_FILES:
        raise HTTPException(413, f"at most {MAX_FILES} files per upload")
    results = await run_in_threadpool(service.ingest, sessions, store, user, upload_items(files), case_label, "api")
    body = {"files": [{"index": i, "status": r.status, "study_id": r.study_id or None, "series_id": r.series_id or None,
                       "image_id": r.image_id or None, "error": r.error} for i, r in enumerate(results, 1)]}
    counts = {k: sum(r.status == k for r in results) for k in ("created", "existing", "rejected")}
    if not counts["created"] and not counts["existing"]:
        if any(r.storage for r in results):
            return _storage_problem(next(r for r in results if r.storage))
        detail = "; ".join(r.error for r in results[:5]) or "no files"
        return JSONResponse({"type": "about:blank", "title": "Unusable input", "status": 422, "detail": detail,
                             **body}, status_code=422, media_type=PROBLEM)
    response.status_code = 201 if counts["created"] else 200
    with sessions() as session:
        ids = list(dict.fromkeys(r.study_id for r in results if r.study_id))
        hidden = reading.hidden_study_ids(session, user, ids)  # reading mode: exams not read yet
        return {**body, **counts, "studies": [service.study_dict(_exam(session, i), hide_ai=i in hidden) for i in ids]}


def _raise_for(result: service.FileResult) -> None:
    """A failed single-file upload as the API's error: 422 (unusable), 503 (storage) or 500."""
    if result.status in ("created", "existing"):
        return
    if result.storage:
        raise HTTPException(503, f"Nothing was saved: {result.error.removeprefix('not saved: ')}. "
                                 "Tell the administrator; /health shows the state.", headers={"Retry-After": "60"})
    if result.internal:
        raise HTTPException(500, result.error)
    raise LungcadError(result.error)


def _storage_problem(result: service.FileResult) -> JSONResponse:
    detail = f"Nothing was saved: {result.error.removeprefix('not saved: ')}. Tell the administrator; /health shows the state."
    return JSONResponse({"type": "about:blank", "title": "Storage unavailable", "status": 503, "detail": detail},
                        status_code=503, media_type=PROBLEM, headers={"Retry-After": "60"})


def _exam(session: Session, study_id: str) -> Study:
    study = session.scalar(select(Study).where(Study.id == study_id).options(
        selectinload(Study.series), selectinload(Study.identifiers),
        selectinload(Study.reads).selectinload(Read.user)))
    if study is None:
        raise HTTPException(404, "no such study")
    return study


@router.post("/api/feedback", status_code=201, tags=["api"], response_model=ReadOut, responses={
    200: {"model": ReadOut, "description": "the existing read, revised (or unchanged when the same read is posted again)"},
    **problems(400, 403, 404, 409, 413, 422)})
def api_feedback(request: Request, response: Response, session: DB, user: CurrentUser, store: StoreDep,
                 body: FeedbackIn) -> dict:
    """Record the caller's read of a study: 201 with the new read, 200 when it revises the caller's
    existing read (one read per reader and study; every change kept as a revision). `agree` is
    derived from the labels; a contradicting `agree` is refused."""
    check_csrf(request, None)
    study = session.get(Study, body.study_id)
    if study is None:
        raise HTTPException(404, "no such study")
    if body.agree is not None and body.stage == "aided" and body.label in store.classes:
        derived = body.label == service.study_ai_result(study).label
        if body.agree != derived:
            raise LungcadError(f"agree={str(body.agree).lower()} contradicts the labels: agree is derived "
                               f"(label {body.label!r} {'equals' if derived else 'differs from'} the model's label)")
    existed = reading.get_read(session, study, user) is not None
    try:
        read, _ = reading.save_read(session, study, user, body.stage, body.label, body.confidence, store.classes,
                                    body.comment, "api")
    except reading.ReadConflict as exc:
        raise HTTPException(409, str(exc)) from None
    session.commit()
    response.status_code = 200 if existed else 201
    return reading.read_dict(read)


@router.get("/api/studies", tags=["api"], response_model=list[StudyOut], responses=problems(422))
def api_studies(session: DB, user: CurrentUser, status: Literal["all", "pending", "reviewed", "disagree"] = "all",
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> list[dict]:
    """Recent exams, newest first; status = all / pending (no final read) / reviewed / disagree.
    `limit` 1-1000 and `offset` 0-2^31 (422 outside). For a reader in reading mode, exams not yet
    read have `ai_hidden` true and no AI result (nor do their series)."""
    studies = service.list_studies(session, status, limit, offset)
    hidden = reading.hidden_study_ids(session, user, [s.id for s in studies])
    if status == "disagree":
        studies = [s for s in studies if s.id not in hidden]
    return [service.study_dict(s, hide_ai=s.id in hidden) for s in studies]


@router.get("/api/studies/{study_id}", tags=["api"], response_model=StudyOut, responses=problems(404, 422))
def api_study(session: DB, user: CurrentUser, study_id: str) -> dict:
    """One exam with its series (results, key images, per-slice scores) and its reads. Reading mode,
    before the caller's unaided read: `ai_hidden` true, no AI result, no reads."""
    study = _exam(session, study_id)
    hidden = reading.ai_hidden(session, user, study)
    audit(session, "study_view", user, target=study.id, via="api", ai_hidden=hidden)  # who looked at which image
    session.commit()
    return service.study_dict(study, with_feedback=True, hide_ai=hidden)


@router.post("/api/studies/{study_id}/send", status_code=202, tags=["api"], response_model=SendOut,
             responses={202: {"description": "queued: the results go to the PACS in the background"},
                        **problems(403, 404, 409, 422)})
def api_send(request: Request, session: DB, user: CurrentUser, store: StoreDep, settings: SettingsDep,
             study_id: str) -> dict:
    """Send the exam's results to the PACS the server was started with (`lungcad serve --pacs`): per
    scored series, its Structured Report and a Secondary Capture per key slice, filed under the
    patient and study they came from. Clinicians and administrators; 409 when no PACS is configured,
    the exam is not DICOM, has no scored series, or was stored before identities were kept."""
    check_csrf(request, None)
    queued = send_results(request, session, user, store, settings, study_id)
    return {"study_id": study_id, "queued": queued, "destination": str(settings.pacs)}


@router.get("/api/series/{series_id}", tags=["api"], response_model=SeriesOut, responses=problems(404, 422))
def api_series(session: DB, user: CurrentUser, series_id: str) -> dict:
    """One series with its result and its images (in slice order). Reading mode, before the caller's
    unaided read of the exam: `ai_hidden` true and no AI result (nor on its images)."""
    series = session.scalar(select(Series).where(Series.id == series_id).options(selectinload(Series.images)))
    if series is None:
        raise HTTPException(404, "no such series")
    hidden = reading.ai_hidden_id(session, user, series.study_id)
    audit(session, "study_view", user, target=series.study_id, via="api", series=series.id, ai_hidden=hidden)
    session.commit()
    return service.series_dict(series, with_images=True, hide_ai=hidden)


@router.get("/api/images/{image_id}", tags=["api"], response_model=ImageOut, responses=problems(404, 422))
def api_image(session: DB, user: CurrentUser, image_id: str) -> dict:
    """One image with the model's result on it (null, `ai_hidden` true: reading mode, before the
    caller's unaided read of the exam)."""
    image = session.get(Image, image_id)
    if image is None:
        raise HTTPException(404, "no such image")
    hidden = reading.ai_hidden_id(session, user, image.study_id)
    audit(session, "study_view", user, target=image.study_id, via="api", image=image.id, ai_hidden=hidden)
    session.commit()
    return service.image_dict(image, hide_ai=hidden)


def token_dict(token: ApiToken) -> dict:
    """An API token's record (never the token itself: only its sha256 is stored)."""
    expires = as_utc(token.expires_at)
    return {"id": token.id, "user": token.user.username, "name": token.name,
            "created_at": as_utc(token.created_at).isoformat(), "expires_at": expires.isoformat(),
            "last_used_at": as_utc(token.last_used_at).isoformat() if token.last_used_at else None,
            "revoked": token.revoked, "expired": expires <= utcnow()}


@router.get("/api/tokens", tags=["api"], responses=problems(403, 422))
def api_tokens(session: DB, user: CurrentUser, everyone: Annotated[bool, Query(alias="all")] = False) -> list[dict]:
    """The caller's API tokens, newest first; `all=true`: everyone's (administrators only)."""
    q = select(ApiToken).options(selectinload(ApiToken.user)).order_by(ApiToken.id.desc())
    if everyone:
        if user.role != "admin":
            raise HTTPException(403, "administrators only")
    else:
        q = q.where(ApiToken.user_id == user.id)
    return [token_dict(t) for t in session.scalars(q)]


@router.delete("/api/tokens/{token_id}", status_code=204, tags=["api"], responses=problems(403, 404, 422))
def api_revoke_token(request: Request, session: DB, user: CurrentUser, token_id: int) -> Response:
    """Revoke an API token: one's own, or anyone's for an administrator. It gets 401 from then on."""
    check_csrf(request, None)
    revoke_token(session, owned_token(session, user, token_id), user)
    session.commit()
    return Response(status_code=204)


@router.get("/api/me", tags=["api"], responses=problems())
def api_me(user: CurrentUser) -> dict:
    return {"username": user.username, "role": user.role}


# ------------------------------------------------------------------------------------ DICOMweb STOW-RS

_STOW_FAILED = 0xC000  # PS3.18 Table I.2-3 / PS3.4 C-STORE: "cannot understand" (unusable instance)


@router.post("/api/dicomweb/studies", tags=["dicomweb"], responses=problems(400, 403, 413, 415))
async def stow_rs(request: Request, user: CurrentUser, sessions: Sessions, store: StoreDep) -> Response:
    """DICOMweb STOW-RS (PS3.18 10.5): a `multipart/related; type="application/dicom"` body of instances.

    Each instance is stored and scored as an upload is (de-identified first, grouped into exams and
    series by its UIDs, series results recomputed; an instance already stored is not stored again);
    the response is the Store Instances Response Module in DICOM JSON: referenced instances, and
    failed ones with a reason.
    """
    check_csrf(request, None)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/related"):
        raise HTTPException(415, 'STOW-RS needs Content-Type: multipart/related; type="application/dicom"')
    body = await request.body()
    parts = await run_in_threadpool(_dicom_parts, content_type, body)
    if parts is None:
        raise HTTPException(400, "not a multipart/related body (missing or wrong boundary)")
    return await run_in_threadpool(_stow_store, sessions, store, user, parts)


def _dicom_parts(content_type: str, body: bytes) -> list[bytes] | None:
    """The application/dicom parts of a multipart/related body (the standard library's MIME parser)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        return None
    return [part.get_payload(decode=True) or b"" for part in message.iter_parts()
            if part.get_content_type() in ("application/dicom", "application/octet-stream")]


def _stow_store(sessions: sessionmaker, store: service.Store, user: User, parts: list[bytes]) -> Response:
    import pydicom
    from pydicom.dataset import Dataset

    stored, failed, items, refs = [], [], [], []
    for i, raw in enumerate(parts):
        ref = Dataset()
        try:
            head = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            ref.ReferencedSOPClassUID = str(head.SOPClassUID)
            ref.ReferencedSOPInstanceUID = str(head.SOPInstanceUID)
        except Exception:
            ref.FailureReason = _STOW_FAILED
            failed.append(ref)
            continue
        items.append((f"instance {i + 1}", f"instance {i + 1}", raw))
        refs.append(ref)
    # grouped into exams and series like any upload; an instance already stored counts as stored
    for ref, result in zip(refs, service.ingest(sessions, store, user, items, via="stow-rs")):
        if result.status in ("created", "existing"):
            stored.append(ref)
        else:
            ref.FailureReason = _STOW_FAILED
            failed.append(ref)
    response = Dataset()
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    status = 200 if not failed else 202 if stored else 409  # PS3.18 10.5.3: all, some, none stored
    return JSONResponse(response.to_json_dict(), status_code=status, media_type="application/dicom+json")
