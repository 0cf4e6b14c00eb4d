"""Time from a CT series' last instance to its Structured Report in the PACS, through `lungcad dicom-node`.

    python benchmarks/bench_dicom_node.py [--run RUNDIR] [--slices 300] [--engine torch --engine openvino-int8]

For each engine: Debian's Orthanc on loopback (a pynetdicom store SCP when Orthanc is not
installed), a node forwarding to it, N slices of 512 x 512 (pydicom's CT_small.dcm upsampled, distinct
UIDs and contents) sent with dcmtk's storescu (pynetdicom otherwise). Reported: the seconds from the
last acknowledged instance to the SR being in the PACS, the node's quiet period (part of that time,
by design) and the rest (scoring, Grad-CAM of the key slices, SR + SC writing, sending).
Without --run a random-initialised 224 px ResNet-50 run is made (speed does not depend on the
weights); INT8 engines need a trained run (`lungcad export --int8` calibrates on its training images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_run(folder: Path, size: int) -> Path:
    """A run folder with a random-init ResNet-50 and an OOD detector fitted on synthetic slices."""
    import torch

    from lungcad.data.transforms import Preprocessing, prepare
    from lungcad.inference.ood import fit_ood
    from lungcad.models.contract import ModelContract, save_model
    from lungcad.models.factory import create_model

    folder.mkdir(parents=True)
    model, _ = create_model("resnet50", outputs=3, pretrained="none")
    model.eval()
    pp = Preprocessing(image_size=size)
    contract = ModelContract(arch="resnet50", task="multiclass", classes=["normal", "benign", "malignant"],
                             preprocessing=pp, temperature=1.0, thresholds={"malignant": 0.5})
    rng = np.random.default_rng(0)
    images = lambda n: torch.stack([prepare((rng.random((256, 256)) * 255).astype(np.uint8), pp)  # noqa: E731
                                    for _ in range(n)])
    contract.ood = fit_ood(folder, model, images(24), images(8), pp)
    save_model(folder, model, contract)
    return folder


def make_series(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    big = np.kron(base.pixel_array.astype(np.int16), np.ones((4, 4), dtype=np.int16))  # 128 -> 512
    series_uid = pydicom.uid.generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows, ds.Columns = big.shape
        ds.PixelData = (big + (i % 50)).astype(np.int16).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.SliceLocation = float(i)
        paths.append(folder / f"{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


class Pacs:
    """Orthanc when installed, else a pynetdicom store SCP; `has_sr()` says whether the SR arrived."""

    def __init__(self, root: Path):
        self.dicom, self.http = free_port(), free_port()
        self.proc = None
        self.received: list[str] = []
        orthanc = shutil.which("Orthanc")
        if orthanc:
            root.mkdir(parents=True, exist_ok=True)
            config = root / "orthanc.json"
            config.write_text(json.dumps({
                "Name": "bench", "StorageDirectory": str(root / "s"), "IndexDirectory": str(root / "i"),
                "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False, "Plugins": []}))
            self.proc = subprocess.Popen([orthanc, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(300):
                try:
                    self._get("/system")
                    break
                except OSError:
                    time.sleep(0.1)
            self.kind = "Orthanc"
        else:
            from pynetdicom import AE, evt
            from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

            ae = AE(ae_title="ORTHANC")
            for ctx in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
                ae.add_supported_context(ctx)

            def on_store(event):
                self.received.append(str(event.dataset.SOPClassUID))
                return 0x0000

            self.server = ae.start_server(("127.0.0.1", self.dicom), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, on_store)])
            self.kind = "pynetdicom store SCP"

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def has_sr(self) -> bool:
        if self.proc is None:
            return SR_CLASS in self.received
        for iid in self._get("/instances"):
            if self._get(f"/instances/{iid}/simplified-tags").get("SOPClassUID") == SR_CLASS:
                return True
        return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        else:
            self.server.shutdown()


def send(paths: list[Path], port: int) -> None:
    storescu = shutil.which("storescu")
    if storescu:
        subprocess.run([storescu, "-aet", "BENCH", "-aec", "LUNGCAD", "127.0.0.1", str(port), *map(str, paths)],
                       check=True, capture_output=True, timeout=3600)
        return
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGCAD")
    for p in paths:
        assoc.send_c_store(pydicom.dcmread(p))
    assoc.release()


def bench(run: Path, engine: str, series: list[Path], quiet: float, work: Path) -> dict:
    from lungcad.dicom.node import DicomNode, NodeOptions

    pacs = Pacs(work / "pacs")
    node_port = free_port()
    node = DicomNode(NodeOptions(run=str(run), port=node_port, data_dir=str(work / "data"), quiet_seconds=quiet,
                                 forward=f"ORTHANC@127.0.0.1:{pacs.dicom}", engine=engine))
    node.start()
    try:
        t0 = time.perf_counter()
        send(series, node_port)
        t_last = time.perf_counter()
        while not pacs.has_sr():
            time.sleep(0.05)
        t_sr = time.perf_counter()
    finally:
        node.stop()
        pacs.stop()
    return {"engine": engine, "slices": len(series), "pacs": pacs.kind, "send_s": round(t_last - t0, 2),
            "last_instance_to_sr_s": round(t_sr - t_last, 2), "quiet_period_s": quiet,
            "after_quiet_period_s": round(t_sr - t_last - quiet, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder (default: a random-init 224 px run)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--engine", action="append", help="repeatable (default: torch)")
    ap.add_argument("--quiet-seconds", type=float, default=2.0)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else random_run(tmp / "run", args.image_size)
        series = make_series(tmp / "series", args.slices)
        for engine in args.engine or ["torch"]:
            print(json.dumps(bench(run, engine, series, args.quiet_seconds, tmp / engine)), flush=True)


if __name__ == "__main__":
    main()
