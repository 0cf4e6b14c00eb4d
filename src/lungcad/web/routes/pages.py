"""The clinicians' pages: upload, study result with Grad-CAM and feedback, worklist, model, account."""

# No `from __future__ import annotations`: FastAPI resolves the Annotated parameters at runtime.

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lungcad.errors import LungcadError
from lungcad.run import RunFolder
from lungcad.web import pacs, reading, service, throttle, viewer
from lungcad.web.db import ApiToken, Image, ReferenceDiagnosis, Study, SusResponse, User, audit, utcnow
from lungcad.web.deps import DB, CurrentUser, Sessions, Settings, SettingsDep, StoreDep, check_csrf, get_study, page
from lungcad.web.security import (
    DEFAULT_TOKEN_DAYS,
    MAX_TOKEN_DAYS,
    change_password,
    check_new_password,
    create_token,
    revoke_token,
)
from lungcad.web.uploads import MAX_FILES, MAX_UPLOAD_BYTES, expand_upload

__all__ = ["display_image", "get_image", "owned_token", "result_panel", "router", "send_results", "series_viewers",
           "upload_items"]

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def upload_page(request: Request, session: DB, user: CurrentUser) -> HTMLResponse:
    recent = service.list_studies(session, limit=10)
    return page(request, "upload.html", user, recent=recent, max_mb=MAX_UPLOAD_BYTES // 1024 // 1024,
                max_files=MAX_FILES, hidden=reading.hidden_study_ids(session, user, [s.id for s in recent]))


@router.post("/upload", include_in_schema=False)
async def upload(request: Request, user: CurrentUser, sessions: Sessions, store: StoreDep,
                 files: Annotated[list[UploadFile], File()], csrf_token: Annotated[str, Form()] = "",
                 case_label: Annotated[str, Form(max_length=128)] = "") -> Response:
    """Several files, a folder or zips: DICOM grouped by Study and Series UID, JPG/PNG into one case."""
    check_csrf(request, csrf_token)
    files = [f for f in files if f.filename or f.size]  # an empty second picker sends one nameless part
    if len(files) > MAX_FILES:
        raise HTTPException(413, f"at most {MAX_FILES} files per upload")
    if not files:
        raise HTTPException(422, "no files")
    results = await run_in_threadpool(
        service.ingest, sessions, store, user, upload_items(files), case_label)
    created = [r for r in results if r.study_id]
    if len(results) == 1 and created:
        return RedirectResponse(f"/studies/{created[0].study_id}", status_code=303)
    status = 200 if created else 503 if any(r.storage for r in results) else (
        500 if any(r.internal for r in results) else 422)
    with sessions() as session:
        me = session.get(User, user.id)
        hidden = reading.hidden_study_ids(session, me, [r.study_id for r in created])  # reading mode: not read yet
        return page(request, "upload_result.html", me, code=status, results=results, hidden=hidden)


def upload_items(files: list[UploadFile]) -> Iterator[tuple[str, str, Any]]:
    """(display name, error label, bytes or error) for each uploaded file or zip member, read one at a
    time from the spooled uploads (a zip is never read whole). Original file names are shown back to
    the person who uploaded them, never stored."""
    count = 0
    for i, up in enumerate(files, 1):
        for item in expand_upload((up.filename or "")[:160], up.file, f"file {i}"):
            count += 1
            if count > MAX_FILES:
                yield item[0], item[1], LungcadError(f"over {MAX_FILES} files in one upload: not read", item[1])
                return
            yield item


@router.get("/studies/{study_id}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, session: DB, user: CurrentUser, store: StoreDep, settings: SettingsDep, study_id: str,
               saved: str = "") -> HTMLResponse:
    study = get_study(session, study_id)
    result = service.exam_result(study)
    reading_ctx = _reading_context(session, user, study)
    hidden = reading_ctx["ai_hidden"]
    send = _send_context(session, user, settings, study, hidden)
    audit(session, "study_view", user, target=study.id, ai_hidden=hidden)  # who looked at which image
    session.commit()
    return page(request, "study.html", user, study=study, result=result, panel=result_panel(store, result),
                series_panels=[(s, result_panel(store, s)) for s in study.series], saved=saved,
                viewers=series_viewers(request, study, hidden), send=send, **reading_ctx)


