"""Results of a web-app exam sent to a PACS (`lungcad serve --pacs`, issue 14 item 3): the SR and the key
slices' Secondary Captures rebuilt under the ORIGINAL patient, study and instance UIDs (the data folder
holds only de-identified copies), queued in the DICOM outbox, delivered to an in-process pynetdicom
Storage SCP on loopback, or by STOW-RS to Orthanc's DICOMweb plugin; the PACS down (queued, shown to
administrators, delivered later); refusals.

test_web's fake predictor stands in for the model; the slices are pydicom's CT_small.dcm (conftest.ct_slice).
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

pytest.importorskip("fastapi")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from fastapi.testclient import TestClient  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import select, text, update  # noqa: E402

from conftest import ACCESSION, PATIENT, ct_slice  # noqa: E402
from test_dicom_node import StoreSCP, free_port, wait_for  # noqa: E402
from test_dicom_results import dciodvfy_errors  # noqa: E402
from test_web import FakePredictor, csrf_of, login, png_bytes, users_database  # noqa: E402

from lungcad.dicom.sr import read_series_probability  # noqa: E402
from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import AuditEvent, DicomOutbox, ExamIdentifiers, ImageIdentifiers, Series, User  # noqa: E402
from lungcad.web.security import create_token  # noqa: E402

SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


class PacsPredictor(FakePredictor):
    """The fake model plus what results for a PACS need: its heatmap at the slice's rows and columns."""

    def source_heatmap(self, exp, pixels):
        rows, cols = pixels.shape[:2]
        heat = PILImage.fromarray((np.asarray(exp.heatmap) * 255).astype(np.uint8)).resize((cols, rows))
        return np.asarray(heat, dtype=np.float32) / 255.0


def make_app(tmp_path: Path, pacs: str | None):
    data = tmp_path / "webdata"
    sessions = users_database(data)
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    app = create_app(tmp_path / "run", data_dir=data, predictor=PacsPredictor(), pacs=pacs)
    return app, {"Authorization": f"Bearer {token}"}, sessions, data


def upload_series(client: TestClient, bearer: dict, n: int = 4) -> tuple[str, list]:
    """A CT series of `n` slices uploaded through the API; (exam id, the ORIGINAL headers)."""
    study, series = generate_uid(), generate_uid()
    raws = [ct_slice(study, series, i, bright=40 * i) for i in range(1, n + 1)]
    r = client.post("/api/uploads", files=[("files", (f"{i}.dcm", raw, "application/dicom"))
                                           for i, raw in enumerate(raws)], headers=bearer)
    assert r.status_code == 201, r.text
    (exam,) = r.json()["studies"]
    return exam["id"], [pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True) for raw in raws]


def outbox_rows(sessions) -> list[DicomOutbox]:
    with sessions() as s:
        return list(s.scalars(select(DicomOutbox).order_by(DicomOutbox.id)))


