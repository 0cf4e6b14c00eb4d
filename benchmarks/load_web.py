"""Bounded load test of `lungcad serve` on loopback: N concurrent clients upload CT slices and post
feedback for a fixed time; reports throughput, p50/p95 latency, errors, and checks that every
acknowledged feedback row is in the database. Compares with the offline engine's batch rate.

    python benchmarks/load_web.py --run RUNDIR [--clients 8 32] [--seconds 60] [--data DIR] [--db URL]

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
        img = images[i % len(images)]
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


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run folder")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="images to upload (default: shared IQ-OTH/NCCD)")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each level (bounded)")
    ap.add_argument("--db", help="database URL (default SQLite in a temp data folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    run = Path(args.run)
    images = load_images(Path(args.data))
    data_dir = Path(tempfile.mkdtemp(prefix="lungcad-load-"))
    extra = ["--data-dir", str(data_dir)] + (["--db", args.db] if args.db else [])
    lungcad = [sys.executable, "-m", "lungcad"]
    subprocess.run([*lungcad, "users", "add", "load", "--role", "clinician", "--password", PASSWORD, *extra], check=True)
    token = subprocess.run([*lungcad, "users", "token", "load", *extra], check=True, capture_output=True,
                           text=True).stdout.strip()

    print("offline batch rate (eager torch, batch 32) ...", flush=True)
    batch_rate = offline_batch_rate(run, images)
    print(f"  {batch_rate:.2f} images/s", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = open(data_dir / "serve.log", "wb")
    print(f"server log: {data_dir / 'serve.log'}", flush=True)
    server = subprocess.Popen([*lungcad, "serve", str(run), "--port", str(port), *extra],
                              stdout=server_log, stderr=subprocess.STDOUT)
    results = []
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
        for n in args.clients:
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
    finally:
        server.terminate()
        server.wait(timeout=30)

    # Every acknowledged read must be in the database.
    from sqlalchemy import select

    from lungcad.web.db import Read, open_database

    _, sessions = open_database(args.db, data_dir)
    with sessions() as s:
        stored = set(s.scalars(select(Read.id)))
    acked = {i for r in results for i in r["acked"]}
    missing = acked - stored
    print(f"feedback acknowledged {len(acked)}, in database {len(acked & stored)}, missing {len(missing)}")
    summary = {"offline_batch_rate": round(batch_rate, 2), "levels": [r["summary"] for r in results],
               "feedback_missing": len(missing), "median_predict_ms_all": round(
                   statistics.median([x for r in results for x in r["predict"]]) * 1000) if results else None}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if missing or any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
