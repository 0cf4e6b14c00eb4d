"""The image viewer: its data routes (pixel values in HU or grey, the heatmap on the image's own rows and
columns, authentication, audit) through httpx, and the viewer itself (Cornerstone3D bundle) in Debian's
Chromium through Playwright: drawing, window presets and dragging, zoom and pan, scrolling through several
frames with the wheel and the keys, heatmap toggle and opacity, and no request leaving the server.

A fake predictor stands in for the model (test_web.FakePredictor); screenshots go to pytest's tmp_path.
"""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi import Request  # noqa: E402
from fastapi.responses import HTMLResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select  # noqa: E402

from test_web import PASSWORD, FakeExplanation, FakePredictor, login, png_bytes, upload, users_database  # noqa: E402

from lungcad.data.transforms import Preprocessing, prepare, to_source_geometry  # noqa: E402
from lungcad.web import viewer  # noqa: E402
from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import AuditEvent, Study  # noqa: E402
from lungcad.web.db import Image as ImageRow  # noqa: E402
from lungcad.web.deps import DB, CurrentUser, get_study  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]


def ct_small() -> tuple[bytes, np.ndarray]:
    """pydicom's CT test slice and its Hounsfield units (stored values through the modality rescale)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return Path(path).read_bytes(), hu


class GeometryPredictor(FakePredictor):
    """Grad-CAM stand-in whose map is known: the model's input itself (crop, pad, resize of the contract),
    sharpened, so its peak is where the image's brightest spot lands in the model's square."""

    def __init__(self):
        super().__init__()
        self.contract.preprocessing = Preprocessing(image_size=64)  # foreground-square geometry

    def explain(self, data, target=None):
        px, _ = self.load_pixels(data)
        square = prepare(px, self.contract.preprocessing)[0].numpy().astype(np.float32) / 255
        return FakeExplanation(square ** 8, np.zeros((64, 64, 3), np.uint8), square)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def study_ids(sessions) -> list[str]:
    with sessions() as s:
        return [st.id for st in s.scalars(select(Study).order_by(Study.created_at, Study.id))]


@pytest.fixture
def web(tmp_path):
    data = tmp_path / "webdata"
    sessions = users_database(data)
    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())
    with TestClient(app) as client:
        yield client, sessions, data


# ------------------------------------------------------------------------------------- routes


def test_pixels_are_hounsfield_units_for_dicom_and_need_a_login(web):
    client, sessions, _ = web
    raw, hu = ct_small()
    login(client)
    r = upload(client, [("ct.dcm", raw)])
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    client.cookies.clear()  # signed out: no pixels, no heatmap
    for suffix in ("pixels.npy", "heatmap.npy"):
        assert client.get(f"{url}/{suffix}", follow_redirects=False).status_code in (303, 401)
    login(client)
    r = client.get(f"{url}/pixels.npy")
    assert r.status_code == 200 and r.headers["x-lungcad-unit"] == "HU"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.int16 and arr.shape == hu.shape == (128, 128)
    assert np.array_equal(arr, hu)  # real HU, not a re-window of the 8-bit PNG
    assert arr.min() < 0 < arr.max()
    assert client.get("/studies/nope/pixels.npy").status_code == 404
    with sessions() as s:
        views = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "study_view")))
    assert any(v.detail.get("part") == "pixels" and v.target == url.rsplit("/", 1)[1] for v in views)
    # the page: HU presets, the training window first, the frame list of one (the series' one image,
    # on the per-image routes, which give the same data)
    page = client.get(url).text
    with sessions() as s:
        (image_id,) = s.scalars(select(ImageRow.id).where(ImageRow.study_id == url.rsplit("/", 1)[1]))
    for needle in ('class="lungcad-viewer"', "Model window -600/1500", "Lung", "Mediastinum", "Hounsfield",
                   f"/images/{image_id}/pixels.npy", f"/images/{image_id}/heatmap.npy"):
        assert needle in page
    assert client.get(f"/images/{image_id}/pixels.npy").content == r.content
    assert client.get("/images/nope/pixels.npy").status_code == 404
    client.cookies.clear()
    for suffix in ("pixels.npy", "heatmap.npy"):
        assert client.get(f"/images/{image_id}/{suffix}", follow_redirects=False).status_code in (303, 401)


def test_pixels_are_grey_levels_for_png_and_the_heatmap_has_their_geometry(web):
    client, _, data = web
    login(client)
    r = upload(client, [("a.png", png_bytes(150, size=72))])
    url = r.headers["location"]
    arr = np.load(io.BytesIO(client.get(f"{url}/pixels.npy").content), allow_pickle=False)
    stored = np.asarray(Image.open(next((data / "images").glob("*.png"))))
    assert arr.dtype == np.uint8 and np.array_equal(arr, stored)
    heat = np.load(io.BytesIO(client.get(f"{url}/heatmap.npy").content), allow_pickle=False)
    assert heat.dtype == np.uint8 and heat.shape == arr.shape == (72, 72)
    assert "window/level acts on its grey levels" in client.get(url).text
    assert list((data / "explain").glob("*_heatmap.npy"))  # computed once, then served from the cache


def test_heatmap_peak_lands_on_the_source_pixel(tmp_path):
    """An off-centre, non-square frame with a body to crop and one bright spot: the model sees a cropped,
    padded, resized square; the route's heatmap must peak back on the spot and be empty outside the body."""
    rows, cols, spot = 90, 150, (52, 118)
    img = np.zeros((rows, cols), np.uint8)
    img[20:81, 30:141] = 70  # the body: the contract crops to it
    yy, xx = np.mgrid[:rows, :cols]
    img[(yy - spot[0]) ** 2 + (xx - spot[1]) ** 2 <= 9] = 250
    data = tmp_path / "webdata"
    users_database(data)
    predictor = GeometryPredictor()
    app = create_app(tmp_path / "run", data_dir=data, predictor=predictor)
    with TestClient(app) as client:
        login(client)
        url = upload(client, [("spot.png", png(img))]).headers["location"]
        heat = np.load(io.BytesIO(client.get(f"{url}/heatmap.npy").content), allow_pickle=False)
    assert heat.shape == (rows, cols)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert abs(peak[0] - spot[0]) <= 1 and abs(peak[1] - spot[1]) <= 1, peak
    assert heat[:20].max() == 0 and heat[81:].max() == 0 and heat[:, :30].max() == 0 and heat[:, 141:].max() == 0
    # and it is exactly the contract's inverse geometry of the explanation, quantised to uint8
    exp = predictor.explain(png(img))
    expected = np.round(to_source_geometry(exp.heatmap, img, predictor.contract.preprocessing).clip(0, 1) * 255)
    assert np.array_equal(heat, expected.astype(np.uint8))


