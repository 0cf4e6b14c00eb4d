"""How well does the out-of-distribution flag separate shifted images from new in-distribution ones?

For a fold ensemble (`lungcad train --folds K`), every development image is scored by the one
member that never saw it, so "clean" images are honest stand-ins for new patients of the training
hospital. Each shift below is applied to the decoded pixels *before* the shared preprocessing path
(`prepare`: foreground crop, pad, resize), exactly where a differently rendered export would enter:

- controls that should not be flagged: a horizontal flip, a mildly different window width;
- other exports of the same slice: gamma 0.67 / 1.5, a wider window (contrast x0.6), noise, blur,
  a 4x lower resolution, an inverted grey scale (MONOCHROME1 read as MONOCHROME2);
- the lung window: the soft-tissue JPEG mapped back to HU (its declared window, black = -900 HU)
  and rendered at level -600 / width 1500, as a DICOM from a PACS would be by a lung-window viewer;
- the slice inside a screenshot (grey frame, burnt-in text), or shrunk to 24 px;
- other images: LC25000 histopathology tiles (RGB), natural images bundled with scikit-image,
  pydicom's MR test slice, blank frames (each scored by every member).

Thresholds are cross-fitted the way the ensemble is calibrated (`lungcad.inference.ood.
ensemble_ood_entry`): each member's score is divided by the median of its held-out clean images'
scores, and the images a member scores (its held-out fold, clean and shifted, and its share of the
external images) are judged against the 0.99 quantile of the *other* folds' normalised clean
scores, so no image helps set the threshold it is judged by. Reported per shift: flag rates of the feature score, of the appearance
check and of both combined (what predict reports as `ood`), the ROC-AUC of the feature score
(shifted vs clean), and the classifier's malignant-vs-rest ROC-AUC on the shifted images.

With `--sites N...`, the same images also simulate **whole sites** for `lungcad check`: a site is
N patient proxies drawn at random (`--site-draws` times) with every slice of theirs shifted (or
clean: another N patients of the training hospital, the check's false-alarm rate). Each draw is
judged by check's own rules (lungcad.inference.site_check): the flagged share above 5 % (its whole
95 % interval, the site's patients counted as clusters; also reported with slices counted as
independent, the rule before stop 18), the
stratified shift test of the OOD scores (each member's held-out site slices against that member's
held-out clean slices of the *other* patients; null: pseudo-sites of as many whole reference
patients as the site has; check infers them for PNG folders as training does) at alpha 0.01, and the site's
appearance statistics (the median of its patients' medians) against the training profile. Reported: the share of draws each rule and the
verdict call "does not match".

    python benchmarks/ood_shifts.py RUN [--histo DIR] [--shifts NAME...] [--per-fold N] [--json FILE] [--markdown]
                                    [--sites 5 10 20] [--site-draws 200] [--save-per-image FILE]
    python benchmarks/ood_shifts.py RUN --sites 5 10 25 --sites-from FILE   # re-judge saved sites, no scoring
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lungcad.data.images import decode_image
from lungcad.data.transforms import prepare
from lungcad.inference import appearance
from lungcad.inference.engines import TorchEngine
from lungcad.inference.forward import run_engine
from lungcad.inference.ood import ENSEMBLE_QUANTILE, OODDetector, OutOfFoldScores, cross_fitted_false_flags
from lungcad.inference.site_check import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_FLAGGED,
    compare_appearance,
    flagged_share,
    patient_shift_test,
)
from lungcad.models.contract import load_model
from lungcad.run import RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import detect  # noqa: E402

SOFT_WINDOW = (195.0, 480.0)  # IQ-OTH/NCCD's declared export window (docs/window.md)
LUNG_WINDOW = (-600.0, 1500.0)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _gamma(g: float):
    return lambda p, rng: _u8(255.0 * (p / 255.0) ** g)


def _contrast(c: float):
    return lambda p, rng: _u8(128.0 + c * (p.astype(np.float32) - 128.0))


def _noise(sigma: float):
    return lambda p, rng: _u8(p + rng.normal(0.0, sigma, p.shape))


def _blur(sigma: float):
    from torchvision.transforms.v2 import functional as F

    def f(p, rng):
        k = int(2 * round(3 * sigma) + 1)
        return F.gaussian_blur(torch.from_numpy(p)[None], [k, k], [sigma, sigma])[0].numpy()
    return f


def _lowres(factor: int):
    from PIL import Image

    def f(p, rng):
        im = Image.fromarray(p)
        small = im.resize((max(1, im.width // factor), max(1, im.height // factor)), Image.BILINEAR)
        return np.asarray(small.resize(im.size, Image.BILINEAR))
    return f


def _lung_window(p, rng):
    level, width = SOFT_WINDOW
    hu = level - width / 2 + p.astype(np.float32) * width / 255.0
    hu[p == 0] = -900.0  # below the export window: air and aerated lung
    lo = LUNG_WINDOW[0] - LUNG_WINDOW[1] / 2
    return _u8((hu - lo) / LUNG_WINDOW[1] * 255.0)


def _screenshot(p, rng):
    """The slice inside a viewer-like screenshot: a grey frame with text around it."""
    from PIL import Image, ImageDraw

    h, w = p.shape[:2]
    canvas = Image.new("L", (int(w * 1.5), int(h * 1.3)), 40)
    canvas.paste(Image.fromarray(p), (int(w * 0.25), int(h * 0.15)))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(("PATIENT NAME  ID 0000000", "CT CHEST  W:480 L:195", "Im: 42/120  5.0 mm")):
        draw.text((10, 10 + 14 * i), text, fill=230)
    return np.asarray(canvas)


def _tiny(p, rng):
    from PIL import Image

    return np.asarray(Image.fromarray(p).resize((24, 24), Image.BILINEAR))


SHIFTS = {  # name -> (pixel transform, expected: "control" | "shift")
    "hflip": (lambda p, rng: np.ascontiguousarray(p[:, ::-1]), "control"),
    "contrast x0.85": (_contrast(0.85), "control"),
    "gamma 0.67": (_gamma(0.67), "shift"),
    "gamma 1.5": (_gamma(1.5), "shift"),
    "contrast x0.6": (_contrast(0.6), "shift"),
    "noise sd 12": (_noise(12.0), "shift"),
    "blur sd 2": (_blur(2.0), "shift"),
    "4x lower resolution": (_lowres(4), "shift"),
    "inverted grey scale": (lambda p, rng: 255 - p, "shift"),
    "lung window (simulated)": (_lung_window, "shift"),
    "screenshot with text": (_screenshot, "shift"),
    "tiny (24 px)": (_tiny, "shift"),
}


def _external_sets(pp) -> dict[str, list[np.ndarray]]:
    """Images from elsewhere, scored by every member: natural images and an MR slice."""
    import skimage.data
    from pydicom.data import get_testdata_file

    from lungcad.dicom.reader import read_dicom

    natural = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "page", "text", "coins", "horse",
                 "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "clock", "colorwheel",
                 "logo", "shepp_logan_phantom"):
        im = np.asarray(getattr(skimage.data, name)())
        if im.dtype != np.uint8:  # bool or float images: stretch to 0-255
            im = im.astype(np.float64)
            im = _u8(255.0 * (im - im.min()) / max(float(im.max() - im.min()), 1e-6))
        if im.ndim == 3:
            im = im[..., :3] if pp.colour == "rgb" or im.shape[2] == 4 else im
        natural.append(im)
    mr = read_dicom(get_testdata_file("MR_small.dcm"), ct_window=pp.window).frames
    return {"natural images (scikit-image)": natural, "MR slice (pydicom MR_small)": mr}


def _prepare_all(raws: list[np.ndarray], pp, profile: dict) -> tuple[torch.Tensor, np.ndarray]:
    cache = torch.stack([prepare(r, pp) for r in raws])
    flagged = np.array([bool(appearance.check(r, c, profile, pp)) for r, c in zip(raws, cache)])
    return cache, flagged


def site_checks(sites: dict[str, dict], profile: dict, sizes: list[int], draws: int, seed: int = 0) -> list[dict]:
    """`lungcad check`'s verdict on simulated sites (module docstring). `sites[name]`: per image of
    the development set (same order for every name) its fold, group, normalised OOD score, combined
    flag and appearance statistics; "clean" is the reference."""
    clean = sites["clean"]
    patients, folds = np.unique(clean["group"]), np.unique(clean["fold"])
    out = []
    for n in sizes:
        for name, r in sites.items():
            rng = np.random.default_rng(seed)
            tally = {"flagged": 0, "flagged_images": 0, "shift": 0, "appearance": 0, "verdict": 0}
            for d in range(draws):
                chosen = rng.choice(patients, size=min(n, len(patients) - 1), replace=False)
                site = np.isin(r["group"], chosen)
                ref = ~np.isin(clean["group"], chosen)
                n_flagged, n_site = int(r["flag"][site].sum()), int(site.sum())
                per_patient = [(int(r["flag"][site & (r["group"] == g)].sum()), int((site & (r["group"] == g)).sum()))
                               for g in chosen]
                flagged = flagged_share(n_flagged, n_site, DEFAULT_MAX_FLAGGED, per_patient)["exceeds"]
                flagged_images = flagged_share(n_flagged, n_site, DEFAULT_MAX_FLAGGED)["exceeds"]  # slices independent
                test = patient_shift_test(  # the site's patients: its proxies, as check infers them for PNG folders
                    [r["ratio"][site & (r["fold"] == k)] for k in folds],
                    [(clean["ratio"][ref & (clean["fold"] == k)], clean["group"][ref & (clean["fold"] == k)])
                     for k in folds], site_patients=len(chosen), pseudo_sites=999, seed=d)
                shifted = bool(test.get("tested")) and test["p_value"] < DEFAULT_ALPHA
                looks = bool(compare_appearance({k: v[site] for k, v in r["app_stats"].items()}, profile,
                                                r["group"][site])["differs"])
                for key, hit in (("flagged", flagged), ("flagged_images", flagged_images), ("shift", shifted),
                                 ("appearance", looks),
                                 ("verdict", flagged or shifted or looks)):
                    tally[key] += int(hit)
            out.append({"shift": name, "patients": int(n), "draws": draws,
                        **{f"{k}_rate": v / draws for k, v in tally.items()}})
    return out


def _combined(ratio: np.ndarray, appearance_flag: np.ndarray) -> np.ndarray:
    """One OOD score for the combined decision: an appearance flag outranks any feature score."""
    return np.where(appearance_flag, 1e6 + ratio, ratio)


def _malignant_score(logits: np.ndarray, task: str, classes: list[str]) -> np.ndarray:
    if task == "binary":
        return logits[:, 0]
    x = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    return x[:, classes.index("malignant")]


def measure(run_dir: Path, histo: Path | None, histo_n: int, shifts: list[str] | None = None,
            per_fold: int | None = None, progress: bool = True, sites: list[int] | None = None,
            site_draws: int = 200) -> dict:
    run = RunFolder(run_dir)
    if not run.is_ensemble:
        raise SystemExit(f"{run_dir}: not a fold ensemble (train with --folds K); its images have no held-out member")
    oof = run.out_of_fold()
    members = {m.path.name: m for m in run.members()}
    rng = np.random.default_rng(0)
    external = _external_sets(run.contract().preprocessing)  # the members share the ensemble's preprocessing
    chosen = {n: SHIFTS[n] for n in (shifts or SHIFTS)}
    names = ["clean", *chosen, "blank frames", "natural images (scikit-image)", "MR slice (pydicom MR_small)"]
    names += ["histopathology (LC25000)"] if histo else []
    rows: dict[str, dict] = {n: {"ratio": [], "fold": [], "app": [], "mal": [], "y": [], "stats": []} for n in names}
    histo_files, clean_groups = [], []
    if histo:
        tiles = sorted(p for p in histo.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        histo_files = tiles[:: max(1, len(tiles) // histo_n)][:histo_n]
    for fold in sorted(set(int(f) for f in oof.folds)):
        t0 = time.perf_counter()
        member_dir = run.path / f"fold-{fold}"
        model, contract = load_model(member_dir)
        engine = TorchEngine(model)
        pp, profile, classes = contract.preprocessing, contract.appearance or {}, contract.classes
        base = OODDetector.load(member_dir, contract.ood)
        idx = np.flatnonzero(oof.folds == fold)
        if per_fold and len(idx) > per_fold:  # a random subset of the fold (same for every run on these folds)
            idx = np.sort(np.random.default_rng(fold).choice(idx, per_fold, replace=False))
        raws = [decode_image(oof.paths[i], pp.colour) for i in idx]
        y = np.array([oof.labels[i] == "malignant" for i in idx])
        clean_groups.extend(oof.groups[i] for i in idx)
        clean_cache, clean_app = _prepare_all(raws, pp, profile)
        clean_logits, clean_feats = run_engine(engine, clean_cache, pp)
        scale = float(np.median(base.score(clean_feats)))  # the member's scale, as ensemble_ood_entry sets it

        def add(name: str, logits, feats, app, labels, cache=None, _det=base, _scale=scale, _fold=fold,
                _task=contract.task, _cls=classes):
            row = rows[name]
            if sites and cache is not None:
                row["stats"].append(appearance.features(cache))
            row["ratio"].append(_det.score(feats) / _scale)
            row["fold"].append(np.full(len(feats), _fold))
            row["app"].append(app)
            row["mal"].append(_malignant_score(logits, _task, _cls))
            row["y"].append(labels)

        add("clean", clean_logits, clean_feats, clean_app, y, clean_cache)
        for name, (fn, _) in chosen.items():
            shifted = [fn(r, rng) for r in raws]
            cache, app = _prepare_all(shifted, pp, profile)
            logits, feats = run_engine(engine, cache, pp)
            add(name, logits, feats, app, y, cache)
        blank_raw = [np.full((512, 512), v, dtype=np.uint8) for v in (0, 40, 128, 255)]
        cache, app = _prepare_all(blank_raw, pp, profile)
        logits, feats = run_engine(engine, cache, pp)
        add("blank frames", logits, feats, app, np.zeros(4, bool))
        for name, ext in external.items():
            cache, app = _prepare_all(ext, pp, profile)
            logits, feats = run_engine(engine, cache, pp)
            add(name, logits, feats, app, np.zeros(len(ext), bool))
        if histo_files:
            part = histo_files[fold - 1 :: len(members)]  # each tile scored once, by one member
            h_raw = [decode_image(p, "rgb") for p in part]
            cache, app = _prepare_all(h_raw, pp, profile)
            logits, feats = run_engine(engine, cache, pp)
            add("histopathology (LC25000)", logits, feats, app, np.zeros(len(part), bool))
        if progress:
            print(f"fold {fold}: {len(idx)} images, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    quantile = ENSEMBLE_QUANTILE
    clean_ratio = np.concatenate(rows["clean"]["ratio"])
    clean_fold = np.concatenate(rows["clean"]["fold"])
    # fold k's images (and member k's external images) against the other folds' clean quantile
    threshold = {k: float(np.quantile(clean_ratio[clean_fold != k], quantile)) for k in np.unique(clean_fold)}
    clean_combined = _combined(clean_ratio, np.concatenate(rows["clean"]["app"]))
    clean_mal = np.concatenate(rows["clean"]["mal"])
    clean_y = np.concatenate(rows["clean"]["y"])
    out = {"run": str(run_dir), "cpu": detect().cpu, "quantile": quantile, "shifts": []}
    per_image = {}  # with --sites: the development images, clean and per shift
    for name in names:
        r = {k: np.concatenate(v) for k, v in rows[name].items() if k != "stats"}
        r["feat"] = r["ratio"] > np.array([threshold[k] for k in r["fold"]])
        n = len(r["ratio"])
        combined = r["feat"] | r["app"]
        if sites and rows[name]["stats"]:
            stats = rows[name]["stats"]
            per_image[name] = {"fold": r["fold"], "group": np.array(clean_groups), "ratio": r["ratio"],
                               "flag": combined, "app_stats": {k: np.concatenate([p[k] for p in stats]) for k in stats[0]}}
        entry = {
            "shift": name, "kind": "in-distribution" if name == "clean" else SHIFTS.get(name, (None, "shift"))[1],
            "n": int(n), "feature_flagged": float(r["feat"].mean()), "appearance_flagged": float(r["app"].mean()),
            "flagged": float(combined.mean()),
        }
        if name == "clean":  # the same rates, with group-bootstrap intervals
            pooled = OutOfFoldScores(r["ratio"], r["fold"], np.array(clean_groups), r["app"])
            entry["false_flags"] = cross_fitted_false_flags(r["ratio"], pooled, quantile)
        else:
            labels = np.r_[np.zeros(len(clean_ratio)), np.ones(n)]
            entry["feature_auc"] = float(roc_auc_score(labels, np.r_[clean_ratio, r["ratio"]]))
            entry["combined_auc"] = float(roc_auc_score(labels, np.r_[clean_combined, _combined(r["ratio"], r["app"])]))
        if r["y"].any() and not r["y"].all():
            entry["malignant_auc"] = float(roc_auc_score(r["y"], r["mal"]))
        out["shifts"].append(entry)
    out["clean_malignant_auc"] = float(roc_auc_score(clean_y, clean_mal))
    if sites:
        out["sites"] = site_checks(per_image, run.contract().appearance or {}, sites, site_draws)
        out["per_image"] = per_image  # for further analysis (--save-per-image); not in the JSON
    return out


def markdown(result: dict) -> str:
    if not result.get("shifts"):  # --sites-from: the simulated sites only
        lines = [f"Run `{result['run']}`; per-image data from `{result['sites_from']}`."]
    else:
        lines = [f"Run `{result['run']}`; CPU: {result['cpu']}. Threshold: the {result['quantile']:.2f} quantile, "
                 "cross-fitted (see the script's docstring).", "",
                 "| input | kind | n | flagged (feature) | flagged (appearance) | flagged (either) | "
                 "feature ROC-AUC vs clean | combined ROC-AUC vs clean | malignant ROC-AUC |",
                 "|---|---|---|---|---|---|---|---|---|"]
    for s in result.get("shifts", []):
        auc = f"{s['feature_auc']:.3f}" if "feature_auc" in s else ""
        comb = f"{s['combined_auc']:.3f}" if "combined_auc" in s else ""
        mal = f"{s['malignant_auc']:.3f}" if "malignant_auc" in s else ""
        lines.append(f"| {s['shift']} | {s['kind']} | {s['n']} | {s['feature_flagged']:.1%} | "
                     f"{s['appearance_flagged']:.1%} | {s['flagged']:.1%} | {auc} | {comb} | {mal} |")
    if result.get("sites"):
        lines += ["", "Simulated sites (`lungcad check`'s rules; share of draws that say \"does not match\"):", "",
                  "| site | patients | flagged share > 5 % (whole CI, patients as clusters) | the same, slices as "
                  "independent | OOD-score shift test | appearance | verdict: does not match |",
                  "|---|---|---|---|---|---|---|"]
        for s in result["sites"]:
            lines.append(f"| {s['shift']} | {s['patients']} | {s['flagged_rate']:.0%} | "
                         f"{s.get('flagged_images_rate', float('nan')):.0%} | {s['shift_rate']:.0%} | "
                         f"{s['appearance_rate']:.0%} | {s['verdict_rate']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a fold-ensemble run folder")
    ap.add_argument("--histo", type=Path, help="a folder of histopathology tiles (another modality)")
    ap.add_argument("--histo-n", type=int, default=300, help="tiles taken from --histo (default 300)")
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS), metavar="SHIFT", help="only these shifts")
    ap.add_argument("--per-fold", type=int, help="at most this many images per held-out fold (a fixed random subset)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--sites", nargs="+", type=int, metavar="N", help="also simulate sites of N patients (check)")
    ap.add_argument("--site-draws", type=int, default=200, help="random sites per size and shift (default 200)")
    ap.add_argument("--save-per-image", type=Path, metavar="FILE",
                    help="with --sites: pickle each image's fold, group, score, flag and appearance statistics per shift")
    ap.add_argument("--sites-from", type=Path, metavar="FILE",
                    help="judge the sites again from a --save-per-image file (no scoring; needs --sites)")
    args = ap.parse_args(argv)
    if args.sites_from:
        import pickle

        if not args.sites:
            ap.error("--sites-from needs --sites")
        per_image = pickle.loads(args.sites_from.read_bytes())
        profile = RunFolder(args.run).contract().appearance or {}
        result = {"run": str(args.run), "sites_from": str(args.sites_from),
                  "sites": site_checks(per_image, profile, args.sites, args.site_draws)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(markdown(result) if args.markdown else json.dumps(result, indent=2))
        return 0
    torch.manual_seed(0)
    result = measure(args.run, args.histo, args.histo_n, args.shifts, args.per_fold, sites=args.sites,
                     site_draws=args.site_draws)
    per_image = result.pop("per_image", None)
    if args.save_per_image and per_image:
        import pickle

        args.save_per_image.write_bytes(pickle.dumps(per_image))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