def _send_context(session: Session, user: User, settings: Settings, study: Study, ai_hidden: bool) -> dict | None:
    """The exam page's "Send results to PACS" box: None when there is none to show (no PACS configured, not a
    DICOM exam, a user who may not send it); otherwise the destination and why it cannot be sent, if so."""
    if settings.pacs is None or study.kind != "dicom" or user.role not in pacs.SENDERS or ai_hidden:
        return None
    return {"destination": str(settings.pacs), "refusal": pacs.send_refusal(session, study)}


def series_viewers(request: Request, study: Study, ai_hidden: bool) -> list[tuple[Any, dict]]:
    """One image viewer per series of the exam: its images as the frame list, in slice order
    (Series.images: InstanceNumber, then upload order), each frame on the per-image routes."""
    out = []
    for s in study.series:
        images = list(s.images)
        if not images:
            continue
        word = "Slice" if s.modality and s.modality != "image" else "Image"
        labels = [f"{word} {im.instance_number}" if im.instance_number is not None else f"{word} {k}"
                  for k, im in enumerate(images, 1)]
        if len(images) == 1:
            labels = ["Image"]
        out.append((s, viewer.viewer_config(request, images, labels, ai_hidden=ai_hidden)))
    return out


def _reading_context(session: Session, user: User, study: Any) -> dict:
    """What templates/_reading.html needs: hidden or not, the user's read and its history, the others' reads."""
    hidden = reading.ai_hidden(session, user, study)
    mine = reading.get_read(session, study, user)
    finished = mine is not None and mine.final_label is not None
    return {
        "ai_hidden": hidden, "read": mine, "read_history": reading.revisions_of(session, mine) if mine else [],
        # others' reads carry the AI label and could anchor: shown once one's own final read is saved
        "other_reads": [r for r in study.reads if r.user_id != user.id and r.final_label] if finished else [],
        "reference": session.get(ReferenceDiagnosis, study.id) if finished or not user.reading_mode else None,
        "may_enter_reference": user.role in ("admin", "clinician") and (finished or not user.reading_mode),
        "reference_sources": reading.REFERENCE_SOURCES, "today": utcnow().date().isoformat(),
    }


def result_panel(store: service.Store, result: Any) -> dict:
    """What the result panel (templates/_result_panel.html) shows for an exam's or a series' result."""
    order = {c: i for i, c in enumerate(store.classes)}
    probs = sorted((result.probabilities or {}).items(), key=lambda kv: order.get(kv[0], 99))
    threshold = _threshold(store)
    return {"headline": service.headline(result, store.predictor.contract), "probs": probs,
            "threshold": threshold, "label": result.label, "ood": result.ood,
            "ood_reasons": list(result.ood_reasons or []), "ood_score": result.ood_score}


@router.get("/studies/{study_id}/image.png", include_in_schema=False)
def study_image(session: DB, user: CurrentUser, store: StoreDep, study_id: str) -> FileResponse:
    """The exam's image (`display_image`: its key image, or its first for a reader who may not see the AI result yet)."""
    study = get_study(session, study_id)
    image = display_image(study, reading.ai_hidden(session, user, study))
    return FileResponse(store.path(image.image_file), media_type="image/png")


@router.get("/studies/{study_id}/{which}.png", include_in_schema=False)
def study_explain(session: DB, user: CurrentUser, store: StoreDep, study_id: str, which: str) -> FileResponse:
    if which not in ("input", "overlay"):
        raise HTTPException(404, "no such image")
    study = get_study(session, study_id)
    hidden = reading.ai_hidden(session, user, study)
    if which == "overlay" and hidden:  # the heatmap shows what the AI found
        raise HTTPException(403, "reading mode: the heatmap is shown after your unaided read")
    inp, overlay = service.explain_images(store, display_image(study, hidden))
    return FileResponse(inp if which == "input" else overlay, media_type="image/png")


