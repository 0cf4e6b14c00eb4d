"""`lungcad dicom-node`: C-ECHO, C-STORE into the spool, series scoring onto the web app's worklist,
the persistent outbound queue, AE title restrictions and clean errors on bad options."""

from __future__ import annotations

import io
import logging
import socket
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("sqlalchemy")
from pydicom.data import get_testdata_file  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # noqa: E402

from conftest import make_run  # noqa: E402
from test_dicom_results import DCIODVFY, ct_series, dciodvfy_errors  # noqa: E402

from lungcad.cli import main  # noqa: E402
from lungcad.dicom.node import NODE_USER, DicomNode, NodeOptions  # noqa: E402
from lungcad.dicom.queue import Outbox, backoff_seconds, parse_destination  # noqa: E402
from lungcad.errors import LungcadError  # noqa: E402
from lungcad.inference.predictor import Predictor  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(paths: list[Path], port: int, calling: str = "MODALITY", called: str = "LUNGCAD") -> list[int]:
    """C-STORE files as a modality would; returns the status of each (empty if the association failed)."""
    ae = AE(ae_title=calling)
    for ctx in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(ctx)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def echo(port: int, calling: str = "MODALITY") -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGCAD")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class StoreSCP:
    """A minimal PACS stand-in (pynetdicom) that keeps what it receives, for the queue tests."""

    def __init__(self, port: int, ae_title: str = "PACS"):
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

        self.received: list = []
        ae = AE(ae_title=ae_title)
        for ctx in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
            ae.add_supported_context(ctx, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def run_dir(module_tmp) -> Path:
    return make_run(module_tmp("node") / "run", ood=(24, 8))


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor(run_dir)


@pytest.fixture
def node_factory(run_dir, predictor, tmp_path):
    nodes = []

    def make(**kw) -> DicomNode:
        opts = NodeOptions(run=str(run_dir), port=kw.pop("port", free_port()), data_dir=str(tmp_path / "data"),
                           quiet_seconds=kw.pop("quiet_seconds", 1.0), **kw)
        node = DicomNode(opts, predictor=predictor)
        node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def _studies(node: DicomNode) -> list:
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from lungcad.web.db import Series, Study

    with node.sessions() as session:  # exams with what exam_result reads, usable after the session closes
        return list(session.scalars(select(Study).options(
            selectinload(Study.user), selectinload(Study.series).selectinload(Series.images))))


# ------------------------------------------------------------------------------- options


def test_destination_syntax():
    assert str(parse_destination("ORTHANC@127.0.0.1:4242")) == "ORTHANC@127.0.0.1:4242"
    assert parse_destination("PACS@[::1]:104").host == "::1"
    for bad in ("ORTHANC", "ORTHANC@host", "@host:104", "A@host:port", "TOO_LONG_AE_TITLE_X@h:1", "A@h:0", "A@h:70000"):
        with pytest.raises(LungcadError, match="--forward"):
            parse_destination(bad)
    assert str(parse_destination("https://pacs.example/dicom-web/")) == "https://pacs.example/dicom-web"
    with pytest.raises(LungcadError, match="no credentials in the URL"):
        parse_destination("https://user:pw@pacs.example/dicom-web")
    assert [backoff_seconds(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0] and backoff_seconds(50) == 300.0


def test_cli_bad_forward_and_port_in_use_are_one_line_errors(run_dir, tmp_path, capsys):
    assert main(["dicom-node", str(run_dir), "--forward", "PACS-at-host", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--forward must be AE@HOST:PORT" in err and len(err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["dicom-node", str(run_dir), "--port", str(port), "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"port {port}" in err and "in use" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- receiving and scoring


def test_node_scores_a_series_onto_the_worklist_without_phi_in_the_logs(node_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    node = node_factory()
    assert "any calling AE title may store" in caplog.text  # no --allow-ae: said at start
    assert echo(node.opts.port) == 0x0000
    paths = ct_series(tmp_path / "ct", n=4)
    assert send(paths, node.opts.port) == [0x0000] * 4
    assert len(list((node.spool).rglob("*.dcm"))) == 4  # acknowledged = on disk
    wait_for(lambda: node.processed >= 1, what="the series to be processed")
    (study,) = _studies(node)
    assert study.user.username == NODE_USER and not study.user.active  # files studies, never signs in
    assert study.kind == "dicom" and study.dicom_meta["slices"] == 4 and study.dicom_meta["calling_ae"] == "MODALITY"
    assert study.decision in ("malignant", "not malignant") and 0.0 <= study.malignant_probability <= 1.0
    data = Path(node.opts.data_dir)
    stored = pydicom.dcmread(data / study.dicom_file)
    source = pydicom.dcmread(paths[0])
    assert stored.PatientName == "ANONYMOUS" and stored.StudyInstanceUID != source.StudyInstanceUID  # de-identified
    assert (data / study.image_file).is_file() and not list(node.spool.rglob("*.dcm"))  # spool emptied
    for phi in (str(source.PatientName), str(source.PatientID), source.StudyInstanceUID, source.SeriesInstanceUID):
        assert phi not in caplog.text
    # the original identity is kept in the identifying tables only, so the web app can send results back
    from lungcad.web.db import ExamIdentifiers, ImageIdentifiers

    with node.sessions() as session:
        ids, kept = session.get(ExamIdentifiers, study.id), session.get(ImageIdentifiers, study.series[0].key_images[0])
    assert ids.identity_kept and (ids.patient_name, ids.patient_id, ids.study_uid) == (
        str(source.PatientName), source.PatientID, source.StudyInstanceUID)
    assert kept.sop_instance_uid in {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert (kept.series_uid, kept.sop_class_uid) == (source.SeriesInstanceUID, source.SOPClassUID)


def test_json_logs_carry_events_counts_and_durations_without_phi(node_factory, tmp_path):
    import json

    from lungcad.utils import JsonLogFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("lungcad")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        node = node_factory()
        paths = ct_series(tmp_path / "ct", n=3)
        assert send(paths, node.opts.port) == [0x0000] * 3
        wait_for(lambda: node.processed >= 1, what="the series to be processed")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    by_event = {e["event"]: e for e in entries}
    assert {"node-started", "series-complete", "series-scored"} <= set(by_event)
    scored = by_event["series-scored"]
    assert scored["slices"] == 3 and scored["instances"] == 3 and scored["seconds"] >= 0
    assert len(scored["series"]) == 12 and by_event["series-complete"]["series"] == scored["series"]
    assert by_event["series-complete"]["instances"] == 3 and 0.0 <= scored["probability"] <= 1.0
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    source = pydicom.dcmread(paths[0])
    text = stream.getvalue()
    for phi in (str(source.PatientName), str(source.PatientID), source.StudyInstanceUID, source.SeriesInstanceUID):
        assert phi and phi not in text


def test_cli_log_format_json_writes_json_lines():
    import json

    from lungcad.utils import JsonLogFormatter

    record = logging.LogRecord("lungcad.dicom.node", logging.INFO, __file__, 1, "series %s: %d", ("abc", 2), None)
    record.event, record.series = "series-scored", "abc"
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["event"] == "series-scored" and entry["series"] == "abc" and entry["message"] == "series abc: 2"
    from lungcad.cli import build_parser

    args = build_parser().parse_args(["dicom-node", "RUN", "--log-format", "json"])
    assert args.log_format == "json"


def test_non_allowed_calling_ae_is_rejected_and_non_ct_is_not_scored(node_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    node = node_factory(allow_ae=["CT_SCANNER"])
    assert "any calling AE title" not in caplog.text
    paths = ct_series(tmp_path / "ct", n=2)
    assert send(paths, node.opts.port, calling="INTRUDER") == []  # association rejected
    assert echo(node.opts.port, calling="INTRUDER") is None
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)
    assert send([mr_path], node.opts.port, calling="CT_SCANNER") == [0x0000]
    wait_for(lambda: node.processed >= 1, what="the MR series")
    assert "not CT: modality MR, not scored" in caplog.text and _studies(node) == []


def test_non_ct_series_is_stored_de_identified_and_not_scored(node_factory, tmp_path, caplog):
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from lungcad.web.db import AuditEvent

    caplog.set_level(logging.INFO)
    node = node_factory()
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    mr.PatientName, mr.PatientID = "Doe^Jane", "MR-PID-4711"
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)
    assert send([mr_path], node.opts.port) == [0x0000]
    wait_for(lambda: node.processed >= 1, what="the MR series")
    assert _studies(node) == []  # not scored: nothing on the worklist
    (kept,) = list(node.not_scored.rglob("*.dcm"))  # stored
    stored = pydicom.dcmread(kept)
    assert stored.Modality == "MR" and stored.PatientName == "ANONYMOUS" and stored.PatientID != "MR-PID-4711"
    assert stored.SeriesInstanceUID != mr.SeriesInstanceUID  # de-identified like every stored DICOM
    assert not list(node.spool.rglob("*.dcm"))  # spool emptied
    assert "not CT: modality MR, not scored" in caplog.text
    with node.sessions() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-series-not-scored"))
        assert event.detail["reason"] == "not CT: modality MR, not scored" and event.detail["instances"] == 1
    for phi in ("Doe^Jane", "MR-PID-4711", mr.SeriesInstanceUID, mr.StudyInstanceUID):
        assert phi not in caplog.text


def test_spooled_series_survive_a_restart(node_factory, run_dir, predictor, tmp_path):
    node = node_factory(quiet_seconds=3600)  # never completes in this life
    paths = ct_series(tmp_path / "ct", n=3)
    assert send(paths, node.opts.port) == [0x0000] * 3
    node.stop()  # as good as killed: nothing was processed
    assert _studies(node) == [] and len(list(node.spool.rglob("*.dcm"))) == 3
    again = node_factory(quiet_seconds=0.5)  # same data folder
    wait_for(lambda: again.processed >= 1, what="the spooled series after the restart")
    assert len(_studies(again)) == 1 and _studies(again)[0].dicom_meta["slices"] == 3


# ------------------------------------------------------------------------------- the outbound queue


@pytest.mark.slow  # two node start-ups and a 3 s quiet period
def test_results_queue_survives_a_restart_and_is_sent_when_the_pacs_is_up(node_factory, tmp_path):
    from sqlalchemy import select, update

    from lungcad.web.db import DicomOutbox

    pacs_port = free_port()
    # A longer quiet period: on a loaded machine a 1 s gap between instances splits the series in two.
    node = node_factory(forward=f"PACS@127.0.0.1:{pacs_port}", quiet_seconds=3.0)  # nothing listens there yet
    assert send(ct_series(tmp_path / "ct", n=3), node.opts.port) == [0x0000] * 3
    wait_for(lambda: node.processed >= 1, what="the series")

    def rows():
        with node.sessions() as session:
            return list(session.scalars(select(DicomOutbox).order_by(DicomOutbox.id)))

    wait_for(lambda: all(r.attempts >= 1 for r in rows()), what="a failed first attempt")
    queued = rows()
    assert len(queued) == 4  # SR + 3 key-slice Secondary Captures
    assert all(r.status == "pending" and "cannot connect" in r.last_error for r in queued)
    assert all(r.study_id == _studies(node)[0].id for r in queued)
    node.stop()

    pacs = StoreSCP(pacs_port)
    try:
        outbox = Outbox(node.sessions, node.opts.data_dir, "LUNGCAD")  # a fresh process: only the database
        with node.sessions() as session:  # skip the back-off wait
            session.execute(update(DicomOutbox).values(next_attempt_at=DicomOutbox.created_at))
            session.commit()
        assert outbox.send_due() == 4
    finally:
        pacs.stop()
    assert all(r.status == "sent" and r.sent_at is not None for r in rows())
    classes = sorted(str(ds.SOPClassUID) for ds in pacs.received)
    assert classes == ["1.2.840.10008.5.1.4.1.1.7"] * 3 + ["1.2.840.10008.5.1.4.1.1.88.34"]
    assert not list((Path(node.opts.data_dir) / "dicom-node" / "results").rglob("*.dcm"))  # sent: deleted


def test_admin_page_shows_what_waits_for_the_pacs(tmp_path):
    from fastapi.testclient import TestClient

    from test_web import PASSWORD, FakePredictor, login

    from lungcad.web.app import create_app
    from lungcad.web.db import DicomOutbox, open_database
    from lungcad.web.security import add_user

    data = tmp_path / "webdata"
    _, sessions = open_database(None, data)
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        add_user(s, "root", PASSWORD, "admin")
        s.add(DicomOutbox(destination="ORTHANC@127.0.0.1:4242", file="dicom-node/results/x/sr.dcm",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", status="pending", attempts=3,
                          last_error="ORTHANC@127.0.0.1:4242: cannot connect or association aborted"))
        s.commit()
    with TestClient(create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())) as client:
        login(client)
        assert client.get("/dicom-outbox").status_code == 403  # clinicians do not see it
        client.cookies.clear()
        login(client, "root")
        page = client.get("/dicom-outbox").text
        assert "pending: 1" in page and "cannot connect" in page and "ORTHANC@127.0.0.1:4242" in page
        assert "SR" in page and "Nothing queued" not in client.get("/dicom-outbox?status=pending").text
        assert "Nothing queued" in client.get("/dicom-outbox?status=sent").text
        assert 'href="/dicom-outbox"' in client.get("/dashboard").text


def test_predict_send_stores_the_results_on_a_pacs(run_dir, tmp_path, capsys):
    series = ct_series(tmp_path / "ct", n=2)
    port = free_port()
    assert main(["predict", str(run_dir), str(series[0].parent), "--send", "PACS@localhost", "--no-progress"]) == 1
    assert "--send must be AE@HOST:PORT" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(series[0].parent), "--send", f"PACS@127.0.0.1:{port}",
                 "--no-progress"]) == 1  # nobody listens: the predictions stand, the failed send fails the run
    err = capsys.readouterr().err
    assert "3 of 3 DICOM result(s) not sent" in err and "cannot connect" in err and "Traceback" not in err
    pacs = StoreSCP(port)
    try:
        out = tmp_path / "results"
        assert main(["predict", str(run_dir), str(series[0].parent), "--send", f"PACS@127.0.0.1:{port}",
                     "--dicom-out", str(out), "--no-progress"]) == 0
    finally:
        pacs.stop()
    assert "3 DICOM result(s) sent to PACS@127.0.0.1:" in capsys.readouterr().err
    assert sorted(str(ds.SOPClassUID) for ds in pacs.received) == ["1.2.840.10008.5.1.4.1.1.7"] * 2 + [
        "1.2.840.10008.5.1.4.1.1.88.34"]
    assert len(list(out.glob("*.dcm"))) == 3  # --dicom-out keeps them


def test_web_app_receives_studies_by_stow_rs(tmp_path):
    from fastapi.testclient import TestClient

    from test_web import PASSWORD, FakePredictor

    from lungcad.web.app import create_app
    from lungcad.web.db import open_database
    from lungcad.web.security import add_user, create_token

    data = tmp_path / "webdata"
    _, sessions = open_database(None, data)
    with sessions() as s:
        token = create_token(s, add_user(s, "pacs", PASSWORD, "clinician"), "stow")
        s.commit()
    instances = [p.read_bytes() for p in ct_series(tmp_path / "ct", n=2)]
    boundary = "lungcad-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + raw + b"\r\n"
                    for raw in [*instances, b"not a DICOM file"]) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with TestClient(create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor())) as client:
        assert client.post("/api/dicomweb/studies", content=body, headers=headers).status_code == 401  # no token
        r = client.post("/api/dicomweb/studies", content=body, headers={**headers, "Authorization": f"Bearer {token}"})
        assert r.status_code == 202 and r.headers["content-type"].startswith("application/dicom+json")  # 2 of 3
        answer = pydicom.Dataset.from_json(r.json())
        assert [str(x.ReferencedSOPInstanceUID) for x in answer.ReferencedSOPSequence] == [
            str(pydicom.dcmread(io.BytesIO(raw)).SOPInstanceUID) for raw in instances]
        assert len(answer.FailedSOPSequence) == 1 and answer.FailedSOPSequence[0].FailureReason == 0xC000
        studies = client.get("/api/studies", headers={"Authorization": f"Bearer {token}"}).json()
        # on the worklist as one exam of one series (grouped by their UIDs), de-identified
        assert [(s["kind"], s["series_count"], s["images_count"]) for s in studies] == [("dicom", 1, 2)]
        r = client.post("/api/dicomweb/studies", content=b"x", headers={"Authorization": f"Bearer {token}",
                                                                         "Content-Type": "application/dicom"})
        assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json")


