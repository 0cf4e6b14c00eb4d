"""Estimate the CT window the IQ-OTH/NCCD JPEGs were rendered at (evidence for docs/window.md).

    python scripts/estimate_window.py [DATA] [--limit N] [--json FILE]

The JPEGs carry no Hounsfield units, so the window is inferred from what known tissues look like:
air outside the body and lung parenchyma (-1000 / -800 HU), subcutaneous fat (~ -100 HU), soft
tissue (muscle, heart, mediastinum, tumour: ~ +40 HU) and bone (trabecular ~ +250..+400 HU,
cortex >= +700 HU). Per image it measures

1. the grey-level histogram: the fraction of pixels at 0 (<= 9 after JPEG ringing), in the
   band 10..120 (what a linear window puts soft tissue and fat into) and above, the quantiles of
   the bright pixels against a uniform distribution on 128..255, and the saturated fraction (255);
2. tissue classes inside the body (convex hull of the body's bright structures, the scanner table
   left out), from the local density of bright pixels in a 15x15 neighbourhood: black (lung, fat,
   d < 0.05), speckled (tissue whose HU straddles the black/bright threshold, 0.1 <= d < 0.85) and
   solid bright (bone, d >= 0.85);
3. what the model sees: grey levels averaged over 4x4 blocks (512 px -> 128 px, the main job's
   image size), per class: m_soft (median over speckled pixels) and m_bone (90th percentile over
   bright pixels).

The window fit: a linear window maps soft tissue (+40 HU) to m_soft and bone (+400 HU, vertebral
body and ribs including partial volume) to m_bone; `lo = 40 - m_soft / slope`, the width is
255 / slope. Images where no soft tissue is visible (speckled class under 10 % of the body: the
"bone window" images) are counted and reported, not fitted. A check with pydicom's CT_small.dcm
compares the candidate windows' rendering with the training images' profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

HU_SOFT, HU_BONE, HU_FAT = 40.0, 400.0, -100.0
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "iqothnccd"


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def body_mask(bright: np.ndarray) -> np.ndarray:
    """Convex hull of the bright structures of the body, without the scanner table.

    Table arcs are wide (> 35 % of the width), flat (< 12 % of the height) components in the lower
    part of the frame; what remains (ribs, spine, sternum, speckled soft tissue) outlines the chest.
    """
    from skimage.morphology import convex_hull_image

    h, w = bright.shape
    closed = ndi.binary_closing(bright, structure=_disk(3))
    lab, n = ndi.label(closed)
    keep = np.zeros_like(bright)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        height, width = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if width > 0.35 * w and height < 0.12 * h and sl[0].start > 0.5 * h:
            continue  # the table
        comp = lab[sl] == i
        if comp.sum() < 30:
            continue  # specks outside the body
        keep[sl] |= comp
    if keep.sum() < 100:
        return np.zeros_like(bright)
    return convex_hull_image(keep)


def measure(grey: np.ndarray) -> dict:
    a = grey.astype(np.float64)
    n = grey.size
    bright = grey >= 64  # the histogram has no pixels 10..120: anything above 64 is "bright"
    nz = grey[bright]
    out = {
        "black": float((grey <= 9).mean()),
        "band_10_120": float(((grey >= 10) & (grey <= 120)).mean()),
        "bright": float(bright.mean()),
        "sat255_of_bright": float((nz >= 255).mean()) if nz.size else 0.0,
    }
    if nz.size:
        q = np.percentile(nz, [5, 25, 50, 75, 95])
        out.update({f"bright_q{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), q)})
        # Kolmogorov-Smirnov distance of the bright grey levels to uniform on 128..255
        levels = np.arange(256)
        cdf = np.cumsum(np.bincount(nz, minlength=256)) / nz.size
        uni = np.clip((levels - 127) / 128.0, 0, 1)
        out["ks_to_uniform"] = float(np.abs(cdf - uni).max())
    body = body_mask(bright)
    if body.sum() < 0.02 * n:
        out["body"] = 0.0
        return out
    d = ndi.uniform_filter(bright.astype(np.float64), 15)
    m = ndi.uniform_filter(a, 4)  # the grey level a 128 px model sees (4x4 block average)
    black = body & (d < 0.05)
    speck = body & (d >= 0.1) & (d < 0.85)
    solid = body & (d >= 0.85)
    nb = body.sum()
    out.update({
        "body": float(nb / n),
        "body_black": float(black.sum() / nb),
        "body_speckled": float(speck.sum() / nb),
        "body_solid": float(solid.sum() / nb),
        "soft_density": float(np.median(d[speck])) if speck.any() else None,
        "m_soft": float(np.median(m[speck])) if speck.any() else None,
        "m_bone": float(np.percentile(m[solid], 90)) if solid.sum() >= 20 else None,
    })
    return out


def fit_window(m_soft: float, m_bone: float) -> tuple[float, float] | None:
    """(level, width) of the linear window mapping HU_SOFT -> m_soft and HU_BONE -> m_bone."""
    if m_bone <= m_soft:
        return None
    slope = (m_bone - m_soft) / (HU_BONE - HU_SOFT)  # grey levels per HU
    lo = HU_SOFT - m_soft / slope
    width = 255.0 / slope
    return lo + width / 2.0, width


def ct_small_check(windows: dict[str, tuple[float, float]], train: dict) -> dict:
    """Render pydicom's CT_small.dcm (a real chest slice around the spine) at each window and
    compare its tissue-class grey levels with the training images' medians."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lungcad.dicom.reader import window_to_uint8

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu_s = ndi.uniform_filter(hu, 3)
    tissue = {"fat": (hu_s > -150) & (hu_s < -60), "soft": (hu_s > 20) & (hu_s < 70), "bone": hu_s > 300}
    res = {"tissue_hu_median": {k: float(np.median(hu[v])) for k, v in tissue.items()}}
    for name, (level, width) in windows.items():
        g = window_to_uint8(hu, level, width).astype(np.float64)
        res[name] = {k: round(float(np.median(g[v])), 1) for k, v in tissue.items()}
    res["training_images"] = {"fat": 0.0, "soft": train.get("m_soft"), "bone": train.get("m_bone")}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (sorted), 0 = all")
    ap.add_argument("--json", metavar="FILE", help="write per-image measurements and the summary")
    args = ap.parse_args(argv)
    files = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"no images under {args.data}", file=sys.stderr)
        return 1
    rows = []
    for p in files:
        with Image.open(p) as im:
            grey = np.asarray(im.convert("L"))
        r = measure(grey)
        r["file"] = str(p.relative_to(args.data))
        r["size"] = f"{grey.shape[1]}x{grey.shape[0]}"
        fit = None
        if r.get("body_speckled", 0) >= 0.10 and r.get("m_soft") is not None and r.get("m_bone") is not None:
            fit = fit_window(r["m_soft"], r["m_bone"])
        r["level"], r["width"] = (round(fit[0], 1), round(fit[1], 1)) if fit else (None, None)
        rows.append(r)

    def spread(key: str, subset=rows) -> dict:
        v = np.array([r[key] for r in subset if r.get(key) is not None], dtype=np.float64)
        if not v.size:
            return {"n": 0}
        q = np.percentile(v, [5, 25, 50, 75, 95])
        return {"n": int(v.size), "p5": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4]}

    keys = ["black", "band_10_120", "bright", "sat255_of_bright", "bright_q25", "bright_q50", "bright_q75",
            "ks_to_uniform", "body", "body_black", "body_speckled", "body_solid", "soft_density", "m_soft", "m_bone",
            "level", "width"]
    summary = {k: spread(k) for k in keys}
    fitted = [r for r in rows if r["level"] is not None]
    summary["images"] = len(rows)
    summary["fitted"] = len(fitted)
    summary["no_soft_tissue_visible"] = sum(r.get("body_speckled", 0) < 0.10 for r in rows)
    med = {k: float(summary[k]["median"]) for k in ("m_soft", "m_bone") if summary[k]["n"]}
    chosen = fit_window(med["m_soft"], med["m_bone"]) if len(med) == 2 else None
    summary["window_from_median_greys"] = chosen
    windows = {"lung -600,1500": (-600.0, 1500.0), "soft tissue 40,400": (40.0, 400.0)}
    if chosen:
        windows[f"fitted {chosen[0]:.0f},{chosen[1]:.0f}"] = chosen
    summary["ct_small"] = ct_small_check(windows, med)

    by_folder: dict[str, list[dict]] = {}
    for r in rows:
        by_folder.setdefault(str(Path(r["file"]).parent), []).append(r)
    summary["by_folder"] = {
        folder: {"images": len(rs), "no_solid_bone": sum(r.get("body_solid", 1.0) < 0.002 for r in rs),
                 "level_median": spread("level", rs).get("median"), "width_median": spread("width", rs).get("median")}
        for folder, rs in sorted(by_folder.items())
    }

    print(f"{len(rows)} images, {len(fitted)} fitted ({summary['no_soft_tissue_visible']} show no soft tissue)")
    print(f"{'measure':<18} {'p5':>8} {'p25':>8} {'median':>8} {'p75':>8} {'p95':>8}")
    for k in keys:
        s = summary[k]
        if s["n"]:
            print(f"{k:<18} " + " ".join(f"{s[q]:8.3f}" for q in ("p5", "p25", "median", "p75", "p95")))
    if chosen:
        print(f"window from the median grey levels: level {chosen[0]:.0f} HU, width {chosen[1]:.0f} HU "
              f"(--window={chosen[0]:.0f},{chosen[1]:.0f})")
    for folder, v in summary["by_folder"].items():
        print(f"{folder}: {v['images']} images, {v['no_solid_bone']} without solid bone, fitted window "
              f"median {v['level_median'] or float('nan'):.0f},{v['width_median'] or float('nan'):.0f}")
    for name, v in summary["ct_small"].items():
        print(f"CT_small {name}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "images": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