def display_image(study: Study, ai_hidden: bool = False) -> Image:
    """The image that stands for the exam on its one-image routes (/studies/{id}/image.png, pixels.npy,
    ...): its key image (the most malignant key slice of the series its result comes from); for a
    reader in reading mode before their unaided read, the first image of its first series instead
    (which slice is key is part of the AI result)."""
    if ai_hidden:
        first = next((s.images[0] for s in study.series if s.images), None)
        if first is None:
            raise HTTPException(404, "this exam has no image")
        return first
    key = service.exam_result(study).key_image
    if key is None:
        raise HTTPException(404, "this exam has no scored image")
    return key


def get_image(session: Session, image_id: str) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise HTTPException(404, "no such image")
    return image


@router.get("/images/{image_id}.png", include_in_schema=False)
def image_png(session: DB, user: CurrentUser, store: StoreDep, image_id: str) -> FileResponse:
    return FileResponse(store.path(get_image(session, image_id).image_file), media_type="image/png")


@router.get("/images/{image_id}/{which}.png", include_in_schema=False)
def image_explain(session: DB, user: CurrentUser, store: StoreDep, image_id: str, which: str) -> FileResponse:
    if which not in ("input", "overlay"):
        raise HTTPException(404, "no such image")
    image = get_image(session, image_id)
    if which == "overlay" and reading.ai_hidden_id(session, user, image.study_id):
        raise HTTPException(403, "reading mode: the heatmap is shown after your unaided read")
    inp, overlay = service.explain_images(store, image)
    return FileResponse(inp if which == "input" else overlay, media_type="image/png")


