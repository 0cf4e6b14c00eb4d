"""Scaling benchmark: `lungcad train` in 1 process vs. 2 gloo processes under torchrun (CPU).

On a 2-core machine two processes share the same two cores (1 thread each instead of 2 threads in
one process), so little or no gain is expected; the point is that the scaling path is measured.
Trains `--epochs` epochs on a manifest of real images (default: 160 images of IQ-OTH/NCCD) with
the same global batch, and reads training images/s from each run's history.csv (epoch 1 excluded
when there are more, as it includes warm-up).

    python benchmarks/bench_distributed.py [--data ../shared/data/iqothnccd] [--image-size 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(run: Path) -> float:
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    rows = rows[1:] if len(rows) > 1 else rows
    return sum(float(r["images_per_second"]) for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iqothnccd"))
    ap.add_argument("--images", type=int, default=160, help="images taken from the data folder")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from lungcad.data.discovery import discover

    samples = discover(args.data)
    step = max(1, len(samples) // args.images)
    with tempfile.TemporaryDirectory(prefix="lungcad-ddp-bench-") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.csv"
        with open(manifest, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label"])
            for s in samples[::step][: args.images]:
                w.writerow([str(s.path.resolve()), s.label])
        common = ["train", "--data", str(manifest), "--pretrained", "none", "--image-size", str(args.image_size),
                  "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--patience", "99",
                  "--no-progress", "--seed", "0"]
        results = {}
        for name, prefix, threads in [
            ("1 process x 2 threads", [sys.executable, "-m", "lungcad"], "2"),
            ("2 processes x 1 thread (torchrun, gloo)",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "lungcad"], "1"),
        ]:
            run = tmp / name.split()[0]
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            proc = subprocess.run([*prefix, *common, "--out", str(run)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name] = round(images_per_second(run), 2)
            print(f"{name:<42}{results[name]:>8.2f} train img/s", flush=True)
        if len(results) == 2:
            a, b = results.values()
            print(f"speed-up of 2 processes over 1: {b / a:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), "images_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
