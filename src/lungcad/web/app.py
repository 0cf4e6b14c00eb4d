"""FastAPI application: server-rendered pages for clinicians plus a JSON REST API for PACS-side scripts.

`create_app(run_dir, data_dir=..., db=...)` builds the app; `lungcad serve` runs it under uvicorn.
Everything except /login, /health and /static requires a signed-in user (a server-side session
with idle timeout and absolute lifetime, its id in an HttpOnly SameSite=Lax cookie, CSRF token on
every form) or an unexpired, unrevoked API token (`Authorization: Bearer lcd_...`).

Layout (FastAPI's "bigger applications"): `create_app` builds the app state, error handlers and
middleware and includes the routers of `lungcad.web.routes` (auth, pages, admin, api); the
dependencies they share (database session, current user, roles, CSRF, store) are in `lungcad.web.deps`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

import lungcad
from lungcad.errors import LungcadError
from lungcad.web import display, service, viewer
from lungcad.web.db import open_database, private_dir
from lungcad.web.deps import AuthRequired, Settings
from lungcad.web.routes import admin, api, auth, pages
from lungcad.web.routes import viewer as viewer_routes
from lungcad.web.security import SessionPolicy, load_secret
from lungcad.web.throttle import BackoffPolicy

__all__ = [
    "DISCLAIMER",
    "HSTS",
    "MAX_REQUEST_BYTES",
    "SECURITY_HEADERS",
    "LimitBody",
    "SecurityHeaders",
    "create_app",
    "is_api",
    "problem",
]

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
# Sent on responses over HTTPS (directly, or from a proxy uvicorn trusts to say so in X-Forwarded-Proto)
# and whenever --secure-cookies says the site is served over HTTPS. No includeSubDomains: other hosts
# of a hospital's domain are not ours to decide for.
HSTS = ("strict-transport-security", "max-age=31536000")
MAX_REQUEST_BYTES = 256 * 1024 * 1024  # whole request body (several files in one upload form)
DISCLAIMER = (
    "Decision support only, not a diagnosis: the result must be reviewed by a qualified clinician "
    "together with the full study and the clinical context."
)


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JSONResponse:
    """An RFC 9457 problem response (what API clients get instead of a stack trace)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


