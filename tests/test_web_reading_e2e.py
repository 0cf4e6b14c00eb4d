"""The reading pilot in a real browser (Playwright + Debian's chromium) against the app served by
uvicorn in this process, with test_web's fake predictor (no model, no training): a reader in
reading mode records an unaided read, sees the AI result, records the final read; the admin finds
both on the dashboard. Every page is checked for horizontal overflow at phone (375 px), tablet
(768 px) and desktop (1280 px) widths; screenshots are kept under pytest's tmp path (artifacts/).
The whole workflow on a 5-slice DICOM series (conftest.ct_slice) runs through the Cornerstone3D
viewer: scrolling, window presets and dragging, the heatmap toggle (waits are selectors on the
viewer's data-* state: the page's CSP forbids eval, so wait_for_function cannot run).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sqlalchemy import func, select  # noqa: E402

from conftest import ct_slice  # noqa: E402
from test_web import PASSWORD, FakePredictor, png_bytes, users_database  # noqa: E402

from lungcad.web import viewer  # noqa: E402
from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import Image, Read, Series, Study, User  # noqa: E402

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


def save_final_read(page, label: str, comment: str, changed_from: str) -> None:
    """The aided (final) read on the exam page, saved; the page says it differs from the own read."""
    page.check(f"#aided-form input[name=label][value={label}]")
    page.check("#aided-form input[name=confidence][value='4']")
    page.fill("#aided-form textarea[name=comment]", comment)
    page.click("#aided-form button[type=submit]")
    page.wait_for_selector("#feedback-saved")
    assert f"changed it from {changed_from}" in page.inner_text("#read-agreement")


def admin_dashboard_shows_one_changed_read(page, base: str) -> None:
    """Signed in as the admin, the pilot dashboard counts the one final read, changed after the AI."""
    sign_in(page, base, "root")
    page.goto(f"{base}/dashboard")
    assert page.inner_text("#feedback-count") == "1"
    assert page.inner_text("#changed-count") == "1/1"


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
            save_final_read(page, "malignant", "AI pointed at the nodule", changed_from="benign")
            page.screenshot(path=str(shots / "reading-2-aided.png"), full_page=True)
            problems = check_widths(page, base, ["/", "/worklist", study_path, "/sus", "/account", "/model",
                                                 "/studies/no-such-study"], shots, "clinician")
            page.set_viewport_size({"width": 1280, "height": 900})
            page.click("button:has-text('Sign out')")
            page.wait_for_url("**/login")
            # the admin finds both reads on the dashboard
            admin_dashboard_shows_one_changed_read(page, base)
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


VIEWER = ".lungcad-viewer"


@pytest.mark.slow
def test_reading_a_five_slice_dicom_series_through_the_viewer(live):
    """Upload a 5-slice series through the upload page; reading mode hides the AI result (no result
    panel, no heatmap toggle, no heatmap request); scroll, window preset and drag; the unaided read
    reveals the result and the heatmap, which toggles off and on; the aided read; both on the dashboard."""
    from playwright.sync_api import sync_playwright
    from pydicom.uid import generate_uid

    if not viewer.bundle_built():
        pytest.skip("the viewer bundle is not built (make viewer)")
    base, sessions, tmp = live
    shots = tmp / "artifacts"
    shots.mkdir()
    folder = tmp / "series"
    folder.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(1, 6):
        files.append(folder / f"IM{i:04d}.dcm")
        files[-1].write_bytes(ct_slice(study_uid, series_uid, i))
    errors: list[str] = []
    failed: list[str] = []
    heat_requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
                    and not msg.text.startswith("Failed to load resource") else None)
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
                    and not r.url.endswith("/favicon.ico") else None)
            page.on("request", lambda r: heat_requests.append(r.url)
                    if "heatmap" in r.url or "overlay" in r.url else None)
            sign_in(page, base, "alice")
            page.set_input_files("#files", [str(f) for f in files])
            with page.expect_navigation():
                page.click("#upload-button")
            links = page.locator("table.list tbody a[href^='/studies/']")
            assert links.count() == 5  # one row per file, all in one exam
            assert len({links.nth(k).get_attribute("href") for k in range(5)}) == 1
            assert "open to read" in links.first.inner_text()  # reading mode: no label on the results page
            page.screenshot(path=str(shots / "series-0-uploaded.png"), full_page=True)
            links.first.click()
            page.wait_for_url("**/studies/*")
            exam_path = page.url.split(base, 1)[1]

            # before the unaided read: no AI result anywhere, the viewer without heatmap
            root = page.locator(VIEWER)
            page.wait_for_selector(f"{VIEWER}[data-state=ready]", timeout=30_000)
            assert page.locator("#ai-hidden").is_visible()
            assert page.locator(".result-panel").count() == 0 and page.locator(".strip, .keys").count() == 0
            assert "Calibrated probabilities" not in page.content()
            assert page.locator(".vw-check").is_hidden() and page.locator(".vw-legend").is_hidden()
            assert page.locator(".vw-slider").is_hidden()
            config = json.loads(page.locator("script.vw-config").text_content())
            assert len(config["frames"]) == 5 and all(f["heatmap"] is None for f in config["frames"])
            assert root.get_attribute("data-frames") == "5" and root.get_attribute("data-frame-index") == "0"
            assert root.get_attribute("data-heatmap") == "off"
            assert page.inner_text(".vw-frame") == "Slice 1 · 1 / 5"
            assert (root.get_attribute("data-level"), root.get_attribute("data-width")) == ("-600", "1500")

            # scroll with the keys (a click on the image focuses the viewport)
            box = page.locator(".vw-viewport").bounding_box()
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.click(cx, cy)
            page.keyboard.press("ArrowDown")
            page.wait_for_selector(f"{VIEWER}[data-frame-index='1']")
            page.keyboard.press("ArrowDown")
            page.wait_for_selector(f"{VIEWER}[data-frame-index='2']")
            page.keyboard.press("End")
            page.wait_for_selector(f"{VIEWER}[data-frame-index='4']")
            assert page.inner_text(".vw-frame") == "Slice 5 · 5 / 5"
            page.keyboard.press("ArrowDown")  # stays on the last
            page.keyboard.press("ArrowUp")
            page.wait_for_selector(f"{VIEWER}[data-frame-index='3']")

            # the window: a preset, then a drag
            page.click("button[data-preset=mediastinum]")
            page.wait_for_selector(f"{VIEWER}[data-level='40'][data-width='400']")
            assert page.locator("button[data-preset=mediastinum]").get_attribute("aria-pressed") == "true"
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx + 80, cy + 60, steps=8)
            page.mouse.up()
            page.wait_for_selector(f"{VIEWER}:not([data-level='40'][data-width='400'])")
            assert root.get_attribute("data-frame-index") == "3"  # dragging windows, it does not scroll
            page.screenshot(path=str(shots / "series-1-unaided.png"), full_page=True)
            assert heat_requests == [], heat_requests  # nothing of the AI result was fetched

            # the unaided read reveals the result
            page.check("#unaided-form input[name=label][value=normal]")
            page.check("#unaided-form input[name=confidence][value='2']")
            page.click("#unaided-form button[type=submit]")
            page.wait_for_selector("#read-saved")
            page.wait_for_selector(f"{VIEWER}[data-state=ready]", timeout=30_000)
            assert page.locator("#result-panel").is_visible() and page.locator("#series-1-panel").is_visible()
            ai_label = page.inner_text("#result-headline").split(":")[0]
            assert ai_label in ("benign", "malignant", "normal")
            assert page.locator("#strip-1 rect").count() == 5
            assert page.locator(".vw-check").is_visible() and page.locator(".vw-heat-toggle").is_checked()
            page.wait_for_selector(f"{VIEWER}[data-heatmap=on][data-heatmap-drawn='0']", timeout=30_000)
            assert "normal" in page.inner_text("#unaided-summary")
            page.uncheck(".vw-heat-toggle")
            page.wait_for_selector(f"{VIEWER}[data-heatmap=off]")
            page.screenshot(path=str(shots / "series-2-heatmap-off.png"), full_page=True)
            page.check(".vw-heat-toggle")
            page.wait_for_selector(f"{VIEWER}[data-heatmap=on]")
            page.locator(".vw-viewport").click()
            page.keyboard.press("ArrowDown")
            page.wait_for_selector(f"{VIEWER}[data-frame-index='1'][data-heatmap-drawn='1']")
            assert any("/heatmap.npy" in u for u in heat_requests)
            page.screenshot(path=str(shots / "series-3-heatmap-on.png"), full_page=True)

            # the aided read: a final decision other than the own read
            final = ai_label if ai_label != "normal" else "benign"
            save_final_read(page, final, "five slices, scrolled", changed_from="normal")
            page.screenshot(path=str(shots / "series-4-aided.png"), full_page=True)
            page.click("button:has-text('Sign out')")
            page.wait_for_url("**/login")

            # the admin finds both reads on the dashboard
            admin_dashboard_shows_one_changed_read(page, base)
            assert "1 reads with both the reader's own read and a final decision" in page.inner_text("#ai-effect")
            assert f"normal\t{final}\t1" in page.inner_text("#directions")
            assert "five slices, scrolled" in page.inner_text("#comments")
            page.screenshot(path=str(shots / "series-5-dashboard.png"), full_page=True)
            page.close()
        finally:
            browser.close()
    assert not errors, errors
    assert not failed, failed
    with sessions() as s:
        assert [s.scalar(select(func.count()).select_from(t)) for t in (Study, Series, Image)] == [1, 1, 5]
        read = s.scalar(select(Read))
        assert f"/studies/{read.study_id}" == exam_path
        assert (read.unaided_label, read.final_label, read.revisions) == ("normal", final, 2)
    assert len(list(shots.glob("*.png"))) == 6


@pytest.mark.slow
def test_api_documentation_renders_offline_in_a_browser(live):
    """/docs draws the API's operations from the app's own files: no request leaves the server and the
    Content-Security-Policy is not violated."""
    from playwright.sync_api import sync_playwright

    base, _, tmp = live
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, foreign = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
            sign_in(page, base, "alice")
            page.goto(f"{base}/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
            summaries = page.locator(".opblock-summary-path").all_inner_texts()
            assert "/api/predict" in " ".join(summaries) and "/api/uploads" in " ".join(summaries)
            page.screenshot(path=str(tmp / "api-docs.png"), full_page=True)
            assert not foreign, foreign
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()
