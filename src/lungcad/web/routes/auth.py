"""Sign-in and sign-out (session cookie; new session and CSRF token on every sign-in)."""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

import time
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from lungcad.web.db import audit
from lungcad.web.deps import DB, CurrentUser, check_csrf, page
from lungcad.web.security import authenticate, new_csrf_token

__all__ = ["LOGIN_MAX_FAILURES", "LOGIN_WINDOW_S", "router", "safe_next"]

LOGIN_WINDOW_S, LOGIN_MAX_FAILURES = 300, 10  # per user name and client: slows password guessing

router = APIRouter()


def safe_next(target: str) -> str:
    # Only local paths: an open redirect would let a phishing link land on a foreign site after login.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return page(request, "login.html", None, next=safe_next(next))


@router.post("/login", include_in_schema=False)
def login(
    request: Request, session: DB, username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)], csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    check_csrf(request, csrf_token)
    key = (username.lower(), request.client.host if request.client else "")
    recent = request.app.state.login_failures[key]  # this app's failures, in memory
    now = time.monotonic()
    while recent and now - recent[0] > LOGIN_WINDOW_S:
        recent.popleft()
    if len(recent) >= LOGIN_MAX_FAILURES:
        raise HTTPException(429, "too many failed sign-ins: wait a few minutes")
    user = authenticate(session, username, password)
    if user is None:
        recent.append(now)
        audit(session, "login_failed", None, username=username[:64])
        session.commit()
        return page(request, "login.html", None, code=401, error="Wrong user name or password.",
                    next=safe_next(next))
    recent.clear()
    request.session.clear()  # new session on sign-in (no fixation); new CSRF token with it
    request.session.update({"uid": user.id, "csrf": new_csrf_token()})
    audit(session, "login", user)
    session.commit()
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(request: Request, session: DB, user: CurrentUser, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    audit(session, "logout", user)
    session.commit()
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
