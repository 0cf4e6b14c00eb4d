"""Against a real PACS nobody here wrote: Debian's Orthanc on loopback, `lungcad dicom-node` as a process,
a CT series sent with dcmtk's storescu. Faults on the way: Orthanc down when the results are ready
(queued, delivered once it starts) and the node SIGKILLed mid-series (the series completes after a
restart with every acknowledged instance)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("sqlalchemy")

from conftest import make_run  # noqa: E402
from test_dicom_node import free_port, send, wait_for  # noqa: E402
from test_dicom_results import ct_series, dciodvfy_errors  # noqa: E402

from lungcad.dicom.sr import read_series_probability  # noqa: E402

ORTHANC = shutil.which("Orthanc")
STORESCU = shutil.which("storescu")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = [
    pytest.mark.slow,  # two processes, a model load and a PACS: about half a minute
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc (Debian package orthanc) is not installed"),
]


class Orthanc:
    """Orthanc with a generated configuration: loopback only, temporary storage, random ports."""

    def __init__(self, root: Path, node_port: int, dicomweb: bool = False):
        self.http, self.dicom = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "lungcad-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomModalities": {"lungcad": ["LUNGCAD", "127.0.0.1", node_port]}, "DicomCheckCalledAet": True,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [], "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }))
        self.log = open(root / "orthanc.log", "wb")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(), timeout=60, what="Orthanc to start")

    def _up(self) -> bool:
        try:
            return "Version" in self.get("/system")
        except OSError:
            assert self.proc.poll() is None, "Orthanc exited; see orthanc.log"
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def instances_by_class(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            out.setdefault(tags["SOPClassUID"], []).append(iid)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Node:
    """`python -m lungcad dicom-node` as its own process."""

    def __init__(self, run: Path, data: Path, port: int, forward: str, log: Path, quiet: float):
        env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(log, "ab")
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lungcad", "dicom-node", str(run), "--port", str(port), "--forward", forward,
             "--data-dir", str(data), "--quiet-seconds", str(quiet), "--allow-ae", "STORESCU", "MODALITY"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._listening, timeout=120, what="the node to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "the node exited; see node.log"
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def storescu(paths: list[Path], port: int) -> None:
    """Send with dcmtk's storescu when installed (another implementation than ours), else pynetdicom."""
    if STORESCU is None:
        assert send(paths, port) == [0x0000] * len(paths)
        return
    out = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "LUNGCAD", "127.0.0.1", str(port), *map(str, paths)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_round_trip_through_orthanc_with_the_pacs_down_and_the_node_killed(tmp_path):
    run = make_run(tmp_path / "run", ood=(24, 8))
    data, node_port = tmp_path / "data", free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)  # configured, not started yet: the PACS is down
    series = ct_series(tmp_path / "ct", n=4)
    log = tmp_path / "node.log"
    forward = f"ORTHANC@127.0.0.1:{pacs.dicom}"
    try:
        # 1. the first half of the series, then SIGKILL: acknowledged instances must survive it
        node = Node(run, data, node_port, forward, log, quiet=3600)
        storescu(series[:2], node_port)
        assert node.stop(signal.SIGKILL) == -signal.SIGKILL
        # 2. a new node process receives the rest; the series completes with all four instances
        node = Node(run, data, node_port, forward, log, quiet=2)
        storescu(series[2:], node_port)

        from sqlalchemy import select

        from lungcad.web.db import DicomOutbox, Study, open_database

        _, sessions = open_database(None, data, upgrade=False)

        def outbox() -> list:
            with sessions() as session:
                return list(session.scalars(select(DicomOutbox)))

        wait_for(lambda: outbox() and all(r.attempts >= 1 for r in outbox()), timeout=180,
                 what="results queued and a first failed send (Orthanc is down)")
        from sqlalchemy.orm import selectinload

        from lungcad.web.db import Series

        with sessions() as session:  # the exam with what exam_result reads, usable after the session
            (study,) = session.scalars(select(Study).options(selectinload(Study.series).selectinload(Series.images)))
        assert study.dicom_meta["slices"] == 4 and study.dicom_meta["source"] == "dicom-node"
        assert all(r.status == "pending" for r in outbox())

        # 3. the PACS comes up: the queue delivers with its back-off, no one intervenes
        pacs.start()
        wait_for(lambda: all(r.status == "sent" for r in outbox()), timeout=120, what="delivery to Orthanc")
        found = pacs.instances_by_class()
        srs, scs = found.get("1.2.840.10008.5.1.4.1.1.88.34", []), found.get("1.2.840.10008.5.1.4.1.1.7", [])
        assert len(srs) == 1 and len(scs) == 3  # one report, one overlay per key slice
        source = pydicom.dcmread(series[0])
        sr_bytes = pacs.get(f"/instances/{srs[0]}/file")
        (tmp_path / "sr.dcm").write_bytes(sr_bytes)
        sr = pydicom.dcmread(tmp_path / "sr.dcm")
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID  # filed with the scan
        assert read_series_probability(sr) == pytest.approx(study.malignant_probability, abs=1e-6)
        if shutil.which("dciodvfy"):
            for name, iid in (("sr.dcm", srs[0]), ("sc.dcm", scs[0])):
                (tmp_path / name).write_bytes(pacs.get(f"/instances/{iid}/file"))
                assert dciodvfy_errors(tmp_path / name) == [], name
        assert node.stop() == 0  # SIGTERM: a clean stop
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and str(source.PatientName) not in text and source.StudyInstanceUID not in text
    finally:
        pacs.stop()
        if "node" in locals():
            node.stop(signal.SIGKILL)


@pytest.mark.skipif(not Path(DICOMWEB_PLUGIN).is_file(), reason="Orthanc's DICOMweb plugin (orthanc-dicomweb) is missing")
def test_round_trip_through_orthanc_dicomweb_stow_rs(tmp_path):
    pytest.importorskip("dicomweb_client")
    from sqlalchemy import select

    from lungcad.dicom.node import DicomNode, NodeOptions
    from lungcad.inference.predictor import Predictor
    from lungcad.web.db import DicomOutbox, Study

    run = make_run(tmp_path / "run", ood=(24, 8))
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port, dicomweb=True)
    pacs.start()
    node = DicomNode(NodeOptions(run=str(run), port=node_port, data_dir=str(tmp_path / "data"), quiet_seconds=1.0,
                                 forward=f"http://127.0.0.1:{pacs.http}/dicom-web"), predictor=Predictor(run))
    node.start()
    try:
        series = ct_series(tmp_path / "ct", n=2)
        storescu(series, node_port)

        def rows() -> list:
            with node.sessions() as session:
                return list(session.scalars(select(DicomOutbox)))

        wait_for(lambda: rows() and all(r.status == "sent" for r in rows()), timeout=180, what="STOW-RS to Orthanc")
        found = pacs.instances_by_class()
        srs, scs = found.get("1.2.840.10008.5.1.4.1.1.88.34", []), found.get("1.2.840.10008.5.1.4.1.1.7", [])
        assert len(srs) == 1 and len(scs) == 2 and all(r.destination.startswith("http://") for r in rows())
        (tmp_path / "sr.dcm").write_bytes(pacs.get(f"/instances/{srs[0]}/file"))
        with node.sessions() as session:  # the exam result comes from its series: read it inside the session
            (study,) = session.scalars(select(Study))
            p_malignant = study.malignant_probability
        assert read_series_probability(tmp_path / "sr.dcm") == pytest.approx(p_malignant, abs=1e-6)
    finally:
        node.stop()
        pacs.stop()
