"""Exams, series and images in the web app (issue 13): grouping by Study/Series UID, multi-file, folder
and zip uploads, idempotency, the 0005 migration of old rows, modality refusal, the result panel's
wording and threshold, identifiers kept out of everything that leaves the system, and timestamps.

test_web's fake predictor stands in for the model (brightness decides the class); DICOM slices are
pydicom's CT_small.dcm with distinct UIDs.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

pytest.importorskip("fastapi")
pydicom = pytest.importorskip("pydicom")

from fastapi.testclient import TestClient  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from conftest import ACCESSION, PATIENT, ct_slice  # noqa: E402
from test_web import (  # noqa: E402
    FakePrediction,
    FakePredictor,
    csrf_of,
    login,
    png_bytes,
    users_database,
)

from lungcad.cli import main  # noqa: E402
from lungcad.web.db import AuditEvent, Image, Series, Study, User, make_db_engine, open_database  # noqa: E402
from lungcad.web.migrate import upgrade_database  # noqa: E402
from lungcad.web.security import create_token  # noqa: E402

CASE = "Jane Doe left lung"
ISO_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?\+00:00$")


def colour_png() -> bytes:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    arr[..., 0] = 250  # strongly coloured
    buf = io.BytesIO()
    PILImage.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def site(tmp_path: Path):
    """(browser client signed in as alice, API bearer headers, sessionmaker, data folder)."""
    data = tmp_path / "webdata"
    sessions = users_database(data)
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    app = create_app_with(tmp_path, data, FakePredictor())
    with TestClient(app) as client:
        login(client)
        yield client, {"Authorization": f"Bearer {token}"}, sessions, data


def create_app_with(tmp_path: Path, data: Path, predictor):
    from lungcad.web.app import create_app

    return create_app(tmp_path / "run", data_dir=data, predictor=predictor)


def form_upload(client: TestClient, files: list[tuple[str, bytes]], case_label: str = ""):
    return client.post("/upload", data={"csrf_token": csrf_of(client.get("/").text), "case_label": case_label},
                       files=[("files", (n, raw, "application/octet-stream")) for n, raw in files],
                       follow_redirects=False)


def counts(sessions) -> tuple[int, int, int]:
    with sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Study, Series, Image))


# ------------------------------------------------------------------------------------ grouping


def test_several_dicom_files_are_grouped_by_study_and_series_uid(site):
    client, bearer, sessions, _ = site
    a, b = generate_uid(), generate_uid()
    a1, a2, b1 = generate_uid(), generate_uid(), generate_uid()
    files = ([(f"a1-{i}.dcm", ct_slice(a, a1, i)) for i in range(1, 5)] + [("a2-1.dcm", ct_slice(a, a2, 1)),
             ("a2-2.dcm", ct_slice(a, a2, 2))] + [("b1-1.dcm", ct_slice(b, b1, 1, accession="ACC-B"))])
    r = client.post("/api/uploads", files=[("files", (n, raw, "application/dicom")) for n, raw in files], headers=bearer)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["created"], body["existing"], body["rejected"]) == (7, 0, 0)
    assert counts(sessions) == (2, 3, 7)
    exams = {e["identifiers"]["study_uid"]: e for e in body["studies"]}
    assert set(exams) == {a, b}
    assert sorted(s["images_count"] for s in exams[a]["series"]) == [2, 4]
    assert exams[b]["identifiers"]["accession_number"] == "ACC-B"
    # the series result is lungcad predict's rule over the series' images (the one implementation)
    from lungcad.inference.results import Prediction, aggregate_series

    four = next(s for s in exams[a]["series"] if s["images_count"] == 4)
    detail = client.get(f"/api/series/{four['id']}", headers=bearer).json()
    preds = [Prediction(im["id"], im["probabilities"], im["label"], im["malignant_probability"], im["decision"],
                        im["ood"], im["ood_score"]) for im in detail["images"]]
    expected = aggregate_series("s", preds, ["normal", "benign", "malignant"], "multiclass", 0.5)
    assert detail["probabilities"] == pytest.approx(expected.probabilities)
    assert detail["label"] == expected.label and len(detail["key_images"]) == 3
    assert [im["instance_number"] for im in detail["images"]] == [1, 2, 3, 4]  # slice order
    assert [s["image_id"] for s in detail["slice_scores"]] == [im["id"] for im in detail["images"]]
    # the exam's result is its most suspicious series', through exam_result
    top = max(exams[a]["series"], key=lambda s: s["malignant_probability"])
    assert exams[a]["result_series_id"] == top["id"] and exams[a]["malignant_probability"] == top["malignant_probability"]
    page = client.get(exams[a]["url"]).text
    assert 'id="series-1"' in page and 'id="series-2"' in page and 'id="strip-' in page and "Key slices" in page


def test_zip_and_folder_uploads_with_a_bad_member(site):
    client, _, sessions, _ = site
    study, series = generate_uid(), generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(1, 4):
            zf.writestr(f"export/IM{i:04d}", ct_slice(study, series, i))
        zf.writestr("export/readme.txt", b"not an image")
        zf.writestr("__MACOSX/export/._IM0001", b"resource fork")
        zf.writestr("export/sub/", b"")
    r = form_upload(client, [("series.zip", buf.getvalue())])
    assert r.status_code == 200
    rows = r.text.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert len(rows) == 4  # three slices and the text file; the resource fork and the folder are skipped
    assert sum("/studies/" in row for row in rows) == 3
    assert "series.zip/export/readme.txt" in rows[3] and "rejected: file 1, member 4: not a PNG, JPEG or DICOM" in rows[3]
    assert counts(sessions) == (1, 1, 3)
    # a folder (webkitdirectory sends each file with its relative path) joins the same exam and series
    r = form_upload(client, [(f"export/IM{i:04d}", ct_slice(study, series, i)) for i in (4, 5)])
    assert r.status_code == 200 and counts(sessions) == (1, 1, 5)


def test_a_series_over_the_old_50_file_limit_is_one_exam(site):
    client, bearer, sessions, _ = site
    study, series = generate_uid(), generate_uid()
    files = [("files", (f"{i}.dcm", ct_slice(study, series, i), "application/dicom")) for i in range(1, 61)]
    r = client.post("/api/uploads", files=files, headers=bearer)
    assert r.status_code == 201 and r.json()["created"] == 60
    assert counts(sessions) == (1, 1, 60)
    (exam,) = r.json()["studies"]
    assert exam["images_count"] == 60 and len(exam["series"][0]["slice_scores"]) == 60


@pytest.mark.slow  # 300 DICOM slices de-identified, decoded, scored and stored: ~30 s
def test_a_300_slice_series_in_one_zip_is_one_series(site):
    client, bearer, sessions, _ = site
    study, series = generate_uid(), generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(1, 301):
            zf.writestr(f"IM{i:04d}.dcm", ct_slice(study, series, i))
    r = client.post("/api/uploads", files={"files": ("ct.zip", buf.getvalue(), "application/zip")}, headers=bearer)
    assert r.status_code == 201 and r.json()["created"] == 300
    assert counts(sessions) == (1, 1, 300)
    (exam,) = r.json()["studies"]
    assert exam["series"][0]["images_count"] == 300 and len(exam["series"][0]["slice_scores"]) == 300


# ------------------------------------------------------------------------------------ idempotency


def test_same_sop_instance_twice_and_same_bytes_twice_store_one_image(site):
    client, bearer, sessions, data = site
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = ct_slice(study, series, 1, sop=sop)
    again = ct_slice(study, series, 1, sop=sop, bright=5)  # other bytes, the same SOP Instance UID
    assert first != again
    r1 = client.post("/api/predict", files={"file": ("a.dcm", first, "application/dicom")}, headers=bearer)
    assert r1.status_code == 201 and r1.headers["location"] == f"/api/studies/{r1.json()['id']}"
    r2 = client.post("/api/predict", files={"file": ("b.dcm", again, "application/dicom")}, headers=bearer)
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]  # the existing exam, not a new one
    png = png_bytes(70)
    r3 = client.post("/api/predict", files={"file": ("x.png", png, "image/png")}, headers=bearer)
    r4 = client.post("/api/predict", files={"file": ("y.png", png, "image/png")}, headers=bearer)
    assert (r3.status_code, r4.status_code) == (201, 200) and r3.json()["id"] == r4.json()["id"]
    assert counts(sessions) == (2, 2, 2)
    assert len(list((data / "images").iterdir())) == 2 and len(list((data / "dicom").iterdir())) == 1
    # the form says so too, and a batch reports each file's outcome
    r = client.post("/api/uploads", files=[("files", ("a.dcm", first, "application/dicom")),
                                           ("files", ("x.png", png, "image/png"))], headers=bearer)
    assert r.status_code == 200 and [f["status"] for f in r.json()["files"]] == ["existing", "existing"]
    assert "already stored" in form_upload(client, [("a.dcm", first), ("x.png", png)]).text
    assert counts(sessions) == (2, 2, 2)


# ------------------------------------------------------------------------------------ modality


def test_other_modalities_and_colour_images_are_refused_with_the_reason(site):
    client, bearer, sessions, data = site
    mr = ct_slice(generate_uid(), generate_uid(), 1, modality="MR")
    r = client.post("/api/predict", files={"file": ("mr.dcm", mr, "application/dicom")}, headers=bearer)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert "modality MR does not match the model (CT)" in r.json()["detail"]
    unlabelled = ct_slice(generate_uid(), generate_uid(), 1, modality="")  # an empty Modality
    r = client.post("/api/predict", files={"file": ("nomod.dcm", unlabelled, "application/dicom")}, headers=bearer)
    assert r.status_code == 422 and "DICOM without a Modality: cannot tell it is CT" in r.json()["detail"]
    r = client.post("/api/predict", files={"file": ("photo.png", colour_png(), "image/png")}, headers=bearer)
    assert r.status_code == 422 and "colour image" in r.json()["detail"] and "greyscale CT model" in r.json()["detail"]
    r = client.post("/api/uploads", files=[("files", ("mr.dcm", mr, "application/dicom"))], headers=bearer)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert [(f["status"], "modality MR" in f["error"]) for f in r.json()["files"]] == [("rejected", True)]
    r = form_upload(client, [("mr.dcm", mr), ("photo.png", colour_png()), ("ok.png", png_bytes(90))])
    rows = r.text.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert "rejected: file 1: modality MR does not match" in rows[0] and "rejected: file 2: colour image" in rows[1]
    assert "/studies/" in rows[2]
    assert counts(sessions) == (1, 1, 1) and len(list((data / "images").iterdir())) == 1  # never given CT classes
    with sessions() as s:
        reasons = [e.detail["reason"] for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_rejected"))]
    assert sum("modality MR" in x for x in reasons) == 3  # API, API batch, form


# ------------------------------------------------------------------------------------ result panel


class FixedPredictor(FakePredictor):
    """Fixed probabilities; operating threshold 0.42 chosen for 95 % sensitivity (as a trained contract says)."""

    def __init__(self, p_malignant: float):
        super().__init__()
        self.p = p_malignant
        self.contract.thresholds = {"malignant": 0.42}
        self.contract.training = {"operating_point": {"threshold": 0.42, "fitted_on": "validation",
                                                      "validation": {"target_sensitivity": 0.95}}}

    def predict_prepared(self, tensors, sources=None, pixels=None):
        rest = 1 - self.p
        probs = {"normal": rest * 0.4, "benign": rest * 0.6, "malignant": self.p}
        label = "malignant" if self.p >= 0.42 else "benign"
        return [FakePrediction("x", dict(probs), label, self.p, "malignant" if label == "malignant" else "not malignant",
                               ood=False, ood_score=0.1) for _ in tensors]


@pytest.mark.parametrize(("p", "headline"), [
    (0.40, "benign: p(malignant) 0.40 is below the operating threshold 0.42 chosen for 95 % sensitivity, "
           "and benign is the more probable of the other two (0.36 against normal 0.24)"),
    (0.4199, "benign: p(malignant) 0.4199 is below the operating threshold 0.4200 chosen"),  # never "0.42 < 0.42"
    (0.43, "malignant: p(malignant) 0.43 is at or above the operating threshold 0.42 chosen for 95 % sensitivity"),
])
def test_result_panel_says_the_decision_rule_in_words_and_draws_the_threshold(tmp_path, p, headline):
    data = tmp_path / "webdata"
    users_database(data)
    with TestClient(create_app_with(tmp_path, data, FixedPredictor(p))) as client:
        login(client)
        page = client.get(form_upload(client, [("a.png", png_bytes(100))]).headers["location"]).text
    panel = page[page.index('id="result-panel"'):]
    panel = panel[:panel.index("</table>")]
    assert headline in panel
    malignant_row = panel[panel.index("<th>malignant</th>"):]
    assert 'class="threshold"' in malignant_row and 'x1="42.00"' in malignant_row  # on the malignant bar
    assert panel.count('class="threshold"') == 1
    assert 'class="decision ok' not in page and "all clear" not in page.lower()  # no reassuring green box
    assert ("headline flag" in panel) == (p >= 0.42)


def test_out_of_distribution_reason_comes_first(site):
    client, _, _, _ = site
    page = client.get(form_upload(client, [("white.png", png_bytes(245))]).headers["location"]).text
    panel = page[page.index('id="result-panel"'):]
    assert panel.index('id="result-ood"') < panel.index('id="result-headline"')
    assert "Out of distribution" in panel


# ------------------------------------------------------------------------------------ identifiers


def test_identifiers_shown_to_clinicians_but_absent_from_exports_logs_audit_and_files(site, tmp_path, caplog):
    client, bearer, sessions, data = site
    caplog.set_level("DEBUG")
    study_uid = generate_uid()
    slices = [ct_slice(study_uid, generate_uid(), i) for i in (1, 2)]
    r = form_upload(client, [(f"{i}.dcm", raw) for i, raw in enumerate(slices, 1)])
    assert r.status_code == 200
    # kept for results sent to the PACS (exam_identifiers, image_identifiers), and shown or sent nowhere else
    headers = [pydicom.dcmread(io.BytesIO(raw)) for raw in slices]
    kept = [v for k, v in PATIENT.items() if k != "PatientSex"]  # "F" is no searchable secret
    kept += [str(ds.SOPInstanceUID) for ds in headers] + [str(ds.SeriesInstanceUID) for ds in headers]
    with sessions() as s:
        row = " ".join(map(str, s.execute(text("SELECT * FROM exam_identifiers WHERE study_uid = :u"),
                                          {"u": study_uid}).one()))
        images = " ".join(str(r) for r in s.execute(text("SELECT * FROM image_identifiers")).all())
    assert all(v in row for v in kept[:8]) and all(v in images for v in kept[8:])
    exam_url = re.search(r'href="(/studies/[0-9a-f]+)"', r.text).group(1)
    case_url = form_upload(client, [("slice.png", png_bytes(120))], case_label=CASE).headers["location"]
    worklist = client.get("/worklist").text
    for value in (ACCESSION, study_uid, CASE):
        assert value in worklist  # how the clinician finds the exam in the PACS
    assert ACCESSION in client.get(exam_url).text and CASE in client.get(case_url).text
    for url in (exam_url, case_url):
        page = client.get(url).text
        client.post(f"{url}/read", data={"stage": "aided", "label": "normal", "confidence": "3",
                                         "csrf_token": csrf_of(page)})
    # everything that leaves the system: the dashboard's CSV, the training-data export, audit rows, logs
    client.cookies.clear()
    login(client, "root")
    assert 'id="exams-flagged">' in client.get("/dashboard").text  # exam-level decisions via exam_result
    exported = client.get("/dashboard/feedback.csv").text
    out = tmp_path / "export"
    assert main(["feedback", "export", "--out", str(out), "--data-dir", str(data), "--no-progress"]) == 0
    manifest = (out / "manifest.csv").read_text()
    assert len(list(csv.DictReader(io.StringIO(manifest)))) == 2
    with sessions() as s:
        audit_rows = " ".join(str(r) for r in s.execute(text("SELECT * FROM audit_log")).all())
        image_rows = " ".join(str(r) for t in ("studies", "series", "images")
                              for r in s.execute(text(f"SELECT * FROM {t}")).all())
    stored = b"".join(p.read_bytes() for p in (data / "dicom").iterdir())
    exported_files = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert ACCESSION in client.get(exam_url).text  # an administrator sees the exam's identifiers ...
    page = client.get(exam_url).text
    assert not [v for v in kept if v in page]  # ... but not the identity kept for the PACS
    assert not [v for v in kept if v in client.get(f"/api/studies/{exam_url.rsplit('/', 1)[1]}").text]
    for value in (ACCESSION, study_uid, CASE, *kept):
        for where, haystack in (("csv", exported), ("manifest", manifest), ("audit", audit_rows),
                                ("exam tables", image_rows), ("log", caplog.text)):
            assert value not in haystack, (value, where)
        assert value.encode() not in stored and value.encode() not in exported_files


# ------------------------------------------------------------------------------------ API


def test_timestamps_carry_their_offset_and_pagination_is_bounded(site):
    client, bearer, _, _ = site
    r = client.post("/api/predict", files={"file": ("x.png", png_bytes(60), "image/png")}, headers=bearer)
    posted = r.json()
    exam = client.get(f"/api/studies/{posted['id']}", headers=bearer).json()
    series = client.get(f"/api/series/{exam['series'][0]['id']}", headers=bearer).json()
    image = client.get(f"/api/images/{series['images'][0]['id']}", headers=bearer).json()
    listed = client.get("/api/studies", headers=bearer).json()[0]
    fb = client.post("/api/feedback", json={"study_id": posted["id"], "agree": True, "label": "normal",
                                            "confidence": 3}, headers=bearer).json()
    stamps = [posted["created_at"], exam["created_at"], series["created_at"], image["created_at"],
              listed["created_at"], fb["created_at"], posted["series"][0]["created_at"]]
    assert all(ISO_OFFSET.match(t) for t in stamps), stamps
    assert posted["created_at"] == exam["created_at"] == listed["created_at"]  # POST and GET alike
    for query in ("limit=0", "limit=1001", "offset=-1", "limit=abc"):
        r = client.get(f"/api/studies?{query}", headers=bearer)
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), query
    schema = client.get("/openapi.json", headers=bearer).json()
    ok = schema["paths"]["/api/studies/{study_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/StudyOut"}
    assert {"StudyOut", "SeriesOut", "ImageOut", "UploadOut"} <= set(schema["components"]["schemas"])
    assert "200" in schema["paths"]["/api/predict"]["post"]["responses"]  # the idempotent answer is documented


# ------------------------------------------------------------------------------------ migration


def _old_rows(engine) -> None:
    """Two one-image studies as 0004 stored them, with feedback on one."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                          "VALUES (1, 'old', 'x', 'clinician', TRUE, '2025-01-01 00:00:00')"))
        for sid, p, kind, meta in (("a" * 24, 0.7, "png", "{}"), ("b" * 24, 0.2, "dicom", '{"modality": "CT"}')):
            conn.execute(text(
                "INSERT INTO studies (id, created_at, user_id, kind, input_sha256, group_key, image_file, dicom_file, "
                "width, height, label, decision, malignant_probability, probabilities, ood, ood_score, ood_reasons, "
                "error, model_sha256, dicom_meta) VALUES (:id, '2025-01-02 00:00:00', 1, :kind, :sha, 'g', :img, "
                ":dcm, 64, 48, :label, :dec, :p, :probs, FALSE, 0.1, '[]', '', :model, :meta)"),
                {"id": sid, "kind": kind, "sha": sid[0] * 64, "img": f"images/{sid}.png",
                 "dcm": f"dicom/{sid}.dcm" if kind == "dicom" else None,
                 "label": "malignant" if p > 0.5 else "normal", "dec": "malignant" if p > 0.5 else "not malignant",
                 "p": p, "probs": f'{{"normal": {1 - p}, "benign": 0.0, "malignant": {p}}}', "model": "m" * 64,
                 "meta": meta})
        conn.execute(text("INSERT INTO feedback (study_id, user_id, created_at, agree, label, confidence, comment, "
                          "model_label, model_sha256) VALUES (:s, 1, '2025-01-03 00:00:00', TRUE, 'malignant', "
                          "4, '', 'malignant', :m)"), {"s": "a" * 24, "m": "m" * 64})