@router.post("/studies/{study_id}/read", include_in_schema=False)
def read_form(
    request: Request, session: DB, user: CurrentUser, store: StoreDep, study_id: str,
    stage: Annotated[str, Form()], label: Annotated[str, Form()] = "", confidence: Annotated[str, Form()] = "",
    comment: Annotated[str, Form(max_length=4000)] = "", csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """One step of the reader's read: `stage` unaided (reading mode, before the AI result) or aided (final)."""
    check_csrf(request, csrf_token)
    study = get_study(session, study_id)
    if not confidence.strip().isdigit():
        raise LungcadError("choose your confidence (1-5)")
    try:
        reading.save_read(session, study, user, stage, label, int(confidence), store.classes, comment, "form")
    except reading.ReadConflict as exc:
        raise HTTPException(409, str(exc)) from None
    session.commit()
    return RedirectResponse(f"/studies/{study.id}?saved={'unaided' if stage == 'unaided' else 'aided'}#reading",
                            status_code=303)


@router.post("/studies/{study_id}/reference", include_in_schema=False)
def reference_form(
    request: Request, session: DB, user: CurrentUser, store: StoreDep, study_id: str,
    label: Annotated[str, Form()], source: Annotated[str, Form()], diagnosed_on: Annotated[str, Form()],
    note: Annotated[str, Form(max_length=2000)] = "", csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """The reference diagnosis (pathology or follow-up) of a study, entered later by a clinician or an admin."""
    check_csrf(request, csrf_token)
    study = get_study(session, study_id)
    if not _reading_context(session, user, study)["may_enter_reference"]:
        raise HTTPException(403, "reading mode: enter a reference after your own final read")
    reading.set_reference(session, study, user, label, source, diagnosed_on, note, store.classes)
    session.commit()
    return RedirectResponse(f"/studies/{study.id}?saved=reference#reading", status_code=303)


@router.post("/studies/{study_id}/send", include_in_schema=False)
def send_form(request: Request, session: DB, user: CurrentUser, store: StoreDep, settings: SettingsDep, study_id: str,
              csrf_token: Annotated[str, Form()] = "") -> Response:
    """The exam page's "Send results to PACS" button (`POST /api/studies/{id}/send` for scripts)."""
    check_csrf(request, csrf_token)
    queued = send_results(request, session, user, store, settings, study_id)
    return RedirectResponse(f"/studies/{study_id}?saved=sent-{queued}#pacs", status_code=303)


def send_results(request: Request, session: Session, user: User, store: service.Store, settings: Settings, study_id: str) -> int:
    """Queue the exam's results for the PACS and commit (shared by the API and the exam page's form)."""
    study = get_study(session, study_id)
    try:
        queued = pacs.send_exam(session, store, request.app.state.outbox, settings.pacs, study, user,
                                reading.ai_hidden(session, user, study))
    except pacs.SendRefused as exc:
        session.rollback()
        raise HTTPException(exc.status, str(exc)) from None
    session.commit()
    request.app.state.outbox.wake()
    return queued


@router.get("/sus", response_class=HTMLResponse, include_in_schema=False)
def sus_page(request: Request, session: DB, user: CurrentUser, saved: int = 0) -> HTMLResponse:
    period = reading.current_period(session)
    mine = session.scalar(select(SusResponse).where(SusResponse.user_id == user.id, SusResponse.period == period))
    return page(request, "sus.html", user, items=reading.SUS_ITEMS, scale=reading.SUS_SCALE, period=period,
                mine=mine, saved=saved)


@router.post("/sus", include_in_schema=False)
async def sus_form(request: Request, user: CurrentUser, sessions: Sessions) -> Response:
    """The System Usability Scale of the current pilot period (one per user and period; saving again replaces it)."""
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token", "")))
    answers = []
    for i in range(1, 11):
        value = str(form.get(f"q{i}", ""))
        if not value.isdigit():
            raise LungcadError(f"answer item {i} of the questionnaire (1-5)")
        answers.append(int(value))
    with sessions() as session:
        reading.save_sus(session, session.get(User, user.id), answers)
        session.commit()
    return RedirectResponse("/sus?saved=1", status_code=303)


@router.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
def worklist(request: Request, session: DB, user: CurrentUser, status: str = "all") -> HTMLResponse:
    status = status if status in ("all", "pending", "reviewed", "disagree") else "all"
    studies = service.list_studies(session, status, limit=200)
    hidden = reading.hidden_study_ids(session, user, [s.id for s in studies])
    if status == "disagree":  # whether readers disagreed with the AI says something about its result
        studies = [s for s in studies if s.id not in hidden]
    return page(request, "worklist.html", user, studies=studies, status=status, hidden=hidden)


@router.get("/model", response_class=HTMLResponse, include_in_schema=False)
def model_page(request: Request, user: CurrentUser, settings: SettingsDep, store: StoreDep) -> HTMLResponse:
    return page(request, "model.html", user, **_model_info(settings.run_dir, store))


@router.get("/model/report.html", include_in_schema=False)
def model_report(user: CurrentUser, settings: SettingsDep) -> Response:
    """The evaluation report written by `lungcad evaluate` (self-contained HTML), sandboxed."""
    path = settings.run_dir / "report.html"
    if not path.is_file():
        raise HTTPException(404, "no report.html in the run folder (run lungcad evaluate)")
    # The report inlines its styles and figures (data: URIs); it gets no script and no network.
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
    return HTMLResponse(path.read_text(encoding="utf-8"), headers={"Content-Security-Policy": csp})


def _account(request: Request, session: Session, user: User, code: int = 200, **ctx: Any) -> HTMLResponse:
    tokens = session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc()).limit(50))
    ctx = {"token": None, "error": "", "notice": "", **ctx}
    return page(request, "account.html", user, code=code, tokens=list(tokens), default_days=DEFAULT_TOKEN_DAYS,
                max_days=MAX_TOKEN_DAYS, **ctx)


@router.get("/account", response_class=HTMLResponse, include_in_schema=False)
def account(request: Request, session: DB, user: CurrentUser, changed: int = 0) -> HTMLResponse:
    return _account(request, session, user, notice="Password changed; your other sessions were ended." if changed else "")


