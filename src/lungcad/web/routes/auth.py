"""Sign-in and sign-out: server-side sessions, persisted back-off on failed sign-ins (see web.throttle)."""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lungcad.web import throttle
from lungcad.web.db import audit, utcnow
from lungcad.web.deps import DB, CurrentUser, check_csrf, page
from lungcad.web.security import authenticate, end_session, new_csrf_token, start_session

__all__ = ["router", "safe_next"]

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
    settings, secret = request.app.state.settings, request.app.state.store.secret
    policy, now = settings.backoff, utcnow()
    device = throttle.device_id(secret, request.cookies.get(throttle.DEVICE_COOKIE), username, policy)
    keys = throttle.keys_for(request.client.host if request.client else "", username, device, policy)
    wait = throttle.retry_after(session, keys, policy, now)
    if wait:
        # Not checked and not audited row by row: a client hammering the form must not fill the audit log.
        session.rollback()
        resp = page(request, "login.html", None, code=429, next=safe_next(next),
                    error=f"Too many failed sign-ins: try again in {wait} s.")
        resp.headers["Retry-After"] = str(wait)
        return resp
    # Counted before the password is checked, committed at once: parallel guesses are all counted.
    throttle.record_attempt(session, keys, policy, now)
    session.commit()
    user = authenticate(session, username, password)
    if user is None:
        audit(session, "login_failed", None, username=username[:64])
        session.commit()
        return page(request, "login.html", None, code=401, error="Wrong user name or password.",
                    next=safe_next(next))
    throttle.succeeded(session, keys)
    sid = start_session(session, user)
    audit(session, "login", user)
    session.commit()
    request.session.clear()  # new session on sign-in (no fixation); new CSRF token with it
    request.session.update({"sid": sid, "csrf": new_csrf_token()})
    resp = RedirectResponse(safe_next(next), status_code=303)
    # This browser may now sign in to this account past an account-wide back-off (its own counter applies).
    resp.set_cookie(throttle.DEVICE_COOKIE, throttle.device_cookie(secret, user.username),
                    max_age=policy.device_days * 86400, path="/login", httponly=True, samesite="strict",
                    secure=settings.secure_cookies)
    return resp


@router.post("/logout", include_in_schema=False)
def logout(request: Request, session: DB, user: CurrentUser, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    if sid := request.session.get("sid"):
        end_session(session, sid)  # copies of the cookie stop working too
    audit(session, "logout", user)
    session.commit()
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
