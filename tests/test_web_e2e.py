"""End to end: the real `lungcad serve` (uvicorn) with the real Predictor on a run trained at 64 px,
driven by a real browser (Playwright + Debian's chromium), on SQLite and on a real PostgreSQL
server that the test starts on loopback. Skips with a reason when chromium / PostgreSQL are absent
(scripts/install-system-deps.sh installs them).
"""

from __future__ import annotations

import base64
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from conftest import IQOTH, make_dataset  # noqa: E402

from lungcad.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "pilot-password-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ PostgreSQL on loopback

def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres_server():
    """A throw-away PostgreSQL cluster in a temp folder on 127.0.0.1:<free port>; yields a URL maker."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not installed (scripts/install-system-deps.sh installs Debian's postgresql)")
    psycopg = pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="lungcad-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the package's postgres account
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w",
                    "-t", "60", "start"], check=True, capture_output=True)
    admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    counter = iter(range(1000))

    def new_database() -> str:
        name = f"lungcad_{next(counter)}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ a real run and a real server
# (the run: conftest's session-scoped `trained_run`, ResNet-50 from random init, 1 epoch at 64 px)


def serve(run: Path, data_dir: Path, db: str | None = None):
    """Start `lungcad serve` on a free loopback port; returns (process, base URL) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lungcad", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir)] + (["--db", db] if db else [])
    log = open(data_dir.parent / f"serve-{port}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {(data_dir.parent / f'serve-{port}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise AssertionError("server did not become healthy in 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def ct_slice(tmp: Path) -> Path:
    """A CT slice from the shared IQ-OTH/NCCD data, or a synthetic one when that folder is absent."""
    found = sorted((IQOTH / "Malignant cases").glob("*.jpg")) if IQOTH.is_dir() else []
    if found:
        return found[0]
    src = make_dataset(tmp / "one", patients=1, slices=1, size=64)
    return next((src / "Malignant cases").glob("*.png"))


def browser_flow(base: str, image: Path, tag: str, comment: str) -> None:
    """Log in, drop a CT slice on the upload zone, read the result with its heatmap, give feedback,
    then find that feedback on the admin dashboard. Screenshots go to artifacts/."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/")
            assert "/login" in page.url
            page.fill("input[name=username]", "clinician1")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("#dropzone")
            # drag and drop: a real DataTransfer carrying the file, dropped on the zone
            b64 = base64.b64encode(image.read_bytes()).decode()
            page.evaluate(
                """([b64, name]) => {
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer();
                    dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
                    document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
                }""",
                [b64, image.name],
            )
            assert image.name in page.inner_text("#dz-list")
            page.click("#upload-button")
            page.wait_for_url("**/studies/*")
            headline = page.inner_text("#result-headline")  # the decision rule in words
            label = headline.split(":")[0]
            assert label in ("normal", "benign", "malignant")
            assert page.locator("#result-probabilities tr").count() == 3
            assert "Decision support only" in page.inner_text("#disclaimer")
            assert "threshold" in headline and "malignant" in headline
            # the viewer (tests/test_viewer.py tests it in detail) shows the image and the real model's
            # Grad-CAM heatmap (computed by the heatmap route with the real Predictor); its toggle hides it
            page.wait_for_selector(".lungcad-viewer[data-state=ready]", timeout=60_000)
            page.wait_for_selector(".lungcad-viewer[data-heatmap-drawn='0']", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / f"web-study-{tag}.png"), full_page=True)
            page.uncheck(".vw-heat-toggle")
            page.wait_for_selector(".lungcad-viewer[data-heatmap=off]")
            page.check(".vw-heat-toggle")
            # the read (the clinician is not in reading mode: the final decision only, nothing preselected)
            other = "normal" if label != "normal" else "benign"
            assert page.locator("#aided-form input:checked").count() == 0
            page.check(f"#aided-form input[name=label][value={other}]")
            page.check("#aided-form input[name=confidence][value='4']")
            page.fill("#aided-form textarea[name=comment]", comment)
            page.click("#aided-form button[type=submit]")
            page.wait_for_selector("#feedback-saved")
            assert comment in page.content() and "differs from" in page.inner_text("#read-agreement")
            # the admin finds it on the pilot dashboard
            page.click("button:has-text('Sign out')")
            page.wait_for_url("**/login")
            page.fill("input[name=username]", "admin1")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("#dropzone")
            page.goto(f"{base}/dashboard")
            assert page.inner_text("#feedback-count") == "1"
            assert page.inner_text("#agreement").startswith("0")
            assert comment in page.inner_text("#comments")
            page.screenshot(path=str(ARTIFACTS / f"web-dashboard-{tag}.png"), full_page=True)
            page.goto(f"{base}/worklist?status=disagree")
            assert page.locator("table.list tbody tr a").count() == 1
        finally:
            browser.close()


def _needs_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (scripts/install-system-deps.sh installs it)")
    pytest.importorskip("playwright.sync_api")


def _add_users(data_dir: Path, db: str | None) -> None:
    extra = ["--data-dir", str(data_dir)] + (["--db", db] if db else [])
    assert main(["users", "add", "clinician1", "--role", "clinician", "--password", PASSWORD, *extra]) == 0
    assert main(["users", "add", "admin1", "--role", "admin", "--password", PASSWORD, *extra]) == 0


@pytest.mark.smoke
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_browser_flow(backend, trained_run, tmp_path, request):
    _needs_chromium()
    db = request.getfixturevalue("postgres_server")() if backend == "postgresql" else None
    data_dir = tmp_path / "webdata"
    _add_users(data_dir, db)
    proc, base = serve(trained_run.run, data_dir, db)
    try:
        browser_flow(base, ct_slice(tmp_path), backend, f"browser check on {backend}: boundary unclear")
        # the feedback row is in the database the server used, with the model's sha
        from sqlalchemy import select

        from lungcad.web.db import Read, open_database

        _, sessions = open_database(db, data_dir)
        with sessions() as s:
            rows = list(s.scalars(select(Read)))
        contract_sha = (trained_run.run / "model.json").read_text()
        assert len(rows) == 1 and rows[0].model_sha256 and rows[0].model_sha256 in contract_sha
    finally:
        stop(proc)


@pytest.mark.slow
def test_postgres_api_flow_and_append_only_audit(postgres_server, tmp_path):
    """The httpx-level flow on PostgreSQL (fake predictor): migrations, feedback, triggers."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select, text

    from test_web import FakePredictor, png_bytes

    from lungcad.web.app import create_app
    from lungcad.web.db import AuditEvent, Read, open_database
    from lungcad.web.security import add_user, create_token

    db = postgres_server()
    _, sessions = open_database(db, tmp_path)
    with sessions() as s:
        token = create_token(s, add_user(s, "pg", PASSWORD, "clinician"))
        s.commit()
    app = create_app(tmp_path / "run", data_dir=tmp_path, db=db, predictor=FakePredictor())
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {token}"}
        study = client.post("/api/predict", files={"file": ("a.png", png_bytes(30), "image/png")}, headers=h).json()
        r = client.post("/api/feedback", headers=h, json={"study_id": study["id"], "agree": True,
                                                          "label": study["label"], "confidence": 2})
        assert r.status_code == 201
        r = client.post("/api/feedback", headers=h, json={"study_id": study["id"], "agree": True,
                                                          "label": study["label"], "confidence": 3})
        assert r.status_code == 200 and r.json()["revisions"] == 2  # the same read, revised
        assert client.get("/api/studies?status=reviewed", headers=h).json()[0]["id"] == study["id"]
    with sessions() as s:
        assert [r.study_id for r in s.scalars(select(Read))] == [study["id"]]
        assert {"upload", "prediction", "read"} <= set(s.scalars(select(AuditEvent.action)))
    with sessions() as s, pytest.raises(Exception, match="append-only"):
        s.execute(text("UPDATE audit_log SET action = 'forged'"))
        s.commit()
    with sessions() as s, pytest.raises(Exception, match="append-only"):
        s.execute(text("UPDATE read_revisions SET label = 'forged'"))
        s.commit()


@pytest.mark.slow
def test_reads_migration_of_old_feedback_on_postgresql(postgres_server, tmp_path):
    from test_web_reading import check_feedback_migration

    check_feedback_migration(postgres_server(), tmp_path)
