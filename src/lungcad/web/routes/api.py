"""Machine-facing endpoints: health probe (no authentication), OpenAPI schema, the REST API and a
DICOMweb STOW-RS endpoint (`POST /api/dicomweb/studies`) for PACS that push studies over HTTP.

API clients authenticate with `Authorization: Bearer lcd_...`; cookie-authenticated calls (the
pages' own scripts) must send the session's CSRF token in `X-CSRF-Token`. Errors are RFC 9457
problem documents (see lungcad.web.app).
"""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

import io
import os
import secrets
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import selectinload, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import lungcad
from lungcad.errors import LungcadError
from lungcad.web import reading, service
from lungcad.web.db import ApiToken, Study, User, as_utc, audit, utcnow
from lungcad.web.deps import DB, CurrentUser, Sessions, SettingsDep, StoreDep, check_csrf, get_study
from lungcad.web.routes.pages import owned_token
from lungcad.web.security import revoke_token
from lungcad.web.uploads import MAX_UPLOAD_BYTES

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
    409: "not allowed in the read's current state (reading mode: unaided read first; it cannot change once saved)",
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


@router.post("/api/predict", status_code=201, tags=["api"], responses=problems(400, 403, 413, 422))
async def api_predict(request: Request, user: CurrentUser, sessions: Sessions, store: StoreDep,
                      file: Annotated[UploadFile, File()]) -> dict:
    """Upload one PNG/JPEG/DICOM image (multipart field `file`): the stored study with its prediction."""
    check_csrf(request, None)
    raw = await file.read(MAX_UPLOAD_BYTES + 1)
    return await run_in_threadpool(_api_store, sessions, store, user, raw)


def _api_store(sessions: sessionmaker, store: service.Store, user: User, raw: bytes) -> dict:
    with sessions() as session:  # its own session: see routes.pages._store_one
        try:
            study = service.record_upload(session, store, user, raw, secrets.token_hex(8), "file")
            hidden = bool(user.reading_mode)  # a reader in reading mode has not read this new study yet
        except LungcadError as exc:
            session.rollback()
            audit(session, "upload_rejected", user, reason=str(exc)[:200], via="api")
            session.commit()
            raise
        return service.study_dict(study, hide_ai=hidden)


@router.post("/api/feedback", status_code=201, tags=["api"], responses={
    200: {"description": "the existing read, revised (or unchanged when the same read is posted again)"},
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


@router.get("/api/studies", tags=["api"], responses=problems(422))
def api_studies(session: DB, user: CurrentUser, status: Literal["all", "pending", "reviewed", "disagree"] = "all",
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> list[dict]:
    """Recent studies, newest first; status = all / pending (no final read) / reviewed / disagree.
    For a reader in reading mode, studies not yet read have `ai_hidden` true and no AI result."""
    studies = service.list_studies(session, status, limit, offset)
    hidden = reading.hidden_study_ids(session, user, [s.id for s in studies])
    if status == "disagree":
        studies = [s for s in studies if s.id not in hidden]
    return [service.study_dict(s, hide_ai=s.id in hidden) for s in studies]


@router.get("/api/studies/{study_id}", tags=["api"], responses=problems(404, 422))
def api_study(session: DB, user: CurrentUser, study_id: str) -> dict:
    study = get_study(session, study_id)
    hidden = reading.ai_hidden(session, user, study)
    audit(session, "study_view", user, target=study.id, via="api", ai_hidden=hidden)  # who looked at which image
    session.commit()
    return service.study_dict(study, with_feedback=True, hide_ai=hidden)


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

    Each instance is stored and scored as an upload is (de-identified first); the response is the
    Store Instances Response Module in DICOM JSON: referenced instances, and failed ones with a reason.
    Series-level results come from `lungcad dicom-node`; this endpoint scores instance by instance.
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

    stored, failed = [], []
    batch = secrets.token_hex(8)
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
        with sessions() as session:
            try:
                service.record_upload(session, store, user, raw, batch, f"instance {i + 1}")
            except LungcadError:
                session.rollback()
                ref.FailureReason = _STOW_FAILED
                failed.append(ref)
                continue
        stored.append(ref)
    response = Dataset()
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    status = 200 if not failed else 202 if stored else 409  # PS3.18 10.5.3: all, some, none stored
    return JSONResponse(response.to_json_dict(), status_code=status, media_type="application/dicom+json")