def test_exam_results_reach_the_pacs_under_the_original_patient_study_and_uids(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    pacs = StoreSCP(port)
    app, bearer, sessions, data = make_app(tmp_path, f"PACS@127.0.0.1:{port}")
    try:
        with TestClient(app) as client:  # the lifespan runs the outbox sender
            exam_id, originals = upload_series(client, bearer)
            login(client)
            page = client.get(f"/studies/{exam_id}").text
            assert 'id="send-form"' in page and "Send results to PACS" in page
            r = client.post(f"/studies/{exam_id}/send", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
            assert r.status_code == 303, r.text
            assert "4 result objects queued" in client.get(r.headers["location"]).text
            wait_for(lambda: len(pacs.received) == 4, timeout=60, what="the results at the PACS")
            wait_for(lambda: all(row.status == "sent" for row in outbox_rows(sessions)), timeout=30,
                     what="the outbox rows marked sent")
            series = client.get(f"/api/studies/{exam_id}", headers=bearer).json()["series"][0]
    finally:
        pacs.stop()
    srs = [ds for ds in pacs.received if ds.SOPClassUID == SR_CLASS]
    scs = [ds for ds in pacs.received if ds.SOPClassUID == SC_CLASS]
    assert len(srs) == 1 and len(scs) == 3  # the series' report and one overlay per key slice
    source = originals[0]
    by_image = {}
    with sessions() as s:
        for image_id in series["key_images"]:
            by_image[s.get(ImageIdentifiers, image_id).sop_instance_uid] = image_id
    original_sops = {str(ds.SOPInstanceUID) for ds in originals}
    for ds in (*srs, *scs):  # filed with the scan, under the patient it came from
        assert ds.PatientID == PATIENT["PatientID"] and str(ds.PatientName) == PATIENT["PatientName"]
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.AccessionNumber == ACCESSION
        assert ds.IssuerOfPatientID == PATIENT["IssuerOfPatientID"] and ds.PatientBirthDate == PATIENT["PatientBirthDate"]
        assert ds.StudyID == PATIENT["StudyID"] and ds.StudyDate == PATIENT["StudyDate"]
        assert "PatientIdentityRemoved" not in ds
    for sc in scs:  # each overlay references the original key slice
        (ref,) = sc.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID in by_image and ref.ReferencedSOPClassUID == source.SOPClassUID
    assert {r.ReferencedSOPInstanceUID for sc in scs for r in sc.SourceImageSequence} == set(by_image)
    sr = srs[0]
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == set(by_image) and evidence <= original_sops
    assert {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence} == {
        source.SeriesInstanceUID}
    assert read_series_probability(sr) == pytest.approx(series["malignant_probability"], abs=1e-6)
    if shutil.which("dciodvfy"):  # the re-identified objects are as valid as the node's
        for name, ds in (("sr.dcm", sr), ("sc.dcm", scs[0])):
            ds.save_as(tmp_path / name, enforce_file_format=True)
            assert dciodvfy_errors(tmp_path / name) == [], name
    # delivered: the identified files are gone; the audit row names the exam and the count, no identity
    assert not list((data / "pacs-results").rglob("*.dcm"))
    assert all(row.study_id == exam_id for row in outbox_rows(sessions))
    with sessions() as s:
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "results-sent"))
        assert (event.target, event.detail["objects"], event.username) == (exam_id, 4, "alice")
        audit_rows = " ".join(str(r) for r in s.execute(text("SELECT * FROM audit_log")).all())
    secrets_ = [PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["IssuerOfPatientID"], ACCESSION,
                source.StudyInstanceUID, *original_sops]
    for value in secrets_:
        assert value not in caplog.text and value not in audit_rows, value


def test_with_the_pacs_down_the_send_stays_queued_is_shown_and_is_delivered_later(tmp_path):
    port = free_port()  # nothing listens there yet
    app, bearer, sessions, data = make_app(tmp_path, f"PACS@127.0.0.1:{port}")
    client = TestClient(app)  # no lifespan: no sender thread; the test drives the outbox itself
    exam_id, _ = upload_series(client, bearer, n=2)
    r = client.post(f"/api/studies/{exam_id}/send", headers=bearer)
    assert r.status_code == 202, r.text
    assert r.json() == {"study_id": exam_id, "queued": 3, "destination": f"PACS@127.0.0.1:{port}"}  # SR + 2 SCs
    outbox = app.state.outbox
    assert outbox.send_due() == 0  # the PACS is down
    rows = outbox_rows(sessions)
    assert len(rows) == 3 and all(r.status == "pending" and r.attempts == 1 and "cannot connect" in r.last_error
                                  for r in rows)
    assert len(list((data / "pacs-results").rglob("*.dcm"))) == 3  # kept until the PACS has them
    login(client, "root")
    page = client.get("/dicom-outbox").text
    assert "pending: 3" in page and "cannot connect" in page and f"/studies/{exam_id}" in page
    pacs = StoreSCP(port)
    try:
        assert outbox.send_due() == 0  # still backing off
        with sessions() as s:  # skip the back-off wait
            s.execute(update(DicomOutbox).values(next_attempt_at=DicomOutbox.created_at))
            s.commit()
        assert outbox.send_due() == 3
    finally:
        pacs.stop()
    assert sorted(str(ds.SOPClassUID) for ds in pacs.received) == [SC_CLASS, SC_CLASS, SR_CLASS]
    assert all(r.status == "sent" for r in outbox_rows(sessions))
    assert "sent: 3" in client.get("/dicom-outbox").text
    assert not list((data / "pacs-results").rglob("*.dcm"))


