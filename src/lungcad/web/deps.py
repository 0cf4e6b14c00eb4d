"""FastAPI dependencies of the web app: database session, current user, role checks, CSRF, app state.

Everything per application lives on `app.state` (set by `lungcad.web.app.create_app`): `settings`,
`sessions` (the SQLAlchemy session factory), `store` (files + predictor), `templates`. The
dependencies below read it from the request, so the routers in `lungcad.web.routes` hold no state
of their own.

Sign-ins are server-side: the signed session cookie carries a random session id (`sid`) and the
CSRF token; the `login_sessions` row behind the id is what makes it valid (see web.security).
"""

# No `from __future__ import annotations`: FastAPI resolves the Annotated aliases below at runtime.

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from starlette.exceptions import HTTPException

from lungcad.web import service
from lungcad.web.db import Read, Study, User
from lungcad.web.security import SessionPolicy, csrf_ok, new_csrf_token, user_for_session, user_for_token
from lungcad.web.throttle import BackoffPolicy

__all__ = [
    "DB",
    "AdminUser",
    "AuthRequired",
    "CurrentUser",
    "OptionalUser",
    "Sessions",
    "Settings",
    "SettingsDep",
    "StoreDep",
    "admin_user",
    "check_csrf",
    "csrf_token",
    "current_user",
    "get_db",
    "get_sessions",
    "get_settings",
    "get_store",
    "get_study",
    "optional_user",
    "page",
]


@dataclass
class Settings:
    run_dir: Path
    data_dir: Path
    db: str | None = None
    secure_cookies: bool = False  # set behind HTTPS so the session cookie is never sent in clear
    session_policy: SessionPolicy = field(default_factory=SessionPolicy)  # idle timeout, absolute lifetime
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)  # failed sign-ins (web.throttle)
    pacs: Any = None  # where exams' results are sent (lungcad.dicom.queue destination; --pacs), None: nowhere
    ae_title: str = "LUNGCAD"  # calling AE title of those sends (--ae-title)


class AuthRequired(Exception):
    """Raised by page dependencies: redirect to the login page (or 401 problem for the API)."""


# ---------------------------------------------------------------- app state
# async: plain attribute reads, so FastAPI runs them on the event loop instead of a thread-pool hop.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> service.Store:
    return request.app.state.store


async def get_sessions(request: Request) -> sessionmaker:
    """The session factory, for work that must not hold the request's connection (see routes.pages)."""
    return request.app.state.sessions


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[service.Store, Depends(get_store)]
Sessions = Annotated[sessionmaker, Depends(get_sessions)]
DB = Annotated[Session, Depends(get_db)]


# ---------------------------------------------------------------- users and roles


def optional_user(request: Request, session: DB) -> User | None:
    user = _lookup_user(request, session)
    # End the read transaction now: the connection goes back to the pool instead of being held
    # while the request waits its turn for the model (32 waiting uploads would exhaust the pool).
    session.commit()
    return user


def _lookup_user(request: Request, session: Session) -> User | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        user = user_for_token(session, auth[7:].strip())
        if user is None:
            raise HTTPException(401, "invalid or revoked API token")
        request.state.via_token = True
        return user
    sid = request.session.get("sid")
    if not isinstance(sid, str):
        return None
    user = user_for_session(session, sid, request.app.state.settings.session_policy)
    if user is None:  # signed out, expired, or ended by a password change or an administrator
        request.session.clear()
        return None
    request.state.via_token = False
    return user


OptionalUser = Annotated[User | None, Depends(optional_user)]


def current_user(request: Request, user: OptionalUser) -> User:
    if user is None:
        raise AuthRequired()
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    if user.role != "admin":
        raise HTTPException(403, "administrators only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


# ---------------------------------------------------------------- CSRF


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use); every form carries it."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = new_csrf_token()
    return token


def check_csrf(request: Request, given: str | None) -> None:
    """Forms and cookie-authenticated API calls must carry the session's CSRF token."""
    if getattr(request.state, "via_token", False):
        return  # a bearer token is not an ambient credential a foreign site could ride on
    if not csrf_ok(request.session.get("csrf"), given or request.headers.get("x-csrf-token")):
        raise HTTPException(403, "missing or invalid CSRF token: reload the page and try again")


# ---------------------------------------------------------------- shared helpers of the routers


def page(request: Request, name: str, user: User | None, code: int = 200, **ctx: Any) -> HTMLResponse:
    """A server-rendered page with what every template needs (user, CSRF token, the model's classes)."""
    store: service.Store = request.app.state.store
    return request.app.state.templates.TemplateResponse(
        request, name, {"user": user, "csrf": csrf_token(request), "classes": store.classes,
                        "model_sha": store.model_sha256, **ctx}, status_code=code,
    )


def get_study(session: Session, study_id: str) -> Study:
    """The study (exam) with its reads (and their users), series and identifiers loaded; 404 when there is none."""
    study = session.scalar(
        select(Study).where(Study.id == study_id)
        .options(selectinload(Study.reads).selectinload(Read.user), selectinload(Study.user),
                 selectinload(Study.series), selectinload(Study.identifiers))
    )
    if study is None:
        raise HTTPException(404, "no such study")
    return study