def _check_migrated(sessions) -> None:
    from lungcad.web.service import exam_result

    with sessions() as s:
        exams = {e.id: e for e in s.scalars(select(Study))}
        assert set(exams) == {"a" * 24, "b" * 24}
        a, b = exams["a" * 24], exams["b" * 24]
        assert [len(e.series) for e in (a, b)] == [1, 1] and [len(e.series[0].images) for e in (a, b)] == [1, 1]
        img = a.series[0].images[0]
        assert (img.image_file, img.width, img.height, img.input_sha256, img.kind) == (
            f"images/{'a' * 24}.png", 64, 48, "a" * 64, "png")
        assert b.series[0].images[0].dicom_file == f"dicom/{'b' * 24}.dcm" and b.series[0].modality == "CT"
        result = exam_result(a)
        assert (result.label, result.decision, result.malignant_probability) == ("malignant", "malignant", 0.7)
        assert result.key_image.id == img.id and a.series[0].slice_scores == [[img.id, 0.7, False]]
        assert [f.label for f in a.feedback] == ["malignant"] and a.exam_key is None
        # stored before identities were kept (0007): its results cannot go to a PACS
        from lungcad.web.pacs import LEGACY, send_refusal

        assert b.identifiers is None and send_refusal(s, b) == LEGACY
        assert s.execute(text("SELECT count(*) FROM image_identifiers")).scalar() == 0