def test_presets_follow_the_unit_and_the_contract_window():
    from types import SimpleNamespace as NS

    pp = Preprocessing().with_window("195,480")
    store = NS(predictor=NS(pp=pp, contract=NS(preprocessing=pp)))
    hu = viewer.presets(store, "HU")
    assert [(p["key"], p["level"], p["width"]) for p in hu] == [
        ("model", 195, 480), ("lung", -600, 1500), ("mediastinum", 40, 400)]
    assert "declared at training" in hu[0]["title"]
    assert [p["width"] for p in viewer.presets(store, "grey")] == [255]
    assert [p["width"] for p in viewer.presets(store, "value")] == [None]  # not CT: the image's own range
    dicom = NS(dicom_file="dicom/x.dcm", dicom_meta={"modality": "MR"})
    assert viewer.unit_of(dicom) == "value" and viewer.unit_of(NS(dicom_file=None, dicom_meta={})) == "grey"
    assert viewer.unit_of(NS(dicom_file="d", dicom_meta={"modality": "CT"})) == "HU"


def test_missing_bundle_gives_a_message_not_a_blank_box(web, monkeypatch):
    client, _, _ = web
    monkeypatch.setattr(viewer, "BUNDLE", Path("/nonexistent/viewer.js"))
    login(client)
    url = upload(client, [("a.png", png_bytes(90))]).headers["location"]
    page = client.get(url).text
    assert "The image viewer is not installed" in page and "make install" in page
    # the 8-bit image instead: the stored PNG of the series' (first) image
    assert "/static/viewer/viewer.js" not in page
    assert re.search(r'<img src="/images/[0-9a-f]+\.png" alt="stored image \(8-bit\)">', page)


