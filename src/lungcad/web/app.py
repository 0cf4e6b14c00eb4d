"""FastAPI application: server-rendered pages for clinicians plus a JSON REST API for PACS-side scripts.

`create_app(run_dir, data_dir=..., db=...)` builds the app; `lungcad serve` runs it under uvicorn.
Everything except /login, /health and /static requires a signed-in user (session cookie, HttpOnly,
SameSite=Lax, CSRF token on every form) or an API token (`Authorization: Bearer lcd_...`).
"""

# No `from __future__ import annotations`: FastAPI must resolve the Annotated dependency aliases
# defined inside create_app, which string annotations would hide.

import json
import logging
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import select, text
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

import lungcad
from lungcad.errors import LungcadError
from lungcad.web import service
from lungcad.web.db import ROLES, AuditEvent, Feedback, Study, User, audit, open_database
from lungcad.web.security import (
    add_user,
    authenticate,
    create_token,
    csrf_ok,
    load_secret,
    new_csrf_token,
    user_for_token,
)
from lungcad.web.uploads import MAX_FILES, MAX_UPLOAD_BYTES

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
SESSION_HOURS = 12  # a clinical shift; then sign in again
MAX_REQUEST_BYTES = 256 * 1024 * 1024  # whole request body (several files in one upload form)
LOGIN_WINDOW_S, LOGIN_MAX_FAILURES = 300, 10  # per user name and client: slows password guessing
DISCLAIMER = (
    "Decision support only, not a diagnosis: the result must be reviewed by a qualified clinician "
    "together with the full study and the clinical context."
)


@dataclass
class Settings:
    run_dir: Path
    data_dir: Path
    db: str | None = None
    secure_cookies: bool = False  # set behind HTTPS so the session cookie is never sent in clear