def _migrate_up_and_back(url: str, tmp_path):
    """Old (0004) rows, upgraded to the head and checked, then downgraded to 0004 again; returns the
    engine and the database's session factory."""
    from alembic import command

    from lungcad.web.migrate import alembic_config

    engine = make_db_engine(url)
    upgrade_database(engine, "0004")
    _old_rows(engine)
    upgrade_database(engine)
    _, sessions = open_database(url, tmp_path)
    _check_migrated(sessions)
    command.downgrade(alembic_config(engine), "0004")  # back through 0006 (reads) and 0005
    return engine, sessions


def test_migration_0005_moves_old_rows_into_exams_series_and_images(tmp_path):
    engine, _ = _migrate_up_and_back(f"sqlite:///{tmp_path / 'old.sqlite3'}", tmp_path)
    # each exam keeps its key image's columns
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, label, image_file FROM studies ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("a" * 24, "malignant", f"images/{'a' * 24}.png"),
                                        ("b" * 24, "normal", f"images/{'b' * 24}.png")]
    upgrade_database(engine)


@pytest.mark.slow  # a throw-away PostgreSQL cluster: a few seconds
def test_migration_0005_on_postgresql(postgres_server, tmp_path):  # noqa: F811
    engine, sessions = _migrate_up_and_back(postgres_server().replace("postgresql://", "postgresql+psycopg://"), tmp_path)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 2
    upgrade_database(engine)
    _check_migrated(sessions)


