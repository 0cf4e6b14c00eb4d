"""The appearance check alone, per shift and per simulated site: no trained model needed.

`ood_shifts.py` measures the whole `ood` decision of a trained fold ensemble. The appearance half of
that decision depends only on the training images' profile (`lungcad.inference.appearance`), so it
can be measured, and a change to it judged, without training anything: on the data's own grouped
folds (the split `lungcad train --folds K --seed S` makes), each fold's images are checked against
the profile fitted on the other folds' prepared images, as member k's contract holds it, with the
decoded pixels given as `predict` gives them. The shifts are `ood_shifts.SHIFTS`, applied before the
shared preprocessing path. On the same images and folds the per-image rates equal the appearance
column of `ood_shifts.py` (checked on the 224 px main job: 0.1 / 2.3 / 0.5 / 95.2 / 97.6 % for
clean, contrast x0.85, gamma 0.67, blur, lower resolution).

Sites, as `ood_shifts.py --sites` draws them: every slice of N random patient proxies, judged by
`check`'s appearance rule (`site_check.compare_appearance`: a statistic differs when the site's
typical value leaves the training 5th-95th percentile range) against the ensemble's profile (fold
1's, as `train --folds` stores it), the typical value being the median over the site's images and
the median of its patients' medians (each patient once, as `check` does since stop 17). The clean
rows are other patients of the training hospital: their rates are false alarms.

`--drop STAT...` also reports everything with those statistics left out of the profile (as a
contract written before they existed is checked): the ablation of a statistic.

    python benchmarks/appearance_shifts.py [--data DIR] [--image-size 224] [--window 195,480] [--folds 5]
                                           [--sites 5 10 25] [--site-draws 1000] [--drop dim] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lungcad.data.discovery import discover
from lungcad.data.grouping import assign_groups, scan_images
from lungcad.data.images import decode_image
from lungcad.data.transforms import Preprocessing, prepare
from lungcad.inference import appearance
from lungcad.inference.site_check import compare_appearance
from lungcad.training.config import TrainConfig
from lungcad.training.crossval import fold_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_shifts import SHIFTS  # noqa: E402

from _machine import detect  # noqa: E402

PER_IMAGE_SHIFTS = [name for name in SHIFTS if name != "tiny (24 px)"]  # 24 px: refused by size, not appearance
SITE_MEDIANS = ("images", "patients")  # the site's typical value: median of its images, or of its patients' medians


def _without(profile: dict, drop: list[str]) -> dict:
    return {**profile, "features": {k: v for k, v in profile["features"].items() if k not in drop}}


def grouped_folds(data: Path, folds: int, seed: int, val_fraction: float = 0.0) -> tuple[list, np.ndarray, list]:
    """(readable samples, their patient proxies, one subset array per fold) as `train --folds K --seed S`
    makes them (`lungcad.training.crossval.cross_validate`)."""
    samples = discover(data)
    infos, _ = scan_images(samples, progress=False)
    groups_all = assign_groups(samples, infos)
    keep = sorted(i.index for i in infos)
    samples = [samples[i] for i in keep]
    groups = np.array([groups_all[i] for i in keep])
    return samples, groups, fold_splits(np.array([s.label for s in samples]), groups, folds, val_fraction, seed)


def measure(data: Path, image_size: int, window: str | None, folds: int, seed: int, sizes: list[int], draws: int,
            drop: list[str]) -> dict:
    samples, groups, subsets = grouped_folds(data, folds, seed)
    fold = np.zeros(len(samples), dtype=int)
    for k, subset in enumerate(subsets, 1):
        fold[subset == "test"] = k
    pp = Preprocessing(image_size=image_size).with_window(window)
    raws = [decode_image(s.path, pp.colour) for s in samples]
    cache = torch.stack([prepare(r, pp) for r in raws])
    arms = {"profile": {k: appearance.fit_profile(cache[fold != k]) for k in range(1, folds + 1)}}
    if drop:
        arms["without " + ", ".join(drop)] = {k: _without(p, drop) for k, p in arms["profile"].items()}
    rng = np.random.default_rng(0)
    rows, stats = [], {}
    for name in ["clean", *PER_IMAGE_SHIFTS]:
        t0 = time.perf_counter()
        shift = SHIFTS[name][0] if name != "clean" else None
        flags = {arm: np.zeros(len(raws), dtype=bool) for arm in arms}
        reasons: dict[str, int] = {}
        prepared = []
        for i, raw in enumerate(raws):
            pixels = shift(raw, rng) if shift else raw
            x = prepare(pixels, pp)
            prepared.append(x)
            for arm, profiles in arms.items():
                found = appearance.check(pixels, x, profiles[fold[i]], pp)
                flags[arm][i] = bool(found)
                if arm == "profile":
                    for r in found:
                        reasons[r.split(" (")[0]] = reasons.get(r.split(" (")[0], 0) + 1
        stats[name] = appearance.features(torch.stack(prepared))
        rows.append({"shift": name, "n": len(raws), **{f"flagged [{arm}]": float(f.mean()) for arm, f in flags.items()},
                     "reasons": reasons})
        print(f"{name}: " + ", ".join(f"{arm} {100 * f.mean():.1f} %" for arm, f in flags.items())
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    patients = np.unique(groups)
    sites = []
    for name, st in stats.items():
        for n in sizes:
            draw = np.random.default_rng(seed)
            hits = {(arm, by): 0 for arm in arms for by in SITE_MEDIANS}
            for _ in range(draws):
                site = np.isin(groups, draw.choice(patients, size=min(n, len(patients) - 1), replace=False))
                values = {k: v[site] for k, v in st.items()}
                for arm, profiles in arms.items():
                    for by in SITE_MEDIANS:
                        found = compare_appearance(values, profiles[1], groups[site] if by == "patients" else None)
                        hits[arm, by] += bool(found["differs"])
            sites.append({"shift": name, "patients": n, "draws": draws,
                          **{f"differs [{arm}, median over {by}]": h / draws for (arm, by), h in hits.items()}})
    return {"data": str(data), "cpu": detect().cpu, "image_size": image_size, "window": window, "folds": folds,
            "seed": seed, "images": len(raws), "patients": int(len(patients)), "arms": list(arms),
            "per_image": rows, "sites": sites}


def markdown(result: dict) -> str:
    arms = result["arms"]
    site_cols = [k for k in result["sites"][0] if k.startswith("differs [")]
    sizes = "/".join(str(s["patients"]) for s in result["sites"] if s["shift"] == "clean")
    lines = ["| input | " + " | ".join(f"flagged per image ({a})" for a in arms) + " | "
             + " | ".join(f"site {c}, {sizes} patients" for c in site_cols) + " |",
             "|---|" + "---|" * (len(arms) + len(site_cols))]
    for row in result["per_image"]:
        site = [s for s in result["sites"] if s["shift"] == row["shift"]]
        cells = [f"{100 * row[f'flagged [{a}]']:.1f} %" for a in arms]
        cells += [" / ".join(f"{100 * s[c]:.0f}%" for s in site) for c in site_cols]
        lines.append(f"| {row['shift']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/iqothnccd")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--window", default="195,480", help="the training window declared for the data (default 195,480)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed, help="the split's seed (train's default)")
    ap.add_argument("--sites", nargs="+", type=int, default=[5, 10, 25], metavar="N")
    ap.add_argument("--site-draws", type=int, default=1000)
    ap.add_argument("--drop", nargs="+", default=[], metavar="STAT", help="also measure without these statistics")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = measure(args.data, args.image_size, args.window, args.folds, args.seed, args.sites, args.site_draws,
                     args.drop)
    print(f"CPU: {result['cpu']}; {result['images']} images, {result['patients']} patient proxies, "
          f"{args.folds} folds, {args.image_size} px")
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