@router.post("/account/tokens", response_class=HTMLResponse, include_in_schema=False)
def new_token(request: Request, session: DB, user: CurrentUser, name: Annotated[str, Form(max_length=64)] = "script",
              days: Annotated[int, Form(ge=1, le=MAX_TOKEN_DAYS)] = DEFAULT_TOKEN_DAYS,
              csrf_token: Annotated[str, Form()] = "") -> HTMLResponse:
    check_csrf(request, csrf_token)
    token = create_token(session, user, name or "script", actor=user, days=days)
    session.commit()
    return _account(request, session, user, token=token)


@router.post("/tokens/{token_id}/revoke", include_in_schema=False)
def revoke_token_form(request: Request, session: DB, user: CurrentUser, token_id: int,
                      csrf_token: Annotated[str, Form()] = "") -> Response:
    """Revoke an API token: one's own, or anyone's for an administrator."""
    check_csrf(request, csrf_token)
    token = owned_token(session, user, token_id)
    revoke_token(session, token, user)
    session.commit()
    return RedirectResponse("/account" if token.user_id == user.id else "/users", status_code=303)


def owned_token(session: Session, user: User, token_id: int) -> ApiToken:
    """The token if `user` may manage it (its owner or an administrator); 404 otherwise, so ids are not probed."""
    token = session.get(ApiToken, token_id)
    if token is None or (token.user_id != user.id and user.role != "admin"):
        raise HTTPException(404, "no such token")
    return token


@router.post("/account/password", response_class=HTMLResponse, include_in_schema=False)
def password_form(request: Request, session: DB, user: CurrentUser,
                  current_password: Annotated[str, Form(max_length=1024)],
                  new_password: Annotated[str, Form(max_length=1024)],
                  confirm_password: Annotated[str, Form(max_length=1024)],
                  csrf_token: Annotated[str, Form()] = "") -> Response:
    """Change one's password (the current one is required); every other session of the account ends.

    Wrong current passwords earn the sign-in back-off (web.throttle) under a key of their own, so a
    borrowed session cannot be used to guess the password at full speed.
    """
    check_csrf(request, csrf_token)
    policy = request.app.state.settings.backoff
    keys = throttle.Keys(((f"password:{user.id}", policy.account_free),), None)
    try:
        check_new_password(current_password, new_password, confirm_password)
        if wait := throttle.retry_after(session, keys, policy, utcnow()):
            resp = _account(request, session, user, code=429, error=f"Too many wrong passwords: try again in {wait} s.")
            resp.headers["Retry-After"] = str(wait)
            return resp
        throttle.record_attempt(session, keys, policy, utcnow())  # counted first: see routes.auth.login
        session.commit()
        change_password(session, user, current_password, new_password, keep_session=request.session.get("sid"))
    except LungcadError as exc:
        session.rollback()
        audit(session, "password_change_failed", user, reason=str(exc)[:200])
        session.commit()
        return _account(request, session, user, code=422, error=str(exc))
    throttle.succeeded(session, keys)
    session.commit()
    return RedirectResponse("/account?changed=1", status_code=303)


def _threshold(store: service.Store) -> float | None:
    """The threshold the decision rule applies (None: a multiclass model without one takes the argmax)."""
    return store.predictor.contract.decision_threshold()


def _model_info(run_dir: Path, store: service.Store) -> dict:
    """Contract, evaluation report, training-data summary and site checks for the model page (files that exist)."""
    contract = store.predictor.contract
    info: dict[str, Any] = {"contract": contract.to_dict() if hasattr(contract, "to_dict") else dict(vars(contract))}
    run = RunFolder(run_dir)
    for name, read in (("metrics", run.metrics), ("data", run.data_summary)):
        try:
            info[name] = read()
        except LungcadError:
            info[name] = None
    info["site_checks"] = run.site_checks()  # the latest `lungcad check` per site
    info["report_html"] = (run_dir / "report.html").is_file()
    reports = [p.name for p in sorted(run_dir.glob("report*.md"))] if run_dir.is_dir() else []
    info["report_md"] = (run_dir / reports[0]).read_text(encoding="utf-8")[:100_000] if reports else ""
    return info