# ------------------------------------------------------------------------------------- browser


class Server:
    """The app under uvicorn on a loopback port, in a thread (the fake predictor: no model needed)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def add_frames_page(app) -> None:
    """Test-only page: the viewer over several studies (`?ids=a,b,c`), as a series will be shown.
    (Module-level DB/CurrentUser: FastAPI resolves these string annotations in this module's globals.)"""
    def frames(request: Request, session: DB, user: CurrentUser, ids: str) -> HTMLResponse:
        studies = [get_study(session, i) for i in ids.split(",")]
        template = request.app.state.templates.env.from_string(
            '{% extends "base.html" %}{% block content %}{% include "_viewer.html" %}{% endblock %}')
        ctx = {"request": request, "user": user, "csrf": "", "viewer": viewer.viewer_config(
            request, studies, [f"Slice {k}" for k in range(1, len(studies) + 1)])}
        return HTMLResponse(template.render(ctx))

    app.add_api_route("/test-frames", frames, methods=["GET"], include_in_schema=False)


def stage_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(".vw-stage").screenshot())).convert("RGB"), dtype=np.int16)


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the stage's pixels that changed noticeably."""
    return float((np.abs(a - b).max(axis=2) > 8).mean())


@pytest.fixture
def browser_page(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (scripts/install-system-deps.sh installs it)")
    if not viewer.bundle_built():
        if shutil.which("npm"):
            pytest.fail("the viewer bundle is missing: make install builds it (cd web/viewer && npm ci && npm run build)")
        pytest.skip("the viewer bundle is not built and npm is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            yield page
        finally:
            browser.close()


@pytest.mark.slow
def test_viewer_in_chromium(browser_page, tmp_path):
    # The page's CSP forbids eval: waits are selectors on the viewer's data-* state, not wait_for_function.
    page = browser_page
    data = tmp_path / "webdata"
    sessions = users_database(data)
    app = create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())
    add_frames_page(app)
    raw, _ = ct_small()
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # console errors, except the browser's own line for a failed request: those are checked by URL below
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
            and not msg.text.startswith("Failed to load resource") else None)
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
            and not r.url.endswith("/favicon.ico") else None)
    with Server(app) as base:
        # offline: any request to another origin is recorded and refused
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                   else (outside.append(route.request.url), route.abort()))
        page.goto(f"{base}/login")
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#dropzone")
        with httpx.Client(base_url=base) as client:  # uploads through the running server
            login(client)
            dicom_url = upload(client, [("ct.dcm", raw)]).headers["location"]
            for value in (60, 130, 200):
                upload(client, [(f"{value}.png", png_bytes(value, size=96))])
        ids = study_ids(sessions)

        # one DICOM study: the viewer draws HU at the model's window, with the heatmap over it
        page.goto(f"{base}{dicom_url}")
        root = page.locator(".lungcad-viewer")
        page.wait_for_selector(".lungcad-viewer[data-state=ready]", timeout=30_000)
        page.wait_for_selector(".lungcad-viewer[data-heatmap-drawn='0']", timeout=30_000)
        assert root.get_attribute("data-level") == "-600" and root.get_attribute("data-width") == "1500"
        page.screenshot(path=str(tmp_path / "viewer-study.png"), full_page=True)
        first = stage_pixels(page)
        assert (first.max(axis=2) > 30).mean() > 0.2, "the viewer drew (almost) nothing"

        page.click("button[data-preset=mediastinum]")
        page.wait_for_selector(".lungcad-viewer[data-width='400']")
        mediastinum = stage_pixels(page)
        assert changed(first, mediastinum) > 0.05
        page.locator(".vw-stage").screenshot(path=str(tmp_path / "viewer-mediastinum.png"))

        # dragging with the left button changes the window
        box = page.locator(".vw-viewport").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        before = (root.get_attribute("data-level"), root.get_attribute("data-width"))
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 80, cy + 60, steps=8)
        page.mouse.up()
        after = (root.get_attribute("data-level"), root.get_attribute("data-width"))
        assert after != before, "dragging did not change the window"

        # zoom (right button drag) and pan (shift + drag) move the camera; the heatmap follows
        zoom = page.evaluate("document.querySelector('.lungcad-viewer').lungcadViewer.viewport.getZoom()")
        page.mouse.move(cx, cy)
        page.mouse.down(button="right")
        page.mouse.move(cx, cy - 120, steps=8)
        page.mouse.up(button="right")
        zoomed = page.evaluate("document.querySelector('.lungcad-viewer').lungcadViewer.viewport.getZoom()")
        assert abs(zoomed - zoom) > 0.05, (zoom, zoomed)
        pan = page.evaluate("document.querySelector('.lungcad-viewer').lungcadViewer.viewport.getPan()")
        page.keyboard.down("Shift")
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 70, cy + 30, steps=8)
        page.mouse.up()
        page.keyboard.up("Shift")
        panned = page.evaluate("document.querySelector('.lungcad-viewer').lungcadViewer.viewport.getPan()")
        assert panned != pan
        page.locator(".vw-stage").screenshot(path=str(tmp_path / "viewer-zoom-pan.png"))

        # heatmap: off, on, opacity
        page.click("button[data-preset=lung]")
        page.click(".vw-reset")
        page.wait_for_timeout(200)
        with_heat = stage_pixels(page)
        page.uncheck(".vw-heat-toggle")
        page.wait_for_selector(".lungcad-viewer[data-heatmap=off]")
        page.wait_for_timeout(200)
        without = stage_pixels(page)
        assert changed(with_heat, without) > 0.05
        page.check(".vw-heat-toggle")
        page.locator(".vw-opacity").evaluate(
            "el => { el.value = 90; el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_selector(".vw-opacity-value:text-is('90 %')")
        page.wait_for_timeout(200)
        strong = stage_pixels(page)
        assert changed(with_heat, strong) > 0.05
        page.locator(".vw-stage").screenshot(path=str(tmp_path / "viewer-heatmap-90.png"))

        # several frames: wheel, arrow keys, PageUp/PageDown, Home/End
        pngs = [i for i in ids if f"/studies/{i}" != dicom_url]
        page.goto(f"{base}/test-frames?ids={','.join(pngs)}")
        page.wait_for_selector(".lungcad-viewer[data-state=ready]", timeout=30_000)
        index = lambda: int(root.get_attribute("data-frame-index"))  # noqa: E731
        assert index() == 0 and "Slice 1 · 1 / 3" in page.inner_text(".vw-frame")
        assert "grey levels" in page.inner_text(".vw-note")
        frame0 = stage_pixels(page)
        box = page.locator(".vw-viewport").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, 120)
        page.wait_for_selector(".lungcad-viewer[data-frame-index='1']")
        page.wait_for_selector(".lungcad-viewer[data-heatmap-drawn='1']")
        assert changed(frame0, stage_pixels(page)) > 0.05  # another image is shown
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # focuses the viewport
        page.keyboard.press("ArrowDown")
        page.wait_for_selector(".lungcad-viewer[data-frame-index='2']")
        assert "Slice 3 · 3 / 3" in page.inner_text(".vw-frame")
        page.keyboard.press("ArrowDown")  # stays on the last
        page.keyboard.press("PageUp")
        page.wait_for_selector(".lungcad-viewer[data-frame-index='0']")
        page.keyboard.press("End")
        page.wait_for_selector(".lungcad-viewer[data-frame-index='2']")
        page.keyboard.press("ArrowUp")
        page.wait_for_selector(".lungcad-viewer[data-frame-index='1']")
        page.mouse.wheel(0, -120)
        page.wait_for_selector(".lungcad-viewer[data-frame-index='0']")
        page.screenshot(path=str(tmp_path / "viewer-frames.png"), full_page=True)
        page.close()  # its keep-alive connections, before the server stops
    assert not outside, f"requests left the server: {outside}"
    assert not errors, errors
    assert not failed, failed