class LimitBody:
    """ASGI middleware: refuse request bodies over a cap before they are spooled to disk."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, "request too large")
            return message

        await self.app(scope, limited_receive, send)

    async def _too_large(self, scope: dict, send: Any) -> None:
        body = json.dumps({"type": "about:blank", "title": "Request too large", "status": 413,
                           "detail": f"limit {self.limit // 1024 // 1024} MiB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/problem+json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response that does not set them itself.

    Plain ASGI rather than @app.middleware("http"): that wrapper streams every response through an
    extra task and queue, a measurable cost per request under load.
    """

    def __init__(self, app: Any, always_https: bool = False):
        self.app, self.always_https = app, always_https
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]
        self.https_headers = [*self.headers, (HSTS[0].encode("latin-1"), HSTS[1].encode("latin-1"))]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = self.https_headers if self.always_https or scope.get("scheme") == "https" else self.headers

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                missing = [(k, v) for k, v in headers if k not in present]
                message["headers"] = [*message.get("headers", []), *missing]
            await send(message)

        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = {
    # Everything is served from this origin: no CDN, no external fonts, no inline script. blob: images are the
    # image viewer's mouse cursors (Cornerstone3D tools draws them as SVG in the page, static/viewer/).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(
    run_dir: str | Path,
    data_dir: str | Path = "lungcad-data",
    db: str | None = None,
    predictor: service.PredictorLike | None = None,
    secure_cookies: bool = False,
    session_policy: SessionPolicy | None = None,
    backoff: BackoffPolicy | None = None,
    pacs: str | None = None,
    ae_title: str = "LUNGCAD",
) -> FastAPI:
    """The web application for one model (run folder), with its database and data folder.

    `predictor` defaults to lungcad.inference.predictor.Predictor(run_dir); tests inject a fake.
    `session_policy` (idle timeout, lifetime) and `backoff` (failed sign-ins) default to their dataclasses' defaults.
    `pacs` (`AE@HOST:PORT` or a DICOMweb URL): where exams' results may be sent (`lungcad.web.pacs`), by
    an outbox sender that runs while the app does, calling as `ae_title`.
    """
    from lungcad.dicom.queue import Outbox, parse_destination, valid_ae_title

    if not valid_ae_title(ae_title):
        raise LungcadError(f"--ae-title must be 1-16 printable characters without a backslash, not {ae_title!r}")
    destination = parse_destination(pacs, "--pacs") if pacs else None  # a malformed address fails at start
    settings = Settings(Path(run_dir), Path(data_dir), db, secure_cookies,
                        session_policy or SessionPolicy(), backoff or BackoffPolicy(), destination, ae_title)
    private_dir(settings.data_dir)
    if predictor is None:
        from lungcad.inference.predictor import Predictor

        predictor = Predictor(settings.run_dir)
    engine, session_factory = open_database(db, settings.data_dir)
    secret = load_secret(settings.data_dir)
    store = service.Store(settings.data_dir, secret, predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """With --pacs, the outbox sender runs as long as the app (queued results survive a restart)."""
        if destination is not None:
            app.state.outbox.start()
        try:
            yield
        finally:
            if destination is not None:
                app.state.outbox.stop()

    app = FastAPI(
        title="lungcad", version=lungcad.__version__, debug=False, lifespan=lifespan,
        description="Lung CT decision support: upload images, read predictions, give feedback. " + DISCLAIMER,
        # The interactive docs load scripts from a CDN: off (hospitals are offline). The schema is
        # served by routes.api, behind authentication like everything else.
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    # What lungcad.web.deps hands to the routes.
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(disclaimer=DISCLAIMER, version=lungcad.__version__, exam_result=service.exam_result)
    templates.env.filters.update(flatten=display.flatten, show=display.show, nopath=display.nopath)
    # the image viewer (templates/_viewer.html): its frame list and whether its script was built
    templates.env.globals.update(viewer_config=viewer.viewer_config, viewer_built=viewer.bundle_built)
    app.state.settings, app.state.engine, app.state.sessions, app.state.store = settings, engine, session_factory, store
    app.state.templates = templates
    # queues results (routes); with --pacs its sender thread runs under the lifespan above (tests call `send_due`)
    app.state.outbox = Outbox(session_factory, settings.data_dir, ae_title)

    app.add_middleware(SecurityHeaders, always_https=secure_cookies)
    # The signed cookie only carries the session id and the CSRF token; the login_sessions row decides
    # whether the session is alive (web.security.user_for_session), so its max_age is just an upper bound.
    app.add_middleware(
        SessionMiddleware, secret_key=secret, session_cookie="lungcad_session",
        max_age=settings.session_policy.hours * 3600, same_site="lax", https_only=secure_cookies,
    )
    # Added last = outermost: the size cap applies before anything parses the body.
    app.add_middleware(LimitBody, limit=MAX_REQUEST_BYTES)

    app.add_exception_handler(AuthRequired, _auth_required)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(LungcadError, _input_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(SQLAlchemyTimeout, _busy)
    app.add_exception_handler(OperationalError, _storage_unavailable)
    app.add_exception_handler(OSError, _storage_unavailable)
    app.add_exception_handler(Exception, _server_error)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(auth.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(api.router)
    app.include_router(viewer_routes.router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus what it cannot derive from the routes: the problem+json error model the
    `responses=` of routes.api refer to, and the two ways to authenticate (required everywhere but
    on operations that say `security: []`, i.e. /health)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {})["Problem"] = api.Problem.model_json_schema()
        components["securitySchemes"] = api.SECURITY_SCHEMES
        schema["security"] = api.SECURITY
        app.openapi_schema = schema
    return app.openapi_schema


# ---------------------------------------------------------------- error handlers

HTTP_TITLES = {400: "Bad request", 401: "Not signed in", 403: "Forbidden", 404: "Not found",
               405: "Method not allowed", 413: "Too large", 415: "Unsupported file", 422: "Unusable input",
               429: "Too many attempts", 503: "Unavailable"}


async def _auth_required(request: Request, exc: AuthRequired) -> Response:
    if is_api(request):
        return problem(401, "Authentication required", "sign in or send Authorization: Bearer <token>")
    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(nxt, safe='/')}", status_code=303)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    title = HTTP_TITLES.get(exc.status_code, "Error")
    if is_api(request):
        resp = problem(exc.status_code, title, str(exc.detail))
    else:
        resp = _error_page(request, exc.status_code, title, str(exc.detail))
    resp.headers.update(exc.headers or {})  # e.g. Starlette's `Allow` on 405 (RFC 9110 requires it)
    return resp


async def _input_error(request: Request, exc: LungcadError) -> Response:
    if is_api(request):
        return problem(422, "Unusable input", str(exc))
    return _error_page(request, 422, "Unusable input", str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", "")} for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors)
    if is_api(request):
        return problem(422, "Invalid request", detail, errors=errors)
    return _error_page(request, 422, "Invalid request", detail)


async def _busy(request: Request, exc: SQLAlchemyTimeout) -> Response:
    log.warning("database connection pool exhausted on %s %s", request.method, request.url.path)
    if is_api(request):
        resp = problem(503, "Busy", "the server is overloaded: retry shortly")
    else:
        resp = _error_page(request, 503, "Busy", "The server is overloaded: please retry in a moment.")
    resp.headers["Retry-After"] = "5"
    return resp


async def _storage_unavailable(request: Request, exc: Exception) -> Response:
    """A full or read-only data folder or database: 503 with the reason, not a 500 (other OSErrors are bugs)."""
    reason = service.storage_problem(exc)
    if reason is None:
        return await _server_error(request, exc)
    log.error("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    detail = f"Nothing was saved: {reason}. Tell the administrator; /health shows the state."
    if is_api(request):
        resp = problem(503, "Storage unavailable", detail)
    else:
        resp = _error_page(request, 503, "Storage unavailable", detail)
    resp.headers["Retry-After"] = "60"
    return resp


async def _server_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the server log only (no request content in it); the user gets a reference.
    ref = secrets.token_hex(4)
    log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    if is_api(request):
        return problem(500, "Internal error", f"reference {ref}")
    return _error_page(request, 500, "Something went wrong", f"The error was logged with reference {ref}.")


def _error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    user, csrf = _signed_in(request)
    return HTMLResponse(
        request.app.state.templates.get_template("error.html").render(
            request=request, user=user, status=status, title=title, detail=display.nopath(detail), csrf=csrf,
        ),
        status_code=status,
    )


def _signed_in(request: Request) -> tuple[Any, str]:
    """(user, CSRF token) of the browser session behind a failed request, so the error page keeps the
    navigation; (None, "") when there is none or it cannot be looked up (the database may be what failed)."""
    if "session" not in request.scope or not isinstance(request.session.get("sid"), str):
        return None, ""  # e.g. a 500 caught outside the session middleware
    from lungcad.web.security import user_for_session

    try:
        with request.app.state.sessions() as session:
            user = user_for_session(session, request.session["sid"], request.app.state.settings.session_policy)
            session.commit()
        return user, str(request.session.get("csrf") or "")
    except Exception:  # noqa: BLE001 - an error page must render whatever else is broken
        return None, ""
