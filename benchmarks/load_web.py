"""Bounded load test of `lungcad serve` on loopback, two workloads:

- images: N concurrent clients upload CT slices (each upload distinct bytes, so none is an
  idempotent repeat) and post feedback for a fixed time; reports throughput, p50/p95 latency,
  errors, and checks that every acknowledged feedback row is in the database. Compares with the
  offline engine's batch rate.
- series: `--series-clients` clients each upload `--series-rounds` DICOM series of `--slices`
  slices (pydicom's CT_small.dcm with distinct Study/Series/SOP UIDs and pixels) in one request to
  POST /api/uploads; reports series/s, p50/p95 time to the series result (the response carries
  it), errors, and rows lost (acknowledged images missing from the database).

    python benchmarks/load_web.py --run RUNDIR [--mode images series] [--clients 8 32] [--seconds 60]
                                  [--series-clients 4] [--slices 100] [--series-rounds 2] [--data DIR] [--db URL]

Only 127.0.0.1 is ever contacted; every loop is bounded in time. Figures on a shared 2-core
machine are noisy: run it when the machine is otherwise idle and report the spread. The client
shares the cores with the server: `server_cores` and `client_cores` say how much CPU each used
(CPU-seconds per second), so the client's share of the budget is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "iqothnccd"
PASSWORD = "load-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_images(data: Path, n: int = 32) -> list[bytes]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        sys.exit(f"no images under {data}")
    step = max(1, len(files) // n)
    return [p.read_bytes() for p in files[::step][:n]]


def offline_batch_rate(run: Path, images: list[bytes], batch: int = 32, seconds: float = 20.0) -> float:
    """Images/s of the eager torch engine on full batches (decode + preprocess excluded), the offline ceiling."""
    import torch

    from lungcad.data.images import decode_image
    from lungcad.data.transforms import preprocess
    from lungcad.inference.engines import TorchEngine
    from lungcad.models.contract import load_model

    model, contract = load_model(run)
    pp = contract.preprocessing
    x = torch.stack([preprocess(decode_image(b, pp.colour), pp) for b in (images * batch)[:batch]]).numpy()
    engine = TorchEngine(model)
    engine.run(x[:2])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.run(x)
        done += len(x)
    return done / (time.perf_counter() - start)


async def client_loop(client: httpx.AsyncClient, images: list[bytes], deadline: float, idx: int, stats: dict) -> None:
    i = idx
    while time.monotonic() < deadline:
        # distinct bytes (trailing data after the image's end marker, which decoders ignore): the same
        # bytes twice would be an idempotent repeat, answered without inference
        img = images[i % len(images)] + f"load-{idx}-{i}".encode()
        i += 1
        t0 = time.perf_counter()
        try:
            r = await client.post("/api/predict", files={"file": ("slice.jpg", img, "image/jpeg")})
        except httpx.HTTPError as exc:
            stats["errors"].append(f"predict: {type(exc).__name__}")
            continue
        stats["predict"].append(time.perf_counter() - t0)
        if r.status_code != 201:
            stats["errors"].append(f"predict {r.status_code}: {r.text[:120]}")
            continue
        study = r.json()
        t0 = time.perf_counter()
        try:
            r = await client.post("/api/feedback", json={
                "study_id": study["id"], "label": study["label"], "confidence": 1 + i % 5,
                "comment": f"load client {idx}",  # agree is derived (migration 0006); one read per reader and study
            })
        except httpx.HTTPError as exc:
            stats["errors"].append(f"feedback: {type(exc).__name__}")
            continue
        stats["feedback"].append(time.perf_counter() - t0)
        if r.status_code in (200, 201):  # 201 a new read, 200 a revision of the reader's read
            stats["acked"].append(r.json()["id"])
        else:
            stats["errors"].append(f"feedback {r.status_code}: {r.text[:120]}")


async def run_load(base: str, token: str, images: list[bytes], clients: int, seconds: float) -> dict:
    stats: dict = {"predict": [], "feedback": [], "errors": [], "acked": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(120.0), limits=limits) as client:
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(*(client_loop(client, images, deadline, k, stats) for k in range(clients)))
        elapsed = time.monotonic() - start
    return {"clients": clients, "seconds": round(elapsed, 1), **stats}


def ct_series(slices: int, seed: int) -> list[bytes]:
    """A DICOM series from pydicom's CT_small.dcm: distinct Study/Series/SOP UIDs and pixels per slice."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = base.pixel_array.astype(np.int32)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, slices + 1):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k
        arr = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 4000)
        ds.PixelData = arr.astype(base.pixel_array.dtype).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


