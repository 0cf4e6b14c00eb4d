"""What re-fitting the operating point on a site's labelled cases recovers: `lungcad calibrate`, measured.

The site is fold `--fold` of the main job's grouped folds (`fold_splits(..., K, 0.15, seed)`: the
same patients `train --folds K --seed S` holds out). A single model is trained on the other folds,
less the 15 % validation carve that gives it an operating point of its own. The site is then used
as is, or re-rendered by `ood_shifts.SHIFTS` (e.g. contrast x0.85, the lung window). The shifted
slices are saved as PNG under their original names, in class folders, so that the site's patients
are inferred as `evaluate --data` infers them. Per site: `lungcad calibrate MODEL SITE`, which prints
the source's operating point and the re-fitted one cross-fitted over the site's patients. With
`--adapt SHIFT...`, also `lungcad adapt MODEL SITE` first for those sites.

    python benchmarks/site_calibration.py --work DIR [--data DATA] [--fold 1] [--folds 5] [--image-size 128]
        [--epochs 12] [--shifts "contrast x0.85" "lung window (simulated)"] [--adapt "lung window (simulated)"]

The model is trained once into WORK/model (reused when it is there). Results: WORK/cal-*/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lungcad.cli import main as lungcad_main
from lungcad.data.images import decode_image
from lungcad.data.split import SplitRow, read_split, write_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from appearance_shifts import grouped_folds  # noqa: E402
from ood_shifts import SHIFTS  # noqa: E402

VAL_FRACTION = 0.15


def write_fold_split(data: Path, out: Path, fold: int, folds: int, seed: int) -> None:
    """split.csv: fold `fold` is the test subset (the site), a validation carve of the rest, the rest training."""
    samples, groups, subsets = grouped_folds(data, folds, seed, VAL_FRACTION)
    subset = subsets[fold - 1]
    write_split(out, [SplitRow(s.path, s.label, g, sub) for s, g, sub in zip(samples, groups, subset)], data)


def build_site(data: Path, split: Path, shift: str | None, out: Path) -> None:
    rng = np.random.default_rng(0)
    for row in (r for r in read_split(split, root=data) if r.subset == "test"):
        pixels = decode_image(row.path, "grey")
        pixels = SHIFTS[shift][0](pixels, rng) if shift else pixels
        dst = out / row.path.relative_to(data).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(dst)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/iqothnccd")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--window", default="195,480")
    ap.add_argument("--shifts", nargs="*", default=["contrast x0.85", "lung window (simulated)"], choices=list(SHIFTS))
    ap.add_argument("--adapt", nargs="*", default=["lung window (simulated)"], choices=list(SHIFTS))
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    split, model = work / "split.csv", work / "model"
    if not split.exists():
        write_fold_split(args.data, split, args.fold, args.folds, args.seed)
    if not (model / "model.json").exists():
        status = lungcad_main(["train", "--data", str(args.data), "--split", str(split), "--out", str(model),
                               "--pretrained", "none", "--image-size", str(args.image_size), "--epochs",
                               str(args.epochs), "--batch-size", "32", "--lr", "0.0015", f"--window={args.window}",
                               "--no-progress"])
        if status:
            return status
    results = {}
    for shift in [None, *args.shifts]:
        name = _slug(shift or "clean")
        site = work / f"site-{name}"
        if not site.exists():
            build_site(args.data, split, shift, site)
        runs = [(model, f"cal-{name}")]
        if shift in args.adapt:
            adapted = work / f"adapt-{name}"
            if not adapted.exists() and lungcad_main(["adapt", str(model), str(site), "--out", str(adapted),
                                                      "--no-progress"]):
                return 1
            runs.append((adapted, f"cal-adapt-{name}"))
        for source, out in runs:
            if not (work / out).exists():
                print(f"== {out}", flush=True)
                if lungcad_main(["calibrate", str(source), str(site), "--out", str(work / out), "--no-progress"]):
                    return 1
            results[out] = json.loads((work / out / "calibration.json").read_text())
    (work / "site_calibration.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