def _migrate_0007_up_and_back(url: str) -> None:
    """An exam stored under 0006 gets empty identity columns (identity_kept false) from 0007, and keeps its
    identifiers row when 0007 is undone; image_identifiers comes and goes."""
    from alembic import command
    from sqlalchemy import inspect

    from lungcad.web.migrate import alembic_config

    engine = make_db_engine(url)
    upgrade_database(engine, "0006")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at, reading_mode) "
                          "VALUES (1, 'old', 'x', 'clinician', TRUE, '2025-01-01 00:00:00', FALSE)"))
        conn.execute(text("INSERT INTO studies (id, created_at, user_id, kind, group_key, exam_key, model_sha256) "
                          "VALUES ('e1', '2025-01-02 00:00:00', 1, 'dicom', 'g', 'k', '')"))
        conn.execute(text("INSERT INTO exam_identifiers (study_id, accession_number, study_uid, case_label) "
                          "VALUES ('e1', 'ACC', '1.2.3', '')"))
    upgrade_database(engine)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM exam_identifiers")).mappings().one()
    assert (row["accession_number"], row["identity_kept"], row["patient_id"], row["patient_name"]) == ("ACC", False, "", "")
    assert "image_identifiers" in inspect(engine).get_table_names()
    command.downgrade(alembic_config(engine), "0006")
    insp = inspect(engine)
    assert "image_identifiers" not in insp.get_table_names()
    assert {c["name"] for c in insp.get_columns("exam_identifiers")} == {"study_id", "accession_number", "study_uid",
                                                                         "case_label"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT study_uid FROM exam_identifiers")).scalar() == "1.2.3"
    upgrade_database(engine)
    engine.dispose()


def test_migration_0007_adds_empty_identities_and_goes_back(tmp_path):
    _migrate_0007_up_and_back(f"sqlite:///{tmp_path / 'old.sqlite3'}")


@pytest.mark.slow  # a throw-away PostgreSQL cluster: a few seconds
def test_migration_0007_on_postgresql(postgres_server):  # noqa: F811
    _migrate_0007_up_and_back(postgres_server().replace("postgresql://", "postgresql+psycopg://"))


try:  # the end-to-end tests' throw-away PostgreSQL cluster (skips itself when PostgreSQL is absent)
    from test_web_e2e import postgres_server  # noqa: F401, E402
except (ImportError, pytest.skip.Exception):

    @pytest.fixture(scope="module")
    def postgres_server():
        pytest.skip("tests/test_web_e2e.py (the PostgreSQL fixture) cannot be imported here")


# ------------------------------------------------------------------------------------ reading mode, viewer


def viewer_frames(page: str) -> list[list[dict]]:
    """The frame lists of the page's image viewers (their JSON configuration blocks)."""
    import json

    blocks = re.findall(r'<script type="application/json" class="vw-config">(.*?)</script>', page, re.S)
    return [json.loads(b)["frames"] for b in blocks]


def test_reading_mode_hides_the_ai_result_of_exams_series_images_and_uploads(site):
    """Everything the series work added (result panel, series panels, score strip, key slices,
    /api/series, /api/images, upload answers, per-image heatmaps) withholds the AI result from a reader
    in reading mode until their unaided read of the exam; then it is all there."""
    client, bearer, sessions, _ = site
    with sessions() as s:
        s.scalar(select(User).where(User.username == "alice")).reading_mode = True
        s.commit()
    study, series = generate_uid(), generate_uid()
    files = [("files", (f"{i}.dcm", ct_slice(study, series, i), "application/dicom")) for i in (3, 1, 2)]
    r = client.post("/api/uploads", files=files, headers=bearer)
    assert r.status_code == 201, r.text
    exam = r.json()["studies"][0]
    assert exam["ai_hidden"] is True and exam["label"] is None and exam["probabilities"] is None
    assert exam["result_series_id"] is None and exam["key_image_id"] is None
    (ser,) = exam["series"]
    assert ser["ai_hidden"] is True and ser["label"] is None and ser["malignant_probability"] is None
    assert ser["key_images"] == [] and ser["slice_scores"] == []
    one = client.post("/api/predict", files={"file": ("x.png", png_bytes(220), "image/png")}, headers=bearer).json()
    assert one["ai_hidden"] is True and one["label"] is None and one["series"][0]["label"] is None
    got = client.get(f"/api/series/{ser['id']}", headers=bearer).json()
    assert got["ai_hidden"] is True and got["label"] is None and got["key_images"] == []
    assert [im["label"] for im in got["images"]] == [None] * 3 and all(im["ai_hidden"] for im in got["images"])
    image_ids = [im["id"] for im in got["images"]]  # slice order
    im = client.get(f"/api/images/{image_ids[0]}", headers=bearer).json()
    assert im["ai_hidden"] is True and im["label"] is None and im["probabilities"] is None and im["decision"] is None
    with sessions() as s:
        stored = {i.id: i for i in s.scalars(select(Image).where(Image.study_id == exam["id"]))}
        assert [stored[i].instance_number for i in image_ids] == [1, 2, 3]
    for body in (r.text, json_text(one), json_text(got), json_text(im)):
        assert '"malignant_probability":0.' not in body.replace(" ", "")
    # the exam page: no result panel, series result, score strip or key slices; the viewer without heatmaps
    url = f"/studies/{exam['id']}"
    page = client.get(url).text
    for needle in ('id="result-headline"', 'id="series-1-headline"', 'id="series-1-probabilities"', 'id="strip-',
                   "Key slices", 'class="keys"', "p(malignant)", "heatmap.npy", "overlay.png"):
        assert needle not in page, needle
    start = page.index('id="unaided-form"')
    assert "malignant" not in page[:start] + page[page.index("</form>", start):]  # only as an option to choose
    (frames,) = viewer_frames(page)
    assert [f["pixels"] for f in frames] == [f"/images/{i}/pixels.npy" for i in image_ids]
    assert all(f["heatmap"] is None for f in frames)
    for i in image_ids:
        assert client.get(f"/images/{i}/heatmap.npy").status_code == 403
        assert client.get(f"/images/{i}/overlay.png").status_code == 403
        assert client.get(f"/images/{i}/pixels.npy").status_code == 200
        assert client.get(f"/images/{i}.png").status_code == 200
    assert client.get(f"{url}/heatmap.npy").status_code == 403 and client.get(f"{url}/overlay.png").status_code == 403
    # the exam's one-image routes show its first slice, not the key slice, before the read
    assert client.get(f"{url}/image.png").content == client.get(f"/images/{image_ids[0]}.png").content
    # the upload page's answer
    more = form_upload(client, [("4.dcm", ct_slice(study, series, 4)), ("5.dcm", ct_slice(study, series, 5))])
    assert more.status_code == 200 and "open to read" in more.text
    for v in ("(malignant)", "(not malignant)"):
        assert v not in more.text
    # the unaided read reveals it all
    r = client.post(f"{url}/read", data={"stage": "unaided", "label": "benign", "confidence": "3",
                                         "csrf_token": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get(url).text
    for needle in ('id="result-headline"', 'id="series-1-headline"', 'id="strip-1"', "Key slices", "heatmap.npy"):
        assert needle in page, needle
    got = client.get(f"/api/series/{ser['id']}", headers=bearer).json()
    assert got["ai_hidden"] is False and got["label"] and got["key_images"] and len(got["slice_scores"]) == 5
    assert client.get(f"/api/images/{image_ids[0]}", headers=bearer).json()["label"] in CLASSES_OF_FAKE
    assert client.get(f"/images/{image_ids[0]}/heatmap.npy").status_code == 200
    assert client.get(f"/api/studies/{exam['id']}", headers=bearer).json()["key_image_id"]


CLASSES_OF_FAKE = ("normal", "benign", "malignant")


def json_text(obj) -> str:
    import json

    return json.dumps(obj)


def test_the_exam_page_viewer_shows_each_series_in_slice_order_with_one_audit_event(site):
    client, bearer, sessions, _ = site
    study, a, b = generate_uid(), generate_uid(), generate_uid()
    files = [(f"a{i}.dcm", ct_slice(study, a, i)) for i in (2, 3, 1)] + [("b1.dcm", ct_slice(study, b, 1))]
    r = form_upload(client, files)
    assert r.status_code == 200
    url = re.search(r'href="(/studies/[0-9a-f]+)"', r.text).group(1)
    exam_id = url.rsplit("/", 1)[1]
    with sessions() as s:
        by_series = {}
        for ser in s.scalars(select(Series).where(Series.study_id == exam_id).order_by(Series.number)):
            by_series[ser.number] = [im.id for im in sorted(ser.images, key=lambda im: im.instance_number)]

    def views() -> int:
        with sessions() as s:
            return s.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == "study_view", AuditEvent.target == exam_id)) or 0

    before = views()
    page = client.get(url).text
    frames = viewer_frames(page)
    assert [[f["pixels"] for f in fr] for fr in frames] == [
        [f"/images/{i}/pixels.npy" for i in by_series[n]] for n in sorted(by_series)]
    # series numbers follow which series' first file was stored first (uploads are stored a few at a time)
    three = next(fr for fr in frames if len(fr) == 3)
    assert [f["label"] for f in three] == ["Slice 1", "Slice 2", "Slice 3"]
    assert all(f["heatmap"] == f["pixels"].replace("pixels", "heatmap") for fr in frames for f in fr)
    for fr in frames:  # the viewer fetches every slice: audited as the one page view
        for f in fr:
            assert client.get(f["pixels"]).status_code == 200
            assert client.get(f["heatmap"]).headers["x-lungcad-target"] in CLASSES_OF_FAKE
    assert views() == before + 1