async def series_client(client: httpx.AsyncClient, series_files: list[list[bytes]], slices: int, stats: dict) -> None:
    for instances in series_files:
        files = [("files", (f"IM{j:04d}.dcm", raw, "application/dicom")) for j, raw in enumerate(instances)]
        t0 = time.perf_counter()
        try:
            r = await client.post("/api/uploads", files=files)
        except httpx.HTTPError as exc:
            stats["errors"].append(f"series upload: {type(exc).__name__}")
            continue
        seconds = time.perf_counter() - t0
        if r.status_code != 201:
            stats["errors"].append(f"series upload {r.status_code}: {r.text[:120]}")
            continue
        body = r.json()
        created = [f["image_id"] for f in body["files"] if f["status"] == "created"]
        bad = [f for f in body["files"] if f["status"] != "created"]
        stats["errors"].extend(f"file {f['index']}: {f['status']} {f['error'][:80]}" for f in bad)
        series = [s for e in body["studies"] for s in e["series"]]
        if len(series) != 1 or series[0]["images_count"] != slices or not series[0]["label"]:
            stats["errors"].append(f"series result: {[(s['images_count'], s['label']) for s in series]}")
        stats["series"].append(seconds)
        stats["acked"].extend(created)


async def run_series(base: str, token: str, clients: int, rounds: int, slices: int) -> dict:
    stats: dict = {"series": [], "errors": [], "acked": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # built before the clock starts (the client's own work is not the server's throughput)
    series_files = [[ct_series(slices, 1000 * k + r) for r in range(rounds)] for k in range(clients)]
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(1800.0), limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(series_client(client, series_files[k], slices, stats) for k in range(clients)))
        elapsed = time.monotonic() - start
    return {"clients": clients, "seconds": round(elapsed, 1), **stats}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run folder")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="images to upload (default: shared IQ-OTH/NCCD)")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each level (bounded)")
    ap.add_argument("--mode", nargs="+", choices=["images", "series"], default=["images", "series"])
    ap.add_argument("--series-clients", type=int, default=4)
    ap.add_argument("--slices", type=int, default=100, help="slices per series (series mode)")
    ap.add_argument("--series-rounds", type=int, default=2, help="series each client uploads, one after another")
    ap.add_argument("--db", help="database URL (default SQLite in a temp data folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    run = Path(args.run)
    images = load_images(Path(args.data)) if "images" in args.mode else []
    data_dir = Path(tempfile.mkdtemp(prefix="lungcad-load-"))
    extra = ["--data-dir", str(data_dir)] + (["--db", args.db] if args.db else [])
    lungcad = [sys.executable, "-m", "lungcad"]
    subprocess.run([*lungcad, "users", "add", "load", "--role", "clinician", "--password", PASSWORD, *extra], check=True)
    token = subprocess.run([*lungcad, "users", "token", "load", *extra], check=True, capture_output=True,
                           text=True).stdout.strip()

    batch_rate = float("nan")
    if "images" in args.mode:
        print("offline batch rate (eager torch, batch 32) ...", flush=True)
        batch_rate = offline_batch_rate(run, images)
        print(f"  {batch_rate:.2f} images/s", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = open(data_dir / "serve.log", "wb")
    print(f"server log: {data_dir / 'serve.log'}", flush=True)
    server = subprocess.Popen([*lungcad, "serve", str(run), "--port", str(port), *extra],
                              stdout=server_log, stderr=subprocess.STDOUT)
    results, series_results = [], []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("server did not start")
            time.sleep(0.3)
        for n in args.clients if "images" in args.mode else []:
            cpu0 = cpu_seconds(server.pid), time.process_time()
            res = asyncio.run(run_load(base, token, images, n, args.seconds))
            server_cpu, client_cpu = cpu_seconds(server.pid) - cpu0[0], time.process_time() - cpu0[1]
            throughput = len(res["predict"]) / res["seconds"]
            res["summary"] = {
                "clients": n, "uploads": len(res["predict"]), "feedback_acked": len(res["acked"]),
                "throughput_uploads_per_s": round(throughput, 2),
                "predict_p50_ms": round(pct(res["predict"], 50)), "predict_p95_ms": round(pct(res["predict"], 95)),
                "feedback_p50_ms": round(pct(res["feedback"], 50)), "feedback_p95_ms": round(pct(res["feedback"], 95)),
                "errors": len(res["errors"]), "vs_offline_batch_rate": round(throughput / batch_rate, 3),
                # Where the 2 cores went (the client shares them): CPU-seconds per second of the run.
                "server_cores": round(server_cpu / res["seconds"], 2), "client_cores": round(client_cpu / res["seconds"], 2),
            }
            print(json.dumps(res["summary"]), flush=True)
            for e in res["errors"][:5]:
                print("  error:", e)
            results.append(res)
        if "series" in args.mode:
            cpu0 = cpu_seconds(server.pid)
            res = asyncio.run(run_series(base, token, args.series_clients, args.series_rounds, args.slices))
            server_cpu = cpu_seconds(server.pid) - cpu0
            res["summary"] = {
                "clients": args.series_clients, "slices_per_series": args.slices, "series": len(res["series"]),
                "series_per_s": round(len(res["series"]) / res["seconds"], 3),
                "slices_per_s": round(len(res["acked"]) / res["seconds"], 1),
                "time_to_series_result_p50_s": round(pct(res["series"], 50) / 1000, 2),
                "time_to_series_result_p95_s": round(pct(res["series"], 95) / 1000, 2),
                "errors": len(res["errors"]), "server_cores": round(server_cpu / res["seconds"], 2),
            }
            print(json.dumps(res["summary"]), flush=True)
            for e in res["errors"][:5]:
                print("  error:", e)
            series_results.append(res)
    finally:
        server.terminate()
        server.wait(timeout=30)

    # Every acknowledged read must be in the database.
    from sqlalchemy import select

    from lungcad.web.db import Image, Read, open_database

    _, sessions = open_database(args.db, data_dir)
    with sessions() as s:
        stored = set(s.scalars(select(Read.id)))
        stored_images = set(s.scalars(select(Image.id)))
    acked = {i for r in results for i in r["acked"]}
    missing = acked - stored
    print(f"feedback acknowledged {len(acked)}, in database {len(acked & stored)}, missing {len(missing)}")
    acked_images = {i for r in series_results for i in r["acked"]}
    lost = acked_images - stored_images
    if series_results:
        series_results[0]["summary"]["rows_lost"] = len(lost)
        print(f"series images acknowledged {len(acked_images)}, in database {len(acked_images & stored_images)}, "
              f"lost {len(lost)}")
    summary = {"offline_batch_rate": round(batch_rate, 2), "levels": [r["summary"] for r in results],
               "series": [r["summary"] for r in series_results],
               "feedback_missing": len(missing), "median_predict_ms_all": round(
                   statistics.median([x for r in results for x in r["predict"]]) * 1000) if results else None}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if missing or lost or any(r["errors"] for r in [*results, *series_results]):
        sys.exit(1)


if __name__ == "__main__":
    main()
