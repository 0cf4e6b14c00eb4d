"""Web app through httpx (FastAPI TestClient): auth, CSRF, uploads, predictions, feedback, audit, export.

A small fake predictor stands in for lungcad.inference.predictor here (dependency injection), so
these tests need no trained model; the browser tests use the real Predictor on a real run.
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select, text  # noqa: E402

from lungcad.cli import main  # noqa: E402
from lungcad.data.images import decode_image  # noqa: E402
from lungcad.data.transforms import Preprocessing  # noqa: E402
from lungcad.models.contract import ModelContract  # noqa: E402
from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import AuditEvent, Read, User, open_database  # noqa: E402
from lungcad.web.security import add_user  # noqa: E402

CLASSES = ["normal", "benign", "malignant"]
PASSWORD = "correct horse battery"


@dataclass
class FakePrediction:
    source: str
    probabilities: dict
    label: str
    malignant_probability: float
    decision: str
    ood: bool = False
    ood_score: float | None = None
    error: str = ""
    model_sha256: str = "f" * 64
    dicom: dict = field(default_factory=dict)


@dataclass
class FakeExplanation:
    heatmap: np.ndarray
    overlay: np.ndarray
    image: np.ndarray


class FakePredictor:
    """Brightness decides the class: enough to test the app's plumbing deterministically."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.decoded = 0  # load_pixels calls
        self.seen: list[np.ndarray] = []  # what predict_prepared received
        self.contract = ModelContract(
            arch="resnet50", task="multiclass", classes=list(CLASSES), preprocessing=Preprocessing(image_size=64),
            thresholds={"malignant": 0.5}, model_sha256="f" * 64,
            training={"operating_point": {"threshold": 0.5, "fitted_on": "validation"}},  # a fitted threshold
        )

    def load_pixels(self, data, name=None):
        self.decoded += 1
        raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
        if raw[128:132] == b"DICM":
            import pydicom

            arr = pydicom.dcmread(io.BytesIO(raw)).pixel_array.astype(np.float64)
            arr = (arr - arr.min()) / max(1.0, float(np.ptp(arr))) * 255
            return arr.astype(np.uint8), {}
        return decode_image(raw, "grey", name), {}

    def prepare(self, pixels):
        return pixels

    def predict_prepared(self, tensors, sources=None, pixels=None):
        if self.fail:
            raise RuntimeError("secret internal detail")
        out = []
        self.seen.extend(tensors)
        for px in tensors:
            m = float(px.mean()) / 255
            p = np.array([1 - m, 0.1, m]) + 1e-3
            p = p / p.sum()
            probs = dict(zip(CLASSES, map(float, p)))
            label = max(probs, key=probs.get)
            out.append(FakePrediction("x", probs, label, probs["malignant"],
                                      "malignant" if probs["malignant"] >= 0.5 else "not malignant",
                                      ood=m > 0.9, ood_score=m))
        return out

    def explain(self, data, target=None):
        px, _ = self.load_pixels(data)
        img = np.asarray(Image.fromarray(px).resize((64, 64)))
        heat = np.linspace(0, 1, 64 * 64).reshape(64, 64)
        overlay = np.stack([np.maximum(img, (heat * 255).astype(np.uint8)), img, img], axis=2)
        return FakeExplanation(heat, overlay, img)


