"""Administrators' pages: pilot dashboard with feedback CSV, audit log, user management (accounts, API tokens), DICOM outbound queue."""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from starlette.exceptions import HTTPException

from lungcad.errors import LungcadError
from lungcad.web import reading, service
from lungcad.web.db import ROLES, ApiToken, AuditEvent, DicomOutbox, User, audit, utcnow
from lungcad.web.deps import DB, AdminUser, StoreDep, check_csrf, page
from lungcad.web.security import add_user, end_user_sessions

__all__ = ["router"]

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(request: Request, session: DB, user: AdminUser, store: StoreDep) -> HTMLResponse:
    return page(request, "dashboard.html", user, stats=reading.pilot_stats(session, store.classes))


@router.post("/dashboard/period", include_in_schema=False)
def dashboard_period(request: Request, session: DB, user: AdminUser, period: Annotated[str, Form(max_length=64)],
                     csrf_token: Annotated[str, Form()] = "") -> Response:
    """Start a new pilot period: usability questionnaires are collected (one per user) per period."""
    check_csrf(request, csrf_token)
    reading.set_period(session, user, period)
    session.commit()
    return RedirectResponse("/dashboard", status_code=303)


@router.get("/dashboard/feedback.csv", include_in_schema=False)
def dashboard_csv(session: DB, user: AdminUser, store: StoreDep) -> Response:
    body = service.feedback_csv(session)
    audit(session, "export", user, target="feedback.csv", model_sha256=store.model_sha256, rows=body.count("\n") - 1)
    session.commit()
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="lungcad-feedback.csv"'})


@router.get("/audit", response_class=HTMLResponse, include_in_schema=False)
def audit_page(request: Request, session: DB, user: AdminUser, action: str = "", limit: int = 200) -> HTMLResponse:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 2000)))
    if action:
        q = q.where(AuditEvent.action == action)
    return page(request, "audit.html", user, events=list(session.scalars(q)), action=action)


def _users_page(request: Request, session: DB, user: User, error: str = "", code: int = 200) -> HTMLResponse:
    # Every account's live tokens, so an administrator can revoke anyone's (routes.pages.revoke_token_form).
    tokens = session.scalars(
        select(ApiToken).where(ApiToken.revoked.is_(False), ApiToken.expires_at > utcnow())
        .options(selectinload(ApiToken.user)).order_by(ApiToken.user_id, ApiToken.id)
    )
    return page(request, "users.html", user, users=list(session.scalars(select(User).order_by(User.username))),
                roles=ROLES, error=error, tokens=list(tokens), code=code)


@router.get("/dicom-outbox", response_class=HTMLResponse, include_in_schema=False)
def dicom_outbox_page(request: Request, session: DB, user: AdminUser, status: str = "", limit: int = 200) -> HTMLResponse:
    """What `lungcad dicom-node` and the web app (`serve --pacs`) still have to send to the PACS (and what they
    sent), newest first."""
    q = select(DicomOutbox).order_by(DicomOutbox.id.desc()).limit(max(1, min(limit, 2000)))
    if status:
        q = q.where(DicomOutbox.status == status)
    counts = dict(session.execute(select(DicomOutbox.status, func.count()).group_by(DicomOutbox.status)).all())
    return page(request, "dicom_outbox.html", user, rows=list(session.scalars(q)), counts=counts, status=status)


@router.get("/users", response_class=HTMLResponse, include_in_schema=False)
def users_page(request: Request, session: DB, user: AdminUser, error: str = "") -> HTMLResponse:
    return _users_page(request, session, user, error)


@router.post("/users", include_in_schema=False)
def users_add(request: Request, session: DB, user: AdminUser, username: Annotated[str, Form(max_length=64)],
              password: Annotated[str, Form(max_length=1024)], role: Annotated[str, Form()],
              csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    try:
        add_user(session, username, password, role, actor=user)
    except LungcadError as exc:
        session.rollback()
        return _users_page(request, session, user, str(exc), code=422)
    session.commit()
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/reading-mode", include_in_schema=False)
def users_reading_mode(request: Request, session: DB, user: AdminUser, user_id: int,
                       reading_mode: Annotated[str, Form()], csrf_token: Annotated[str, Form()] = "") -> Response:
    """Make a user a pilot reader (AI result hidden until their own read of each study) or not."""
    check_csrf(request, csrf_token)
    other = session.get(User, user_id)
    if other is None:
        raise HTTPException(404, "no such user")
    other.reading_mode = reading_mode == "yes"
    audit(session, "reading_mode", user, target=other.username, on=other.reading_mode)
    session.commit()
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/active", include_in_schema=False)
def users_active(request: Request, session: DB, user: AdminUser, user_id: int, active: Annotated[str, Form()],
                 csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    other = session.get(User, user_id)
    if other is None:
        raise HTTPException(404, "no such user")
    if other.id == user.id:
        raise HTTPException(400, "you cannot deactivate your own account")
    other.active = active == "yes"
    ended = 0 if other.active else end_user_sessions(session, other.id)  # signed out everywhere, at once
    audit(session, "user_active" if other.active else "user_deactivate", user, target=other.username,
          sessions_ended=ended)
    session.commit()
    return RedirectResponse("/users", status_code=303)