def test_sending_is_refused_with_the_reason(tmp_path):
    app, bearer, sessions, data = make_app(tmp_path, f"PACS@127.0.0.1:{free_port()}")
    client = TestClient(app)
    exam_id, _ = upload_series(client, bearer, n=2)

    def send(study_id: str = exam_id, headers: dict = bearer):
        r = client.post(f"/api/studies/{study_id}/send", headers=headers)
        assert r.headers["content-type"] == "application/problem+json", r.text
        return r.status_code, r.json()["detail"]

    assert send("0" * 24)[0] == 404
    case = client.post("/api/predict", files={"file": ("x.png", png_bytes(), "image/png")}, headers=bearer).json()
    assert send(case["id"]) == (409, "not a DICOM exam: only DICOM results can be filed in a PACS")
    with sessions() as s:  # a role that may not send (only clinicians and administrators may)
        viewer = User(username="viewer", password_hash="x", role="viewer", active=True)
        s.add(viewer)
        s.flush()
        viewer_token = create_token(s, viewer)
        reader = s.scalar(select(User).where(User.username == "root"))
        reader.reading_mode = True  # a pilot reader before their unaided read: the AI result is not theirs to see
        reader_token = create_token(s, reader)
        s.commit()
    assert send(headers={"Authorization": f"Bearer {viewer_token}"}) == (403, "clinicians and administrators only")
    assert send(headers={"Authorization": f"Bearer {reader_token}"})[0] == 403
    # an exam stored before identities were kept (migration 0007): no original identity to file it under
    with sessions() as s:
        s.get(ExamIdentifiers, exam_id).identity_kept = False
        s.commit()
    assert send() == (409, "uploaded before identities were kept; re-send from the PACS")
    login(client)
    page = client.get(f"/studies/{exam_id}").text
    assert 'id="send-form"' not in page and "uploaded before identities were kept" in page
    with sessions() as s:
        s.get(ExamIdentifiers, exam_id).identity_kept = True
        key = s.scalars(select(Series)).first().key_images[0]
        s.delete(s.get(ImageIdentifiers, key))
        s.commit()
    assert send()[0] == 409
    assert not outbox_rows(sessions) and not list((data / "pacs-results").rglob("*.dcm"))  # nothing half-written
    with sessions() as s:
        assert not s.scalars(select(AuditEvent).where(AuditEvent.action == "results-sent")).all()
    # without --pacs: no button, and the API says why
    app2, bearer2, _, _ = make_app(tmp_path / "nopacs", None)
    client2 = TestClient(app2)
    exam2, _ = upload_series(client2, bearer2, n=1)
    r = client2.post(f"/api/studies/{exam2}/send", headers=bearer2)
    assert r.status_code == 409 and "no PACS configured" in r.json()["detail"]
    login(client2)
    assert "Send results to PACS" not in client2.get(f"/studies/{exam2}").text
    r = client2.post(f"/studies/{exam2}/send", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert r.status_code == 403  # the form needs the session's CSRF token


def test_serve_refuses_a_malformed_pacs_address(tmp_path, capsys):
    from lungcad.cli import main

    assert main(["serve", str(tmp_path / "run"), "--pacs", "PACS@nowhere", "--data-dir", str(tmp_path / "d")]) == 1
    assert "--pacs must be AE@HOST:PORT" in capsys.readouterr().err


@pytest.mark.slow
def test_exam_results_reach_orthanc_over_dicomweb_stow_rs(tmp_path):
    """`serve --pacs http://.../dicom-web`: the same results, filed by STOW-RS in a real DICOMweb server
    (Debian's Orthanc with its DICOMweb plugin), under the original patient and study."""
    pytest.importorskip("dicomweb_client")
    from test_dicom_pacs import DICOMWEB_PLUGIN, ORTHANC, Orthanc

    if ORTHANC is None or not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip("Orthanc with its DICOMweb plugin (Debian: orthanc, orthanc-dicomweb) is not installed")
    pacs = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True)
    pacs.start()
    try:
        app, bearer, sessions, _ = make_app(tmp_path, f"http://127.0.0.1:{pacs.http}/dicom-web")
        with TestClient(app) as client:  # the lifespan runs the outbox sender
            exam_id, originals = upload_series(client, bearer, n=2)
            r = client.post(f"/api/studies/{exam_id}/send", headers=bearer)
            assert r.status_code == 202 and r.json()["queued"] == 3, r.text
            wait_for(lambda: [row.status for row in outbox_rows(sessions)] == ["sent"] * 3, timeout=60,
                     what="STOW-RS to Orthanc")
        found = pacs.instances_by_class()
        assert sorted((k, len(v)) for k, v in found.items()) == sorted([(SR_CLASS, 1), (SC_CLASS, 2)])
        for iid in (*found[SR_CLASS], *found[SC_CLASS]):
            tags = pacs.get(f"/instances/{iid}/simplified-tags")
            assert tags["PatientID"] == PATIENT["PatientID"] and tags["AccessionNumber"] == ACCESSION
            assert tags["StudyInstanceUID"] == originals[0].StudyInstanceUID
    finally:
        pacs.stop()