def png_bytes(value: int = 120, size: int = 48) -> bytes:
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 20, (size, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid small PNG whose header claims a huge image (never decoded by the app)."""
    raw = png_bytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def users_database(data: Path):
    """A web data folder whose database has alice (clinician) and root (admin); its sessionmaker."""
    _, sessions = open_database(None, data)
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        add_user(s, "root", PASSWORD, "admin")
        s.commit()
    return sessions


@pytest.fixture
def web(tmp_path: Path):
    data = tmp_path / "webdata"
    sessions = users_database(data)
    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())
    with TestClient(app) as client:
        yield client, sessions, data


def login(client: TestClient, user: str = "alice", password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": user, "password": password, "csrf_token": token, "next": "/"},
                       follow_redirects=False)


def upload(client: TestClient, files: list[tuple[str, bytes]]):
    token = csrf_of(client.get("/").text)
    return client.post("/upload", data={"csrf_token": token},
                       files=[("files", (name, raw, "application/octet-stream")) for name, raw in files],
                       follow_redirects=False)


def test_health_and_authentication_required(web):
    client, _, _ = web
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["model_sha256"] == "f" * 64
    for path in ("/", "/worklist", "/model", "/dashboard", "/studies/abc", "/docs"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    for method, path in (("get", "/api/studies"), ("get", "/openapi.json"), ("post", "/api/feedback")):
        r = getattr(client, method)(path)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
    r = client.get("/api/studies", headers={"Authorization": "Bearer lcd_wrong"})
    assert r.status_code == 401
    assert "default-src 'self'" in client.get("/login").headers["content-security-policy"]


def test_login_csrf_cookie_flags_and_audit(web):
    client, sessions, _ = web
    r = client.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403  # no CSRF token
    r = login(client, password="wrong password")
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = login(client)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/").status_code == 200
    with sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        assert actions[-2:] == ["login_failed", "login"]
        assert s.scalar(select(User).where(User.username == "alice")).password_hash.startswith("$argon2id$")


def test_upload_result_page_images_and_feedback(web):
    client, sessions, _ = web
    login(client)
    r = upload(client, [("patient name.png", png_bytes(200))])
    assert r.status_code == 303
    study_url = r.headers["location"]
    page = client.get(study_url).text
    for needle in ("malignant", "Calibrated probabilities", "Decision support only", "f" * 12, "Grad-CAM",
                   "is at or above the operating threshold 0.50"):
        assert needle in page
    for suffix in ("image.png", "input.png", "overlay.png"):
        r = client.get(f"{study_url}/{suffix}")
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(client.get(f"{study_url}/overlay.png").content)).mode == "RGB"
    # the read: CSRF enforced, then stored with user, time and model sha; agree derived from the labels
    form = {"stage": "aided", "label": "benign", "confidence": "4", "comment": "=HYPERLINK(x) nodule looks benign"}
    assert client.post(f"{study_url}/read", data=form, follow_redirects=False).status_code == 403
    r = client.post(f"{study_url}/read", data={**form, "csrf_token": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    assert "final decision is saved" in client.get(r.headers["location"]).text
    with sessions() as s:
        fb = s.scalar(select(Read))
        assert (fb.agree, fb.final_label, fb.final_confidence, fb.model_label) == (False, "benign", 4, "malignant")
        assert fb.user.username == "alice" and fb.model_sha256 == "f" * 64 and fb.final_at is not None
        ev = s.scalar(select(AuditEvent).where(AuditEvent.action == "prediction"))
        assert len(ev.input_sha256) == 64 and ev.model_sha256 == "f" * 64
    # the original file name is never stored
    with sessions() as s:
        dump = " ".join(str(r) for r in s.execute(text("SELECT * FROM studies")).all())
        assert "patient name" not in dump
    assert "disagreement" in client.get("/worklist?status=disagree").text
    assert "No studies" in client.get("/worklist?status=pending").text


def test_upload_rejections(web):
    client, _, _ = web
    login(client)
    r = upload(client, [("a.png", png_bytes()), ("notes.txt", b"hello, not an image"), ("bomb.png", bomb_png()),
                        ("empty.png", b"")])
    assert r.status_code == 200
    assert "rejected: file 2: not a PNG, JPEG or DICOM file" in r.text
    assert "file 3: image too large" in r.text
    assert "file 1: image too large (9000x9000" in upload(client, [("b.png", bomb_png(9000, 9000))]).text
    assert "file 4: empty file" in r.text
    assert r.text.count('href="/studies/') == 1


def test_api_token_predict_feedback_and_problems(web):
    client, sessions, _ = web
    with sessions() as s:
        from lungcad.web.security import create_token

        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    h = {"Authorization": f"Bearer {token}"}
    r = client.post("/api/predict", files={"file": ("x.png", png_bytes(60), "image/png")}, headers=h)
    assert r.status_code == 201, r.text
    study = r.json()
    assert study["label"] == "normal" and abs(sum(study["probabilities"].values()) - 1) < 1e-6
    r = client.post("/api/predict", files={"file": ("x.png", b"GIF89a....", "image/png")}, headers=h)
    assert r.status_code == 422 and "not a PNG, JPEG or DICOM" in r.json()["detail"]
    body = {"study_id": study["id"], "agree": True, "label": "normal", "confidence": 5}
    r = client.post("/api/feedback", json=body, headers=h)
    assert r.status_code == 201 and r.json()["agree"] is True and r.json()["id"] > 0
    r = client.post("/api/feedback", json={**body, "label": "cat"}, headers=h)
    assert r.status_code == 422 and "label must be one of" in r.json()["detail"]
    r = client.post("/api/feedback", json={**body, "confidence": 9}, headers=h)
    assert r.status_code == 422 and r.json()["title"] == "Invalid request"
    r = client.post("/api/feedback", json={**body, "study_id": "nope"}, headers=h)
    assert r.status_code == 404
    listed = client.get("/api/studies?status=reviewed", headers=h).json()
    assert [s["id"] for s in listed] == [study["id"]] and listed[0]["feedback_count"] == 1
    assert client.get("/api/studies?status=disagree", headers=h).json() == []
    schema = client.get("/openapi.json", headers=h).json()
    assert {"/health", "/api/predict", "/api/feedback", "/api/studies"} <= set(schema["paths"])
    # /docs: Swagger UI served by the app itself (offline), started by a script file (the CSP allows no inline one)
    docs = client.get("/docs", headers=h)
    assert docs.status_code == 200 and "/static/viewer/swagger-ui-bundle.js" in docs.text and "<script>" not in docs.text
    assert '"/openapi.json"' in client.get("/static/api-docs.js").text
    # cookie-authenticated API calls need the CSRF header (a foreign page cannot forge them)
    client.headers.pop("Authorization", None)
    login(client)
    r = client.post("/api/feedback", json=body)
    assert r.status_code == 403


def test_dicom_is_deidentified_before_storage(web, caplog):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    client, sessions, data = web
    path = get_testdata_file("CT_small.dcm")
    original = pydicom.dcmread(path)
    phi = [str(original.PatientName), str(original.PatientID), str(original.StudyInstanceUID),
           str(original.InstitutionName)]
    login(client)
    caplog.set_level("DEBUG")
    r = upload(client, [("ct.dcm", Path(path).read_bytes())])
    assert r.status_code == 303, r.text
    stored = list((data / "dicom").glob("*.dcm"))
    assert len(stored) == 1
    ds = pydicom.dcmread(stored[0])
    assert ds.PatientName == "ANONYMOUS" and ds.PatientIdentityRemoved == "YES"
    assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
    assert ds.StudyInstanceUID.startswith("2.25.") and ds.pixel_array.shape == original.pixel_array.shape
    raw_store = stored[0].read_bytes()
    with sessions() as s:
        dump = " ".join(str(r) for t in ("studies", "audit_log") for r in s.execute(text(f"SELECT * FROM {t}")).all())
    for value in phi:
        assert value.encode() not in raw_store
        assert value not in dump
        assert value not in caplog.text
    assert "DICOM" in client.get(r.headers["location"]).text


def test_audit_log_is_append_only(web):
    client, sessions, _ = web
    login(client)
    with sessions() as s:
        ev = s.scalar(select(AuditEvent))
        ev.action = "forged"
        with pytest.raises(PermissionError):
            s.commit()
    with sessions() as s, pytest.raises(Exception, match="append-only"):
        s.execute(text("DELETE FROM audit_log"))
        s.commit()


def test_dashboard_admin_only_with_csv_export(web):
    client, sessions, data = web
    login(client)
    study_url = upload(client, [("a.png", png_bytes(220))]).headers["location"]
    page = client.get(study_url).text
    client.post(f"{study_url}/read", data={"stage": "aided", "label": "malignant", "confidence": "5",
                                           "comment": "=cmd|' /C calc'!A0", "csrf_token": csrf_of(page)})
    assert client.get("/dashboard").status_code == 403
    assert client.get("/audit").status_code == 403
    client.cookies.clear()
    login(client, "root")
    dash = client.get("/dashboard").text
    assert 'id="agreement">100 %' in dash and "cmd|" in dash
    r = client.get("/dashboard/feedback.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 1 and rows[0]["clinician_label"] == "malignant" and rows[0]["agree"] == "1"
    assert rows[0]["comment"].startswith("'=")  # spreadsheet formula injection neutralised
    audit_page = client.get("/audit").text
    for action in ("login", "upload", "prediction", "read", "export", "user_add"):
        assert f"<td>{action}</td>" in audit_page
    assert "Training data" in client.get("/model").text
    assert client.get("/model/report.html").status_code == 404
    run = data.parent / "run"
    run.mkdir()
    (run / "report.html").write_text("<html><body><h1>Evaluation report</h1></body></html>")
    assert 'id="report-link"' in client.get("/model").text
    r = client.get("/model/report.html")
    assert "Evaluation report" in r.text and "sandbox" in r.headers["content-security-policy"]


def test_model_page_lists_the_latest_site_check(web):
    client, _, data = web
    login(client)
    assert "No site checks" in client.get("/model").text
    run = data.parent / "run"
    for folder, date, verdict, share in (("check-st-marys", "2025-03-01T10:00:00+00:00", "does not match", 0.31),
                                         ("check-st-marys-2", "2025-04-01T10:00:00+00:00", "matches", 0.02)):
        (run / folder).mkdir(parents=True)
        (run / folder / "check.json").write_text(json.dumps({
            "site": "st-marys", "date": date, "verdict": verdict, "images": 120, "flagged": {"share": share},
            "shift": {"tested": True, "p_value": 0.4321}, "reasons": []}))
    page = client.get("/model").text
    section = page[page.index('id="site-checks"'):]
    section = section[:section.index("</section>")]
    assert "st-marys" in section and "2025-04-01T10:00:00+00:00" in section and "2.0 %" in section
    assert "0.432" in section and ">matches<" in section
    assert "does not match" not in section  # the older check of the same site is not listed


def test_users_cli(tmp_path, capsys):
    data = str(tmp_path / "d")
    assert main(["users", "add", "bob", "--role", "clinician", "--password", PASSWORD, "--data-dir", data]) == 0
    assert main(["users", "add", "bob", "--role", "clinician", "--password", PASSWORD, "--data-dir", data]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["users", "add", "eve", "--role", "admin", "--password", "short", "--data-dir", data]) == 1
    assert "password too short" in capsys.readouterr().err
    assert main(["users", "token", "bob", "--data-dir", data]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("lcd_")
    _, sessions = open_database(None, data)
    with sessions() as s:
        from lungcad.web.security import user_for_token

        assert user_for_token(s, token).username == "bob"
        assert s.scalar(select(AuditEvent).where(AuditEvent.action == "user_add")).target == "bob"


def test_migrations_match_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from lungcad.web.db import Base

    engine, _ = open_database(None, tmp_path)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_errors_are_friendly_pages(tmp_path):
    data = tmp_path / "d"
    _, sessions = open_database(None, data)
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        s.commit()
    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor(fail=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        login(client)
        r = upload(client, [("a.png", png_bytes())])
        assert r.status_code == 500 and "Something went wrong" in r.text
        assert "Traceback" not in r.text and "secret internal detail" not in r.text
        r = client.get("/nope")
        assert r.status_code == 404 and "<html" in r.text
    assert not any((data / "images").iterdir())  # the failed upload left no image behind


def site_with_token(tmp_path: Path) -> tuple[Path, str]:
    """A fresh data folder with one clinician (alice) and an API token of hers."""
    from lungcad.web.security import create_token

    data = tmp_path / "d"
    _, sessions = open_database(None, data)
    with sessions() as s:
        token = create_token(s, add_user(s, "alice", PASSWORD, "clinician"))
        s.commit()
    return data, token


def test_upload_is_decoded_once_and_stores_what_the_model_saw(tmp_path):
    data, token = site_with_token(tmp_path)
    fake = FakePredictor()
    app = create_app(tmp_path / "run", data_dir=data, predictor=fake)
    with TestClient(app) as client:
        r = client.post("/api/predict", files={"file": ("x.png", png_bytes(90), "image/png")},
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201 and r.json()["feedback_count"] == 0
        stored = np.asarray(Image.open(data / "images" / f"{r.json()['key_image_id']}.png"))
    assert fake.decoded == 1 and len(fake.seen) == 1
    assert np.array_equal(stored, fake.seen[0])  # lossless: the stored image is exactly the model's input


def test_failed_commit_leaves_no_files(tmp_path):
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from lungcad.web.db import Image as ImageRow

    data, token = site_with_token(tmp_path)

    def database_down(session):
        if any(isinstance(obj, ImageRow) for obj in session.new):
            raise RuntimeError("disk full")

    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())
    event.listen(Session, "before_commit", database_down)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.post("/api/predict", files={"file": ("x.png", png_bytes(90), "image/png")},
                            headers={"Authorization": f"Bearer {token}"})
    finally:
        event.remove(Session, "before_commit", database_down)
    assert r.status_code == 500 and "disk full" not in r.text
    assert not any((data / "images").iterdir())  # no image without its study row


def test_revoked_tokens_and_deactivated_users_are_refused(web):
    client, sessions, _ = web
    from lungcad.web.db import ApiToken
    from lungcad.web.security import create_token

    with sessions() as s:
        alice = s.scalar(select(User).where(User.username == "alice"))
        root = s.scalar(select(User).where(User.username == "root"))
        revoked, inactive, good = create_token(s, alice), create_token(s, root), create_token(s, alice, "second")
        s.flush()
        s.scalars(select(ApiToken).order_by(ApiToken.id)).first().revoked = True
        root.active = False
        s.commit()
    for token, status in ((revoked, 401), (inactive, 401), (good, 200)):
        r = client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == status, token
    assert r.json() == {"username": "alice", "role": "clinician"}


def test_feedback_export_manifest(web, tmp_path, capsys):
    client, sessions, data = web
    login(client)
    urls = [upload(client, [(f"{i}.png", png_bytes(v))]).headers["location"] for i, v in enumerate((40, 210, 90))]
    labels = ["normal", "malignant", "benign"]
    for url, label in zip(urls, labels):
        page = client.get(url).text
        client.post(f"{url}/read", data={"stage": "aided", "label": label, "confidence": "3", "csrf_token": csrf_of(page)})
    # a second clinician contradicts the first on the third study: left out of the export
    client.cookies.clear()
    login(client, "root")
    page = client.get(urls[2]).text
    client.post(f"{urls[2]}/read", data={"stage": "aided", "label": "malignant", "confidence": "3", "csrf_token": csrf_of(page)})
    out = tmp_path / "export"
    assert main(["feedback", "export", "--out", str(out), "--data-dir", str(data), "--no-progress"]) == 0
    assert "1 with conflicting labels" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert list(rows[0]) == ["path", "label", "group", "feedback_id"]
    assert sorted(r["label"] for r in rows) == ["malignant", "normal"]
    with sessions() as s:
        ids = {f.id for f in s.scalars(select(Read))}
    for r in rows:
        assert r["path"].startswith(r["label"] + "/") and (out / r["path"]).is_file()
        assert int(r["feedback_id"]) in ids and len(r["group"]) == 24
        assert decode_image(out / r["path"]).shape == (48, 48)
    # refuses to overwrite
    assert main(["feedback", "export", "--out", str(out), "--data-dir", str(data), "--no-progress"]) == 1


def test_request_body_cap():
    from lungcad.web.app import LimitBody

    inner = FastAPI()

    @inner.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    with TestClient(LimitBody(inner, limit=1000)) as client:
        assert client.post("/echo", content=b"x" * 1000).json() == {"n": 1000}
        r = client.post("/echo", content=b"x" * 1001)
        assert r.status_code == 413 and r.json()["title"] == "Request too large"

        def chunks():  # no Content-Length: the streamed body is counted as it arrives
            for _ in range(5):
                yield b"x" * 400

        assert client.post("/echo", content=chunks()).status_code == 413
