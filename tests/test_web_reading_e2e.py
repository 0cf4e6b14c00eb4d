"""The reading pilot in a real browser (Playwright + Debian's chromium) against the app served by
uvicorn in this process, with test_web's fake predictor (no model, no training): a reader in
reading mode records an unaided read, sees the AI result, records the final read; the admin finds
both on the dashboard. Every page is checked for horizontal overflow at phone (375 px), tablet
(768 px) and desktop (1280 px) widths; screenshots are kept under pytest's tmp path (artifacts/).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sqlalchemy import select  # noqa: E402

from test_web import PASSWORD, FakePredictor, png_bytes, users_database  # noqa: E402

from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import Read, User  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDTHS = (375, 768, 1280)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live(tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (scripts/install-system-deps.sh installs it)")
    pytest.importorskip("playwright.sync_api")
    data = tmp_path / "webdata"
    sessions = users_database(data)
    with sessions() as s:
        s.scalar(select(User).where(User.username == "alice")).reading_mode = True
        s.commit()
    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}", sessions, tmp_path
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def sign_in(page, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#dropzone")


def check_widths(page, base: str, paths: list[str], shots: Path, tag: str) -> list[str]:
    """Every path at every width: (what overflowed) — empty when nothing is wider than the screen."""
    problems = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        for path in paths:
            page.goto(f"{base}{path}")
            scroll, client = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            if scroll > client:
                problems.append(f"{path} at {width} px: {scroll} > {client}")
            name = path.strip("/").replace("/", "_").replace("?", "_") or "start"
            page.screenshot(path=str(shots / f"{tag}-{name[:40]}-{width}.png"), full_page=True)
    return problems


@pytest.mark.slow
def test_reading_flow_and_dashboard_in_a_browser_at_three_widths(live):
    from playwright.sync_api import sync_playwright

    base, sessions, tmp = live
    shots = tmp / "artifacts"
    shots.mkdir()
    image = tmp / "slice.png"
    image.write_bytes(png_bytes(220))  # the fake predictor: malignant
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            sign_in(page, base, "alice")
            page.set_input_files("#files", str(image))
            page.click("#upload-button")
            page.wait_for_url("**/studies/*")
            study_path = page.url.split(base, 1)[1]
            # step 1: the AI result is not on the page
            assert page.locator("#ai-hidden").is_visible()
            assert page.locator("#result-headline").count() == 0 and page.locator("#heatmap").count() == 0
            assert page.locator("#series-1-headline").count() == 0 and page.locator(".strip, .keys").count() == 0
            assert "Calibrated probabilities" not in page.content()
            page.screenshot(path=str(shots / "reading-1-unaided.png"), full_page=True)
            page.check("#unaided-form input[name=label][value=benign]")
            page.check("#unaided-form input[name=confidence][value='3']")
            page.click("#unaided-form button[type=submit]")
            page.wait_for_selector("#read-saved")
            # step 2: revealed; the final decision
            assert page.inner_text("#result-headline").split(":")[0] == "malignant"  # the decision rule in words
            assert "benign" in page.inner_text("#unaided-summary")
            page.check("#aided-form input[name=label][value=malignant]")
            page.check("#aided-form input[name=confidence][value='4']")
            page.fill("#aided-form textarea[name=comment]", "AI pointed at the nodule")
            page.click("#aided-form button[type=submit]")
            page.wait_for_selector("#feedback-saved")
            assert "changed it from benign" in page.inner_text("#read-agreement")
            page.screenshot(path=str(shots / "reading-2-aided.png"), full_page=True)
            problems = check_widths(page, base, ["/", "/worklist", study_path, "/sus", "/account", "/model",
                                                 "/studies/no-such-study"], shots, "clinician")
            page.set_viewport_size({"width": 1280, "height": 900})
            page.click("button:has-text('Sign out')")
            page.wait_for_url("**/login")
            # the admin finds both reads on the dashboard
            sign_in(page, base, "root")
            page.goto(f"{base}/dashboard")
            assert page.inner_text("#feedback-count") == "1"
            assert page.inner_text("#changed-count") == "1/1"
            directions = page.inner_text("#directions")
            assert "benign\tmalignant\t1" in directions
            assert "AI pointed at the nodule" in page.inner_text("#comments")
            page.screenshot(path=str(shots / "reading-3-dashboard.png"), full_page=True)
            problems += check_widths(page, base, ["/dashboard", "/audit", "/users", "/dicom-outbox"], shots, "admin")
        finally:
            browser.close()
    assert problems == []
    with sessions() as s:
        read = s.scalar(select(Read))
        assert (read.unaided_label, read.final_label, read.revisions) == ("benign", "malignant", 2)
    assert len(list(shots.glob("*.png"))) == 3 + 3 * 11