class AuthRequired(Exception):
    """Raised by page dependencies: redirect to the login page (or 401 problem for the API)."""


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
                    "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response that does not set them itself.

    Plain ASGI rather than @app.middleware("http"): that wrapper streams every response through an
    extra task and queue, a measurable cost per request under load.
    """

    def __init__(self, app: Any):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in self.headers if k not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = {
    # Everything is served from this origin: no CDN, no external fonts, no inline script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
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
) -> FastAPI:
    """The web application for one model (run folder), with its database and data folder.

    `predictor` defaults to lungcad.inference.predictor.Predictor(run_dir); tests inject a fake.
    """
    settings = Settings(Path(run_dir), Path(data_dir), db, secure_cookies)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        from lungcad.inference.predictor import Predictor

        predictor = Predictor(settings.run_dir)
    engine, session_factory = open_database(db, settings.data_dir)
    secret = load_secret(settings.data_dir)
    store = service.Store(settings.data_dir, secret, predictor)

    app = FastAPI(
        title="lungcad", version=lungcad.__version__, debug=False,
        description="Lung CT decision support: upload images, read predictions, give feedback. " + DISCLAIMER,
        # The interactive docs load scripts from a CDN: off (hospitals are offline). The schema is
        # served below, behind authentication like everything else.
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.settings, app.state.engine, app.state.sessions, app.state.store = settings, engine, session_factory, store
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(disclaimer=DISCLAIMER, version=lungcad.__version__)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    login_failures: dict[tuple[str, str], deque] = defaultdict(deque)

    app.add_middleware(SecurityHeaders)
    # Added last = outermost: the size cap applies before anything parses the body.
    app.add_middleware(
        SessionMiddleware, secret_key=secret, session_cookie="lungcad_session", max_age=SESSION_HOURS * 3600,
        same_site="lax", https_only=secure_cookies,
    )
    app.add_middleware(LimitBody, limit=MAX_REQUEST_BYTES)

    # ---------------------------------------------------------------- dependencies

    def get_db() -> Any:
        with session_factory() as session:
            yield session

    DB = Annotated[Session, Depends(get_db)]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return token

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
        uid = request.session.get("uid")
        if uid is None:
            return None
        user = session.get(User, uid)
        if user is None or not user.active:
            request.session.clear()
            return None
        request.state.via_token = False
        return user

    def current_user(request: Request, user: Annotated[User | None, Depends(optional_user)]) -> User:
        if user is None:
            raise AuthRequired()
        return user

    CurrentUser = Annotated[User, Depends(current_user)]

    def admin_user(user: CurrentUser) -> User:
        if user.role != "admin":
            raise HTTPException(403, "administrators only")
        return user

    AdminUser = Annotated[User, Depends(admin_user)]

    def check_csrf(request: Request, given: str | None) -> None:
        """Forms and cookie-authenticated API calls must carry the session's CSRF token."""
        if getattr(request.state, "via_token", False):
            return  # a bearer token is not an ambient credential a foreign site could ride on
        if not csrf_ok(request.session.get("csrf"), given or request.headers.get("x-csrf-token")):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page and try again")

    def page(request: Request, name: str, user: User | None, code: int = 200, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf_token(request), "classes": store.classes,
                            "model_sha": store.model_sha256, **ctx}, status_code=code,
        )

    def get_study(session: Session, study_id: str) -> Study:
        study = session.scalar(
            select(Study).where(Study.id == study_id)
            .options(selectinload(Study.feedback).selectinload(Feedback.user), selectinload(Study.user))
        )
        if study is None:
            raise HTTPException(404, "no such study")
        return study

    # ---------------------------------------------------------------- errors

    @app.exception_handler(AuthRequired)
    async def _auth_required(request: Request, exc: AuthRequired) -> Response:
        if is_api(request):
            return problem(401, "Authentication required", "sign in or send Authorization: Bearer <token>")
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(nxt)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        titles = {400: "Bad request", 401: "Not signed in", 403: "Forbidden", 404: "Not found",
                  405: "Method not allowed", 413: "Too large", 415: "Unsupported file", 422: "Unusable input",
                  429: "Too many attempts"}
        title = titles.get(exc.status_code, "Error")
        if is_api(request):
            return problem(exc.status_code, title, str(exc.detail))
        return _error_page(request, exc.status_code, title, str(exc.detail))

    @app.exception_handler(LungcadError)
    async def _input_error(request: Request, exc: LungcadError) -> Response:
        if is_api(request):
            return problem(422, "Unusable input", str(exc))
        return _error_page(request, 422, "Unusable input", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors)
        if is_api(request):
            return problem(422, "Invalid request", detail, errors=errors)
        return _error_page(request, 422, "Invalid request", detail)

    @app.exception_handler(SQLAlchemyTimeout)
    async def _busy(request: Request, exc: SQLAlchemyTimeout) -> Response:
        log.warning("database connection pool exhausted on %s %s", request.method, request.url.path)
        if is_api(request):
            resp = problem(503, "Busy", "the server is overloaded: retry shortly")
        else:
            resp = _error_page(request, 503, "Busy", "The server is overloaded: please retry in a moment.")
        resp.headers["Retry-After"] = "5"
        return resp

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        # The traceback goes to the server log only (no request content in it); the user gets a reference.
        ref = secrets.token_hex(4)
        log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        if is_api(request):
            return problem(500, "Internal error", f"reference {ref}")
        return HTMLResponse(
            templates.get_template("error.html").render(
                request=request, user=None, status=500, title="Something went wrong",
                detail=f"The error was logged with reference {ref}.", csrf="",
            ),
            status_code=500,
        )

    def _error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
        return HTMLResponse(
            templates.get_template("error.html").render(
                request=request, user=None, status=status, title=title, detail=detail, csrf="",
            ),
            status_code=status,
        )

    # ---------------------------------------------------------------- health, login, schema

    @app.get("/health", tags=["meta"])
    def health(session: DB) -> dict:
        """Liveness and readiness: the database answers and the model is loaded (no authentication)."""
        session.execute(text("SELECT 1"))
        return {"status": "ok", "version": lungcad.__version__, "model_sha256": store.model_sha256}

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(user: CurrentUser) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", None, next=_safe_next(next))

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request, session: DB, username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)], csrf_token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        check_csrf(request, csrf_token)
        key = (username.lower(), request.client.host if request.client else "")
        recent = login_failures[key]
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
                        next=_safe_next(next))
        recent.clear()
        request.session.clear()  # new session on sign-in (no fixation); new CSRF token with it
        request.session.update({"uid": user.id, "csrf": new_csrf_token()})
        audit(session, "login", user)
        session.commit()
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, session: DB, user: CurrentUser, csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        audit(session, "logout", user)
        session.commit()
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---------------------------------------------------------------- pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def upload_page(request: Request, session: DB, user: CurrentUser) -> HTMLResponse:
        recent = service.list_studies(session, limit=10)
        return page(request, "upload.html", user, recent=recent, max_mb=MAX_UPLOAD_BYTES // 1024 // 1024,
                    max_files=MAX_FILES)

    @app.post("/upload", include_in_schema=False)
    async def upload(request: Request, user: CurrentUser, files: Annotated[list[UploadFile], File()],
                     csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per upload")
        batch = secrets.token_hex(8)
        results = []
        for i, up in enumerate(files, 1):
            raw = await up.read(MAX_UPLOAD_BYTES + 1)
            results.append(await run_in_threadpool(_store_one, user, raw, batch, f"file {i}"))
        ok = [r for r in results if r["study_id"]]
        if len(results) == 1 and ok:
            return RedirectResponse(f"/studies/{ok[0]['study_id']}", status_code=303)
        # Original file names are shown back to the person who uploaded them, never stored.
        for r, up in zip(results, files):
            r["name"] = (up.filename or "")[:120]
        status = 200 if ok else 422
        with session_factory() as session:
            return page(request, "upload_result.html", session.get(User, user.id), code=status, results=results)

    def _store_one(user: User, raw: bytes, batch: str, label: str) -> dict:
        # Its own session: the request's connection went back to the pool while the upload waits
        # for the model. `user` was loaded by the request's session; only its id and name are read.
        with session_factory() as session:
            try:
                study = service.record_upload(session, store, user, raw, batch, label)
                return {"study_id": study.id, "label": study.label, "decision": study.decision, "error": ""}
            except LungcadError as exc:
                session.rollback()
                audit(session, "upload_rejected", user, reason=str(exc)[:200])
                session.commit()
                return {"study_id": "", "error": str(exc)}

    @app.get("/studies/{study_id}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, session: DB, user: CurrentUser, study_id: str, saved: int = 0) -> HTMLResponse:
        study = get_study(session, study_id)
        probs = sorted(study.probabilities.items(), key=lambda kv: store.classes.index(kv[0]) if kv[0] in store.classes else 99)
        threshold = _threshold(store)
        return page(request, "study.html", user, study=study, probs=probs, saved=saved, threshold=threshold,
                    mine=[f for f in study.feedback if f.user_id == user.id])

    @app.get("/studies/{study_id}/image.png", include_in_schema=False)
    def study_image(session: DB, user: CurrentUser, study_id: str) -> FileResponse:
        return FileResponse(store.path(get_study(session, study_id).image_file), media_type="image/png")

    @app.get("/studies/{study_id}/{which}.png", include_in_schema=False)
    def study_explain(session: DB, user: CurrentUser, study_id: str, which: str) -> FileResponse:
        if which not in ("input", "overlay"):
            raise HTTPException(404, "no such image")
        inp, overlay = service.explain_images(store, get_study(session, study_id))
        return FileResponse(inp if which == "input" else overlay, media_type="image/png")

    @app.post("/studies/{study_id}/feedback", include_in_schema=False)
    def feedback_form(
        request: Request, session: DB, user: CurrentUser, study_id: str,
        agree: Annotated[str, Form()], label: Annotated[str, Form()], confidence: Annotated[int, Form()],
        comment: Annotated[str, Form(max_length=4000)] = "", usability: Annotated[str, Form()] = "",
        csrf_token: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(request, csrf_token)
        study = get_study(session, study_id)
        fb = service.FeedbackInput(agree=agree == "yes", label=label, confidence=confidence, comment=comment,
                                   usability=int(usability) if usability.strip().isdigit() else None)
        service.add_feedback(session, store, study, user, fb)
        session.commit()
        return RedirectResponse(f"/studies/{study.id}?saved=1", status_code=303)

    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    def worklist(request: Request, session: DB, user: CurrentUser, status: str = "all") -> HTMLResponse:
        status = status if status in ("all", "pending", "reviewed", "disagree") else "all"
        return page(request, "worklist.html", user, studies=service.list_studies(session, status, limit=200), status=status)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request, session: DB, user: AdminUser) -> HTMLResponse:
        return page(request, "dashboard.html", user, stats=service.pilot_stats(session, store.classes))

    @app.get("/dashboard/feedback.csv", include_in_schema=False)
    def dashboard_csv(session: DB, user: AdminUser) -> Response:
        body = service.feedback_csv(session)
        audit(session, "export", user, target="feedback.csv", model_sha256=store.model_sha256, rows=body.count("\n") - 1)
        session.commit()
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="lungcad-feedback.csv"'})

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, session: DB, user: AdminUser, action: str = "", limit: int = 200) -> HTMLResponse:
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 2000)))
        if action:
            q = q.where(AuditEvent.action == action)
        return page(request, "audit.html", user, events=list(session.scalars(q)), action=action)

    @app.get("/model", response_class=HTMLResponse, include_in_schema=False)
    def model_page(request: Request, user: CurrentUser) -> HTMLResponse:
        return page(request, "model.html", user, **_model_info(settings.run_dir, store))

    @app.get("/model/report.html", include_in_schema=False)
    def model_report(user: CurrentUser) -> Response:
        """The evaluation report written by `lungcad evaluate` (self-contained HTML), sandboxed."""
        path = settings.run_dir / "report.html"
        if not path.is_file():
            raise HTTPException(404, "no report.html in the run folder (run lungcad evaluate)")
        # The report inlines its styles and figures (data: URIs); it gets no script and no network.
        csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
        return HTMLResponse(path.read_text(encoding="utf-8"), headers={"Content-Security-Policy": csp})

    @app.get("/account", response_class=HTMLResponse, include_in_schema=False)
    def account(request: Request, user: CurrentUser) -> HTMLResponse:
        return page(request, "account.html", user, token=None)

    @app.post("/account/tokens", response_class=HTMLResponse, include_in_schema=False)
    def new_token(request: Request, session: DB, user: CurrentUser, name: Annotated[str, Form(max_length=64)] = "script",
                  csrf_token: Annotated[str, Form()] = "") -> HTMLResponse:
        check_csrf(request, csrf_token)
        token = create_token(session, user, name or "script", actor=user)
        session.commit()
        return page(request, "account.html", user, token=token)

    @app.get("/users", response_class=HTMLResponse, include_in_schema=False)
    def users_page(request: Request, session: DB, user: AdminUser, error: str = "") -> HTMLResponse:
        return page(request, "users.html", user, users=list(session.scalars(select(User).order_by(User.username))),
                    roles=ROLES, error=error)

    @app.post("/users", include_in_schema=False)
    def users_add(request: Request, session: DB, user: AdminUser, username: Annotated[str, Form(max_length=64)],
                  password: Annotated[str, Form(max_length=1024)], role: Annotated[str, Form()],
                  csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        try:
            add_user(session, username, password, role, actor=user)
        except LungcadError as exc:
            session.rollback()
            return page(request, "users.html", user, users=list(session.scalars(select(User).order_by(User.username))),
                        roles=ROLES, error=str(exc), code=422)
        session.commit()
        return RedirectResponse("/users", status_code=303)

    @app.post("/users/{user_id}/active", include_in_schema=False)
    def users_active(request: Request, session: DB, user: AdminUser, user_id: int, active: Annotated[str, Form()],
                     csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        other = session.get(User, user_id)
        if other is None:
            raise HTTPException(404, "no such user")
        if other.id == user.id:
            raise HTTPException(400, "you cannot deactivate your own account")
        other.active = active == "yes"
        audit(session, "user_active" if other.active else "user_deactivate", user, target=other.username)
        session.commit()
        return RedirectResponse("/users", status_code=303)

    # ---------------------------------------------------------------- REST API

    class FeedbackIn(BaseModel):
        study_id: str = Field(max_length=32)
        agree: bool
        label: str = Field(max_length=32, description="the clinician's label (one of the model's classes)")
        confidence: int = Field(ge=1, le=5)
        comment: str = Field("", max_length=4000)
        usability: int | None = Field(None, ge=1, le=5, description="rating of the tool, 1 (poor) to 5 (good)")

    @app.post("/api/predict", status_code=201, tags=["api"])
    async def api_predict(request: Request, user: CurrentUser, file: Annotated[UploadFile, File()]) -> dict:
        """Upload one PNG/JPEG/DICOM image (multipart field `file`): the stored study with its prediction."""
        check_csrf(request, None)
        raw = await file.read(MAX_UPLOAD_BYTES + 1)
        return await run_in_threadpool(_api_store, user, raw)

    def _api_store(user: User, raw: bytes) -> dict:
        with session_factory() as session:  # see _store_one
            try:
                study = service.record_upload(session, store, user, raw, secrets.token_hex(8), "file")
            except LungcadError:
                session.rollback()
                raise
            return service.study_dict(study)

    @app.post("/api/feedback", status_code=201, tags=["api"])
    def api_feedback(request: Request, session: DB, user: CurrentUser, body: FeedbackIn) -> dict:
        """Record a clinician's feedback on a study; the stored row (with its id) is returned."""
        check_csrf(request, None)
        study = session.get(Study, body.study_id)
        if study is None:
            raise HTTPException(404, "no such study")
        row = service.add_feedback(session, store, study, user, service.FeedbackInput(
            agree=body.agree, label=body.label, confidence=body.confidence, comment=body.comment, usability=body.usability))
        session.commit()
        return service.feedback_dict(row)

    @app.get("/api/studies", tags=["api"])
    def api_studies(session: DB, user: CurrentUser, status: str = "all", limit: int = 100, offset: int = 0) -> list[dict]:
        """Recent studies, newest first; status = all / pending / reviewed / disagree."""
        if status not in ("all", "pending", "reviewed", "disagree"):
            raise HTTPException(400, "status must be all, pending, reviewed or disagree")
        return [service.study_dict(s) for s in service.list_studies(session, status, limit, offset)]

    @app.get("/api/studies/{study_id}", tags=["api"])
    def api_study(session: DB, user: CurrentUser, study_id: str) -> dict:
        return service.study_dict(get_study(session, study_id), with_feedback=True)

    @app.get("/api/me", tags=["api"])
    def api_me(user: CurrentUser) -> dict:
        return {"username": user.username, "role": user.role}

    return app


def _threshold(store: service.Store) -> float | None:
    th = getattr(store.predictor.contract, "thresholds", {}) or {}
    value = th.get("malignant") if isinstance(th, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _model_info(run_dir: Path, store: service.Store) -> dict:
    """Contract, evaluation report and training-data summary for the model page (files that exist)."""
    contract = store.predictor.contract
    info: dict[str, Any] = {"contract": contract.to_dict() if hasattr(contract, "to_dict") else dict(vars(contract))}
    for name in ("metrics.json", "data.json"):
        path = run_dir / name
        try:
            info[name.split(".")[0]] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            info[name.split(".")[0]] = None
    info["report_html"] = (run_dir / "report.html").is_file()
    reports = [p.name for p in sorted(run_dir.glob("report*.md"))] if run_dir.is_dir() else []
    info["report_md"] = (run_dir / reports[0]).read_text(encoding="utf-8")[:100_000] if reports else ""
    return info


def _safe_next(target: str) -> str:
    # Only local paths: an open redirect would let a phishing link land on a foreign site after login.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="/")