# ------------------------------------------------------------------------------- late instances (issue 14)


@pytest.fixture
def direct_node(run_dir, predictor, tmp_path):
    """A node that is not listening: the tests spool instances and call `process_series` themselves."""

    def make(**kw) -> DicomNode:
        opts = NodeOptions(run=str(run_dir), port=free_port(), data_dir=str(kw.pop("data_dir", tmp_path / "data")),
                           **kw)
        return DicomNode(opts, predictor=predictor)

    return make


def spool(node: DicomNode, paths: list[Path]) -> str:
    """Put instances into the spool as C-STORE does; returns the series' spool key."""
    import shutil

    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = node.spool_path(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target.parent.name


def _series_row(node: DicomNode):
    from sqlalchemy import select

    from lungcad.web.db import Series

    with node.sessions() as session:
        (row,) = session.scalars(select(Series))
        return row


def _audits(node: DicomNode, action: str) -> list:
    from sqlalchemy import select

    from lungcad.web.db import AuditEvent

    with node.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_late_instances_rescore_the_whole_series_and_amend_the_sr(direct_node, predictor, tmp_path, caplog):
    from lungcad.dicom.sr import read_series_probability

    caplog.set_level(logging.INFO)
    paths = ct_series(tmp_path / "ct", n=4)
    node = direct_node(forward="PACS@127.0.0.1:1")  # the outbox is not started: results wait in the queue
    key = spool(node, paths[:2])
    study_id = node.process_series(key)
    assert _series_row(node).images_count == 2
    assert spool(node, paths[2:]) == key  # the rest of the series, after its quiet period
    assert node.process_series(key) == study_id
    row = _series_row(node)
    preds = list(predictor.predict_paths(paths, progress=False, series_rows=False))
    expected = next(iter(predictor.series_predictions([preds])))  # all the slices scored at once
    assert row.images_count == 4 and len(row.slice_scores) == 4
    assert sorted(s[1] for s in row.slice_scores) == sorted(round(float(p.malignant_probability), 4) for p in preds)
    assert row.malignant_probability == pytest.approx(expected.malignant_probability, abs=1e-6)
    assert (row.label, row.decision) == (expected.label, expected.decision)
    assert row.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    assert len(list((node.scored / key).glob("*.dcm"))) == 4 and not list(node.spool.rglob("*.dcm"))
    # the amended SR: a new instance in the same SR series, superseding the first one
    first, amended = sorted((pydicom.dcmread(p) for p in (node.results / key).glob("*_lungcad_sr*.dcm")),
                            key=lambda ds: int(ds.InstanceNumber))
    assert first.SeriesInstanceUID == amended.SeriesInstanceUID and first.SOPInstanceUID != amended.SOPInstanceUID
    assert (int(first.InstanceNumber), int(amended.InstanceNumber)) == (1, 2)
    ref = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert read_series_probability(amended) == pytest.approx(row.malignant_probability, abs=1e-6)
    if DCIODVFY:  # the amended report is a valid Comprehensive 3D SR (Predecessor Documents Sequence included)
        assert dciodvfy_errors(next((node.results / key).glob("*_lungcad_sr_*.dcm"))) == []
    assert "supersedes the earlier report" in caplog.text
    queued = [r for r in _outbox(node) if r.sop_class_uid.endswith(".88.34")]
    assert len(queued) == 2  # both SRs wait for the PACS; unchanged key-slice captures are not queued twice
    assert len({r.file for r in _outbox(node)}) == len(_outbox(node))
    for phi in (paths[0].name, pydicom.dcmread(paths[0]).SeriesInstanceUID):
        assert phi not in caplog.text


def _outbox(node: DicomNode) -> list:
    from sqlalchemy import select

    from lungcad.web.db import DicomOutbox

    with node.sessions() as session:
        return list(session.scalars(select(DicomOutbox)))


def test_a_resent_instance_is_not_counted_twice(direct_node, tmp_path):
    paths = ct_series(tmp_path / "ct", n=4)
    node = direct_node()
    key = spool(node, paths)
    node.process_series(key)
    before = _series_row(node)
    spool(node, paths[:1])  # the modality sends the first slice again
    node.process_series(key)
    row = _series_row(node)
    assert row.images_count == 4 and len(row.slice_scores) == 4
    assert row.malignant_probability == pytest.approx(before.malignant_probability, abs=1e-9)
    assert len(list((node.scored / key).glob("*.dcm"))) == 4


def test_a_retried_rescore_writes_the_same_amended_sr(direct_node, tmp_path):
    paths = ct_series(tmp_path / "ct", n=3)
    node = direct_node(forward="PACS@127.0.0.1:1")
    key = spool(node, paths[:2])
    node.process_series(key)
    spool(node, paths[2:])
    record = node._record
    node._record = lambda *a, **kw: (_ for _ in ()).throw(OSError("database gone"))  # fails after the SR is written
    with pytest.raises(OSError):
        node.process_series(key)
    node._record = record
    assert len(list(node.spool.rglob("*.dcm"))) == 1  # the late instance stays in the spool
    node.process_series(key)  # the retry: the same instances, so the same amended SR
    first, amended = sorted((pydicom.dcmread(p) for p in (node.results / key).glob("*_lungcad_sr*.dcm")),
                            key=lambda ds: int(ds.InstanceNumber))  # two SRs, not three
    assert first.SOPInstanceUID != amended.SOPInstanceUID and int(amended.InstanceNumber) == 2
    ref = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID  # not itself
    assert _series_row(node).images_count == 3


def test_scored_instances_are_pruned_after_the_retention(direct_node, tmp_path):
    paths = ct_series(tmp_path / "ct", n=3)
    node = direct_node(keep_hours=2.0)
    key = spool(node, paths)
    node.process_series(key)
    assert node.prune_scored() == 0 and (node.scored / key).is_dir()  # within the retention: kept
    later = time.time() + 2.0 * 3600 + 1
    spool(node, paths[:1])  # a late instance waits in the spool: its series is not pruned under it
    assert node.prune_scored(now=later) == 0
    node.process_series(key)
    assert node.prune_scored(now=time.time() + 2.0 * 3600 + 1) == 1
    assert not (node.scored / key).exists() and not list(node.scored.iterdir())


def test_the_node_prunes_on_its_own_and_a_restart_does_not_rescore_kept_series(node_factory, tmp_path, monkeypatch,
                                                                               caplog):
    import json

    import lungcad.dicom.node as node_mod

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(node_mod, "PRUNE_EVERY", 0.2)
    data = tmp_path / "data" / "dicom-node" / "scored"
    old, fresh = data / "old", data / "fresh"
    for folder, age in ((old, 3600.0), (fresh, 0.0)):
        folder.mkdir(parents=True)
        (folder / "instance.dcm").write_bytes(b"kept")
        (folder / "state.json").write_text(json.dumps({"scored_at": time.time() - age, "revision": 0}))
    node = node_factory(keep_hours=0.5)
    wait_for(lambda: not old.exists(), timeout=10, what="the old scored series to be pruned")
    assert (fresh / "instance.dcm").is_file()  # within the retention
    assert "left in the spool" not in caplog.text and node.processed == 0  # kept series are not new work


def test_late_instances_after_the_retention_do_not_shrink_the_series(direct_node, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    paths = ct_series(tmp_path / "ct", n=4)
    node = direct_node(forward="PACS@127.0.0.1:1")
    key = spool(node, paths[:3])
    study_id = node.process_series(key)
    before = _series_row(node)
    queued = len(_outbox(node))
    assert node.prune_scored(now=time.time() + 25 * 3600) == 1  # the earlier instances are gone
    spool(node, paths[3:])
    assert node.process_series(key) == study_id
    row = _series_row(node)
    assert row.images_count == 3 and len(row.slice_scores) == 3  # the earlier result stands
    assert row.malignant_probability == before.malignant_probability and row.slice_scores == before.slice_scores
    assert len(_outbox(node)) == queued  # nothing sent for a result that was not recorded
    (event,) = _audits(node, "dicom-series-late-instances")
    assert event.detail["slices"] == 1 and event.detail["recorded_slices"] == 3 and event.target == study_id
    assert "late slice(s) arrived after the earlier instances were deleted" in caplog.text
    assert pydicom.dcmread(paths[0]).SeriesInstanceUID not in caplog.text
    assert len(list((node.scored / key).glob("*.dcm"))) == 1  # kept: more late instances may join it


def test_keep_hours_option(run_dir, predictor, tmp_path):
    from lungcad.cli import build_parser

    assert build_parser().parse_args(["dicom-node", "RUN"]).keep_hours == 24.0
    assert build_parser().parse_args(["dicom-node", "RUN", "--keep-hours", "0.5"]).keep_hours == 0.5
    with pytest.raises(LungcadError, match="--keep-hours must be 0 or more"):
        DicomNode(NodeOptions(run=str(run_dir), data_dir=str(tmp_path), keep_hours=-1), predictor=predictor)


def test_a_series_sent_in_two_parts_is_one_series_of_all_its_slices(node_factory, tmp_path):
    node = node_factory(quiet_seconds=0.5)
    paths = ct_series(tmp_path / "ct", n=5)
    assert send(paths[:3], node.opts.port) == [0x0000] * 3
    wait_for(lambda: node.processed >= 1, what="the first part")
    assert send(paths[3:], node.opts.port) == [0x0000] * 2  # after the quiet period: late instances
    wait_for(lambda: _studies(node)[0].series[0].images_count == 5, timeout=30, what="the series of all 5 slices")
    (study,) = _studies(node)
    (series,) = study.series
    assert len(series.slice_scores) == 5 and study.dicom_meta["slices"] == 5
