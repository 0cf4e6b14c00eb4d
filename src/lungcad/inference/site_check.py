"""`lungcad check RUNDIR DATA`: does a new site's (or scanner's) data look like the training data?

Before a model is used on images from a new hospital or scanner, its unlabelled images are run
through the deployed model and compared with the model's own in-distribution reference:

1. **Flagged share.** The share of the site's images the model flags out of distribution (the
   feature-space detector or the appearance check, exactly as `lungcad predict` flags them), with
   a 95 % Wilson interval and the reasons tallied. On in-distribution images about 1 % are
   flagged (the detector's threshold is the 99th percentile of unseen in-distribution images).
   Flags come in patients (slices of one patient are alike), so the interval counts the site's
   patients as clusters: Wilson at the effective image count (`flagged_share`, `design_effect`).
2. **Shift of the OOD-score distribution.** The site's OOD scores against those of reference
   images the scoring network never saw: for a single run its test split; for a fold ensemble
   every development image in split.csv, each scored by the one member that never saw it (its
   held-out fold), and the site's images shared out among the members round-robin, so that both
   sides are scored by networks that never saw them. Scores are in units of the scoring network's
   OOD threshold. Statistic: the Mann-Whitney U (stratified by member for an ensemble: the sum of
   the members' U), i.e. the probability that a site image lies further from the training data
   than a reference image (`auc`; 0.5 = no shift). Its null is *new patients of the training
   hospital*: pseudo-sites of m whole reference patients, each against the rest of the reference
   (`patient_shift_test`), with m the site's patient count: its DICOM studies, or for image files
   the patient proxies training infers (slice runs, near duplicates), as the reference's patients
   were inferred. (Before stop 18 image files were counted as the site's image count over the
   reference's images per patient, which overcounts a site that exports more slices per patient.)
   Shuffling single images instead would treat slices as independent, but slices of one patient
   are alike: on the IQ-OTH/NCCD main job it
   called 24-25 % of clean simulated sites shifted at alpha 0.01. Why this statistic: the OOD score
   measures distance from the training manifold, which is what a shift harmful to the model
   changes; a test on the features themselves (MMD, energy distance) would also flag a site whose
   *class mix* differs from the reference (a screening site with mostly normal scans), which the
   model handles fine. One-sided: a site whose images are *more* typical of the training data than
   the reference is no reason to stop. Rank-based: a handful of blank frames with huge scores
   (already counted in the flagged share) does not dominate it.
   Why not the ensemble's own scores on its development images: each was a training image of
   K-1 of the K members, whose detectors were fitted on it, so its ensemble score is lower than
   an unseen image's; against it, every in-distribution site would look shifted.
3. **Appearance.** The site's intensity profile (`lungcad.inference.appearance.features` of every
   prepared image; one frame per multi-frame DICOM) against the training profile stored in the
   contract: a statistic differs when the site's median lies outside the training images' 5th-95th
   percentile range (half the site's patients are more extreme than 95 % of the training images),
   e.g. a whole site rendered at a slightly different window, each image within the per-image
   tolerance. The site's median is the median of its patients' medians (DICOM: its studies; image
   files: the patient proxies training infers), so a patient with many slices counts once.

Verdict: "does not match" when the flagged share exceeds `--max-flagged` (its whole 95 % interval
above it: `flagged_share`), the shift test's p-value is below `--alpha`, an appearance
statistic differs, or more than `--max-flagged` of the files cannot be read; otherwise "matches".
`lungcad check` exits 0 on "matches" and `EXIT_MISMATCH` (3) on "does not match"; errors exit 1.

Reference scores and their patient groups are cached in RUNDIR/`REFERENCE_CACHE` (keyed by the
model's sha256) the first time a check runs where the training data is, so that a check at a site without the training
data (the run folder copied there) still has its reference.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections import Counter
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import lungcad
from lungcad.errors import LungcadError
from lungcad.inference.appearance import FRACTIONS, NAMES, PROFILE_VERSION
from lungcad.inference.appearance import features as appearance_features
from lungcad.run import RunFolder
from lungcad.utils import atomic_write_json, atomic_write_text

__all__ = ["EXIT_MISMATCH", "REFERENCE_CACHE", "design_effect", "flagged_share", "format_check", "patient_shift_test",
           "run_check", "wilson", "wilson_share"]

log = logging.getLogger(__name__)

EXIT_MISMATCH = 3  # `lungcad check` exit status when the site does not match (errors exit 1)
DEFAULT_MAX_FLAGGED = 0.05
DEFAULT_ALPHA = 0.01
PSEUDO_SITES = 9999  # random pseudo-sites of the shift test's null (all of them when there are fewer)
REFERENCE_CACHE = "site-check-reference.json"
CACHE_VERSION = 2  # 2: scores carry their patient groups
CHECK_FILE, CHECK_HTML = "check.json", "check.html"
MAX_LISTED = 100  # unreadable files listed in check.json (all are counted)
Z95 = 1.959963984540054  # the standard normal quantile of a two-sided 95 % interval


# ----------------------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of k successes in n trials (None when n = 0)."""
    return wilson_share(k / n, n, z) if n > 0 else None


def wilson_share(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share p observed on n (possibly effective, fractional) trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def design_effect(per_patient: list[tuple[int, int]]) -> float:
    """How much less a share of images says than as many independent images, when the images come in
    patients: the cluster-robust (between-patient) variance of the share over the binomial one
    (Kish's design effect; the ratio estimator's linearised variance, as survey statistics computes
    it), never below 1. `per_patient`: (flagged, images) of each patient. A single patient holding
    both flagged and unflagged images is one observation (its design effect is its image count); a
    share of exactly 0 or 1 has no spread to inflate (1)."""
    flagged = np.array([f for f, _ in per_patient], dtype=np.float64)
    images = np.array([n for _, n in per_patient], dtype=np.float64)
    n, m = images.sum(), len(images)
    p = flagged.sum() / n if n else 0.0
    if n == 0 or p in (0.0, 1.0):
        return 1.0
    if m < 2:
        return float(n)
    clustered = m / (m - 1) * float(((flagged - p * images) ** 2).sum()) / n**2
    return max(1.0, float(clustered / (p * (1 - p) / n)))


def flagged_share(k: int, n: int, max_flagged: float, per_patient: list[tuple[int, int]] | None = None) -> dict:
    """The site's flagged share, its 95 % Wilson interval, and whether it `exceeds` `max_flagged`: when
    the whole interval lies above it, not merely the point estimate.

    `per_patient` ((flagged, images) of each patient): the interval is then the Wilson interval at the
    *effective* number of images, n over the `design_effect` (Korn & Graubard's way with clustered
    proportions), so that one patient whose slices are all flagged weighs as one patient, not as his
    slice count. Flags come in patients: on IQ-OTH/NCCD the 13 flagged clean slices of the main job
    belong to 5 of 126 patient proxies, and a 128 px model flagged 22 slices of one noisier patient
    with 59 slices in a clean 25-patient site (docs/ood.md). Without `per_patient`, images count as
    independent."""
    deff = design_effect(per_patient) if per_patient else 1.0
    n_eff = n / deff
    ci = wilson_share(k / n, n_eff)
    out = {"count": k, "images": n, "share": k / n, "ci95": list(ci), "max": max_flagged,
           "exceeds": bool(ci[0] > max_flagged)}
    if per_patient:
        out.update(patients=len(per_patient), design_effect=round(deff, 3), effective_images=round(n_eff, 1),
                   patients_flagged=sum(1 for f, _ in per_patient if f))
    return out


def patient_shift_test(site: list[np.ndarray], reference: list[tuple[np.ndarray, np.ndarray]],
                       site_patients: int | None = None, pseudo_sites: int = PSEUDO_SITES, seed: int = 0,
                       site_patients_from: str = "given") -> dict:
    """One-sided test that the site's scores are larger than the reference's, with a patient-level null.

    site: the site's scores per stratum (scoring member); reference: (scores, patient group of each)
    per stratum. Statistic: the sum over strata of the Mann-Whitney U of the site's scores against
    the reference's (ties count a half); `auc` = U / pairs, the probability that a site score exceeds
    a reference score. Null: a site of `site_patients` new patients of the training hospital,
    simulated by pseudo-sites of that many whole reference patients, each scored against the rest of
    the reference the same way (all pseudo-sites when there are at most `pseudo_sites`, else that
    many at random). p = (1 + #{pseudo-site U/pairs >= observed}) / (1 + pseudo-sites).
    `site_patients` None: the site's image count over the reference's mean images per patient
    (`site_patients_from` says where a given count came from, for the report).
    A site larger than half the reference is simulated by half of it (wider null: conservative).
    """
    from math import comb

    from scipy.stats import rankdata

    site = [np.asarray(s, dtype=np.float64) for s in site]
    reference = [(np.asarray(r, dtype=np.float64), np.asarray(g, dtype=object)) for r, g in reference]
    observed, pairs, per_stratum = 0.0, 0, []
    for s, (r, _) in zip(site, reference):
        if len(s) and len(r):
            u = float(rankdata(np.concatenate([s, r]))[: len(s)].sum() - len(s) * (len(s) + 1) / 2)
            observed, pairs = observed + u, pairs + len(s) * len(r)
            per_stratum.append({"site": len(s), "reference": len(r), "auc": u / (len(s) * len(r))})
    if pairs == 0:
        return {"tested": False, "note": "no scores on one side: nothing to compare"}
    patients = sorted({g for _, groups in reference for g in groups})
    if len(patients) < 2:
        return {"tested": False, "note": f"the reference holds {len(patients)} patient: no pseudo-site to compare with"}
    index = {g: i for i, g in enumerate(patients)}
    # each patient's rank sum and image count per stratum: a pseudo-site's U is then a sum over its patients
    rank_sums = np.zeros((len(reference), len(patients)))
    counts = np.zeros((len(reference), len(patients)))
    for k, (r, groups) in enumerate(reference):
        cols = np.fromiter((index[g] for g in groups), dtype=np.int64, count=len(groups))
        np.add.at(rank_sums[k], cols, rankdata(r))
        np.add.at(counts[k], cols, 1)
    totals = counts.sum(axis=1)
    n_images = sum(len(s) for s in site)
    per_patient = counts.sum() / len(patients)
    if site_patients is None:
        m, source = max(1, round(n_images / per_patient)), (f"estimated: {n_images} images / {per_patient:.1f} images "
                                                            "per reference patient")
    else:
        m, source = int(site_patients), site_patients_from
    m_used = min(m, len(patients) // 2)
    total = comb(len(patients), m_used)
    exhaustive = total <= pseudo_sites
    rng = np.random.default_rng(seed)
    draws = total if exhaustive else pseudo_sites
    every = np.array(list(combinations(range(len(patients)), m_used))) if exhaustive else None
    null = []
    block = max(1, 4_000_000 // len(patients))  # pseudo-sites per chunk: memory bounded for large references
    for start in range(0, draws, block):
        b = min(block, draws - start)
        chosen = every[start : start + b] if exhaustive else np.argsort(rng.random((b, len(patients))), axis=1)[:, :m_used]
        mask = np.zeros((b, len(patients)))
        np.put_along_axis(mask, chosen, 1, axis=1)
        n_s = mask @ counts.T  # (b, strata) pseudo-site images per stratum
        u = mask @ rank_sums.T - n_s * (n_s + 1) / 2
        null.append(u.sum(axis=1) / np.maximum((n_s * (totals - n_s)).sum(axis=1), 1))
    null_auc = np.concatenate(null)
    auc = observed / pairs
    p = (1 + int((null_auc >= auc - 1e-12).sum())) / (1 + draws)
    out = {"tested": True, "auc": auc, "p_value": p, "min_p_value": 1 / (1 + draws), "pseudo_sites": int(draws),
           "exhaustive": exhaustive, "site_patients": m, "site_patients_from": source, "pseudo_site_patients": m_used,
           "reference_patients": len(patients), "null_auc_q50_q99": [round(float(q), 4) for q in
                                                                     np.quantile(null_auc, [0.5, 0.99])],
           "strata": per_stratum}
    if m_used < m:
        out["note"] = (f"the site ({m} patients) is larger than half the reference ({len(patients)} patients): "
                       f"simulated by pseudo-sites of {m_used} (a conservative test)")
    return out


def _reason_kind(reason: str) -> str:
    """An OOD reason without its numbers: what to tally."""
    if reason.startswith("feature-space score"):
        return "feature-space score above the threshold"
    return reason.split(" (")[0]


# ------------------------------------------------------------------------------------ the check


def _predict(predictor, paths: list, progress: bool) -> list:
    return list(predictor.predict_paths(paths, progress=progress, series_rows=False))


def _threshold(contract) -> float | None:
    ood = contract.ood or {}
    return float(ood["threshold"]) if ood.get("threshold") else None


def _scored(preds: list, threshold: float | None) -> list:
    """The readable predictions that have an OOD score (all of them, for a model with a detector)."""
    return [p for p in preds if not p.error and p.ood_score is not None] if threshold is not None else []


def _normalised(preds: list, threshold: float | None) -> np.ndarray:
    scored = _scored(preds, threshold)
    return np.asarray([p.ood_score for p in scored], dtype=np.float64) / threshold if scored else np.zeros(0)


def _files(preds: list) -> list[str]:
    """The files behind readable predictions, in order, once each (frames share their file)."""
    seen: dict[str, None] = {}
    for p in preds:
        if not p.error:
            seen.setdefault(_file_of(p), None)
    return list(seen)


def _file_of(pred) -> str:
    return pred.source.split("#")[0] if pred.level == "frame" else pred.source


class _Stratum(NamedTuple):
    """Reference images of one scoring network: a member of a fold ensemble, or the single run."""

    name: str  # the member's folder ("" for a single run)
    scorer: Path  # the run folder that scores them
    paths: list[Path]  # images it never saw
    groups: list[str]  # their patients (split.csv's group column)
    threshold: float | None
    sha256: str


def _reference_rows(run: RunFolder, contract) -> tuple[list[_Stratum], dict]:
    """The reference images per stratum, and how the report describes them."""
    if contract.ensemble:
        from lungcad.models.contract import read_contract

        strata = []
        for entry in contract.ensemble.get("members", []):
            member = RunFolder(run.path / entry["path"])
            member_contract = read_contract(member.path)
            rows = member.split("test")
            strata.append(_Stratum(entry["path"], member.path, [r.path for r in rows], [r.group for r in rows],
                                   _threshold(member_contract), member_contract.model_sha256))
        k = len(strata)
        info = {"kind": "development images, out-of-fold",
                "description": f"every development image in split.csv ({sum(len(s.paths) for s in strata)}), each "
                               f"scored by the one of the {k} members that never saw it (its held-out fold); the "
                               f"site's images are shared among the members round-robin. The ensemble's own scores "
                               f"on these images are not used: each was a training image of {k - 1} of the {k} "
                               "members, so its ensemble score is lower than a new image's, and every "
                               "in-distribution site would look shifted against them."}
        return strata, info
    rows = run.split("test")
    info = {"kind": "test split", "description": f"the run's test split ({len(rows)} images in split.csv, never "
                                                 "seen in training, fitting or calibration)"}
    return [_Stratum("", run.path, [r.path for r in rows], [r.group for r in rows], _threshold(contract),
                     contract.model_sha256)], info


def _reference_scores(run: RunFolder, contract, strata: list[_Stratum], progress: bool,
                      predictor=None) -> tuple[list[dict], str]:
    """Reference scores and their patients per stratum, from the cache or computed (then cached); (strata, where from).

    `predictor`: the run's own Predictor, reused where a stratum is scored by the run itself.
    """
    from lungcad.inference.predictor import Predictor

    cache_path = run.file(REFERENCE_CACHE)
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else None
    except (OSError, ValueError):
        cached = None
    if (cached and cached.get("model_sha256") == contract.model_sha256 and cached.get("version") == CACHE_VERSION
            and len(cached.get("strata", [])) == len(strata)):
        log.info("reference scores from %s", cache_path)
        return cached["strata"], f"cached in {REFERENCE_CACHE} ({cached.get('date', '?')})"
    missing = [p for s in strata for p in s.paths if not Path(p).is_file()]
    if missing or not any(s.paths for s in strata):
        where = missing[0] if missing else run.path / "split.csv"
        older = (" (the cached ones are from an older lungcad, without their patients)"
                 if cached and cached.get("model_sha256") == contract.model_sha256 else "")
        raise LungcadError(f"reference images not found ({len(missing)} missing, e.g. this one){older}; the shift test "
                           "needs them once: run lungcad check where the run's training data is, which caches their "
                           f"scores in RUNDIR/{REFERENCE_CACHE}", where)
    out = []
    for stratum in strata:
        log.info("scoring %d reference images%s", len(stratum.paths),
                 f" with member {stratum.name}" if stratum.name else "")
        scorer = (predictor if predictor is not None and Path(stratum.scorer) == run.path
                  else Predictor(stratum.scorer))
        preds = _predict(scorer, stratum.paths, progress)
        for p in preds:
            if p.error:
                log.warning("reference image left out: %s: %s", p.source, p.error)
        ok = [p for p in preds if not p.error]
        group_of = {str(path): g for path, g in zip(stratum.paths, stratum.groups)}
        scored = _scored(ok, stratum.threshold)
        out.append({"member": stratum.name, "model_sha256": stratum.sha256, "images": len(ok),
                    "flagged": int(sum(p.ood for p in ok)),
                    "scores": [round(float(s), 6) for s in _normalised(scored, stratum.threshold)],
                    "groups": [group_of[_file_of(p)] for p in scored]})
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        atomic_write_json(cache_path, {"version": CACHE_VERSION, "model_sha256": contract.model_sha256, "date": date,
                                       "strata": out})
    except OSError as exc:  # a read-only run folder: the check still works, the next one recomputes
        log.warning("could not cache the reference scores in %s (%s)", cache_path, exc.strerror or exc)
    return out, "computed now"


def _site_appearance(predictor, files: list[str], chunk: int = 64) -> tuple[dict[str, np.ndarray], list[str]]:
    """Appearance statistics of every readable site file's prepared image (middle frame of a
    multi-frame file), and the files they are of."""
    parts: list[dict[str, np.ndarray]] = []
    batch: list[torch.Tensor] = []
    kept: list[str] = []
    for f in files:
        try:
            pixels, _ = predictor.load_pixels(Path(f))
        except LungcadError:
            continue
        batch.append(predictor.prepare(pixels))
        kept.append(f)
        if len(batch) >= chunk:
            parts.append(appearance_features(torch.stack(batch)))
            batch = []
    if batch:
        parts.append(appearance_features(torch.stack(batch)))
    if not parts:
        return {}, []
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, kept


def _site_patient_ids(preds: list, files: list[str]) -> tuple[np.ndarray | None, str]:
    """The patient of each file: its DICOM study when every file has one, else the patient proxies
    training infers from image files (slice runs, near duplicates: `lungcad.data.grouping`)."""
    study = {_file_of(p): p.dicom.get("StudyInstanceUID") for p in preds}
    if files and all(study.get(f) for f in files):
        return np.array([study[f] for f in files]), "DICOM studies"
    from lungcad.data.discovery import Sample
    from lungcad.data.grouping import assign_groups, scan_images

    samples = [Sample(Path(f), "") for f in files]
    infos, _ = scan_images(samples)
    return np.array(assign_groups(samples, infos)), "inferred as for training (slice runs, near duplicates)"


def _per_patient(preds: list, files: list[str], patients: np.ndarray | None) -> list[tuple[int, int]] | None:
    """(flagged, images) per patient of the readable predictions; a file without a patient (it could
    not be prepared for the appearance statistics) is a patient of its own."""
    if patients is None:
        return None
    patient_of = dict(zip(files, patients.tolist()))
    tally: dict[str, list[int]] = {}
    for p in preds:
        f = _file_of(p)
        t = tally.setdefault(str(patient_of.get(f, f)), [0, 0])
        t[0] += int(bool(p.ood))
        t[1] += 1
    return [(f, n) for f, n in tally.values()]


def compare_appearance(site: dict[str, np.ndarray], profile: dict, patients: np.ndarray | None = None) -> dict:
    """The site's per-statistic distribution against the contract's training profile.

    `patients`: the patient (or patient proxy) of each site image. The site's typical value is then
    the median of its patients' medians, each patient counted once: with the median over images, a
    patient with many slices decides it alone (on IQ-OTH/NCCD one noisier patient with 59 slices
    was in 62 of the 64 false alarms on simulated clean sites of 10 patients; docs/ood.md).
    """
    feats = profile.get("features") if profile and profile.get("version") == PROFILE_VERSION else None
    if not feats:
        return {"compared": False, "differs": [],
                "note": "model.json holds no appearance profile of the training images (an older run): not compared"}
    if not site:
        return {"compared": False, "differs": [], "note": "no site image could be prepared"}
    if patients is not None:
        patients = np.asarray(patients)
        ids = np.unique(patients)
        typical = {k: np.array([np.median(v[patients == g]) for g in ids]) for k, v in site.items()}
    else:
        typical = site
    stats, differs = {}, []
    for name, f in feats.items():
        v = site.get(name)
        if v is None or not len(v):
            continue
        median = float(np.median(typical[name]))
        stats[name] = {
            "name": NAMES.get(name, name), "site_median": round(median, 4),
            "site_q05": round(float(np.quantile(v, 0.05)), 4), "site_q95": round(float(np.quantile(v, 0.95)), 4),
            "training_median": f["median"], "training_q05": f["q05"], "training_q95": f["q95"],
            "share_outside_accepted_range": round(float(((v < f["lo"]) | (v > f["hi"])).mean()), 4),
        }
        if not f["q05"] <= median <= f["q95"]:
            differs.append(name)
    out = {"compared": True, "images": int(len(next(iter(site.values())))), "training_images": profile.get("images"),
           "statistics": stats, "differs": differs}
    if patients is not None:
        out["patients"] = int(len(ids))
        out["rule"] = ("a statistic differs when the median of the site's patients' medians lies outside the training "
                       "images' 5th-95th percentile range")
    else:
        out["rule"] = ("a statistic differs when the site's median lies outside the training images' 5th-95th "
                       "percentile range")
    return out


def _fmt_stat(name: str, v: float) -> str:
    return f"{v:.2f}" if name in FRACTIONS else f"{v:.1f}"


def default_out(run_dir: str | Path, data: str | Path) -> Path:
    """RUNDIR/check-<the data folder's name>."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data).resolve().name).strip("._") or "site"
    return Path(run_dir) / f"check-{name}"


def run_check(run_dir: str | Path, data: str | Path, out: str | Path | None = None,
              max_flagged: float = DEFAULT_MAX_FLAGGED, alpha: float = DEFAULT_ALPHA, progress: bool = False,
              pseudo_sites: int = PSEUDO_SITES, seed: int = 0) -> dict:
    """Check a site's unlabelled images against a run; writes check.json + check.html into `out`.

    Returns the check.json content. Raises LungcadError on bad input (missing or empty folder, no
    readable image, a run folder that is not a model, reference images that are nowhere).
    """
    from lungcad.inference.predictor import Predictor

    run = RunFolder(run_dir)
    data = Path(data)
    if not 0.0 <= max_flagged < 1.0:
        raise LungcadError(f"--max-flagged must be in [0, 1), not {max_flagged}")
    if not 0.0 < alpha < 1.0:
        raise LungcadError(f"--alpha must be in (0, 1), not {alpha}")
    if not data.exists():
        raise LungcadError("folder not found", data)
    if not data.is_dir():
        raise LungcadError("not a folder (lungcad check takes the folder of a site's images)", data)
    contract = run.contract()  # one-line errors for a missing or unfinished run folder
    out = Path(out) if out is not None else default_out(run.path, data)
    if out.exists() and not out.is_dir():
        raise LungcadError("--out must be a folder", out)
    strata, ref_info = _reference_rows(run, contract)

    predictor = Predictor(run.path)
    preds = _predict(predictor, [data], progress)
    if len(preds) == 1 and preds[0].error and Path(preds[0].source) == data:
        raise LungcadError(preds[0].error, data)  # "folder holds no image or DICOM files"
    ok = [p for p in preds if not p.error]
    bad = [p for p in preds if p.error]
    for p in bad:
        log.warning("unreadable: %s: %s", p.source, p.error)
    if not ok:
        raise LungcadError(f"none of the {len(preds)} files could be read (e.g. {bad[0].source}: {bad[0].error})", data)
    files = _files(ok)

    # the site's patients: its DICOM studies, else the patient proxies training would infer
    site_stats, kept = _site_appearance(predictor, files)
    patients, patients_from = _site_patient_ids(ok, kept) if kept else (None, "")

    # 1. flagged share, patients counted as clusters
    n, k = len(ok), int(sum(p.ood for p in ok))
    kinds = Counter(_reason_kind(r) for p in ok for r in p.ood_reasons)
    flagged = {**flagged_share(k, n, max_flagged, _per_patient(ok, kept, patients)),
               "reasons": dict(kinds.most_common())}
    if patients is not None:
        flagged["patients_from"] = patients_from

    # 2. shift of the OOD scores against the reference
    if not contract.ood or any(stratum.threshold is None for stratum in strata):
        shift = {"tested": False, "note": "the model has no out-of-distribution detector: no OOD scores to compare"}
        reference = {**ref_info, "images": 0}
        site_scores: list[np.ndarray] = []
        ref_scores: list[np.ndarray] = []
    else:
        ref, ref_source = _reference_scores(run, contract, strata, progress, predictor)
        ref_scores = [np.asarray(s["scores"], dtype=np.float64) for s in ref]
        if contract.ensemble:
            site_scores = []
            for i, stratum in enumerate(strata):
                mine = files[i :: len(strata)]
                log.info("scoring %d site images with member %s", len(mine), stratum.name)
                site_scores.append(_normalised(_predict(Predictor(stratum.scorer), mine, progress), stratum.threshold)
                                   if mine else np.zeros(0))
        else:
            site_scores = [_normalised(ok, strata[0].threshold)]
        shift = patient_shift_test(site_scores, [(r, s["groups"]) for r, s in zip(ref_scores, ref)],
                                   len(np.unique(patients)) if patients is not None else None, pseudo_sites, seed,
                                   site_patients_from=f"the site's patients, {patients_from}")
        shift["alpha"] = alpha
        shift["statistic"] = ("one-sided test of the Mann-Whitney U of the OOD scores (site > reference"
                              + (", stratified by member" if contract.ensemble else "")
                              + "), null: pseudo-sites of whole reference patients")
        site_all, ref_all = np.concatenate(site_scores), np.concatenate(ref_scores)
        shift["site_median_score"] = float(np.median(site_all)) if len(site_all) else None
        shift["reference_median_score"] = float(np.median(ref_all)) if len(ref_all) else None
        shift["score_unit"] = "the scoring network's OOD threshold (1 = flagged)"
        ref_n, ref_k = sum(s["images"] for s in ref), sum(s["flagged"] for s in ref)
        reference = {**ref_info, "images": ref_n, "flagged": ref_k, "flagged_share": ref_k / ref_n if ref_n else None,
                     "scores": ref_source}
        notes = [shift["note"]] if shift.get("note") else []
        if shift.get("tested") and shift["min_p_value"] >= alpha:
            notes.append(f"with {shift['reference_patients']} reference patients the smallest attainable p is "
                         f"{shift['min_p_value']:.2g}, not below alpha {alpha:g}: this test cannot say 'shifted'")
        elif shift.get("tested") and shift["pseudo_site_patients"] < 10:
            notes.append(f"a site of {shift['pseudo_site_patients']} patients: the shift test has little power to "
                         "detect a small shift")
        if notes:
            shift["note"] = "; ".join(notes)

    # 3. appearance
    appearance = compare_appearance(site_stats, contract.appearance or {}, patients)
    if patients is not None:
        appearance["patients_from"] = patients_from

    # verdict
    reasons = []
    if flagged["exceeds"]:
        lo, hi = flagged["ci95"]
        reasons.append(f"{flagged['share']:.1%} of the images are flagged out of distribution (95 % CI {lo:.1%}-"
                       f"{hi:.1%}: above the {max_flagged:.1%} allowed)")
    if shift.get("tested") and shift["p_value"] < alpha:
        reasons.append(f"the OOD scores are higher than on the reference images (p = {shift['p_value']:.2g} < alpha "
                       f"{alpha:g}; a site image is further from the training data than a reference image with "
                       f"probability {shift['auc']:.2f})")
    if appearance["differs"]:
        parts = [f"{NAMES.get(s, s)} {_fmt_stat(s, appearance['statistics'][s]['site_median'])}, training "
                 f"{_fmt_stat(s, appearance['statistics'][s]['training_q05'])}-"
                 f"{_fmt_stat(s, appearance['statistics'][s]['training_q95'])}" for s in appearance["differs"]]
        reasons.append("the site's typical image looks unlike the training images (median " + "; ".join(parts) + ")")
    unreadable_share = len(bad) / len(preds)
    if unreadable_share > max_flagged:
        reasons.append(f"{len(bad)} of {len(preds)} files could not be read")

    report = {
        "site": data.resolve().name, "data": str(data.resolve()), "run": str(run.path.resolve()),
        "model_sha256": contract.model_sha256, "ensemble_members": len(strata) if contract.ensemble else 0,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lungcad": lungcad.__version__,
        "verdict": "does not match" if reasons else "matches", "reasons": reasons,
        "files": len(preds), "images": n, "unreadable": len(bad),
        "unreadable_files": [{"source": p.source, "error": p.error} for p in bad[:MAX_LISTED]],
        "flagged": flagged, "shift": shift, "reference": reference, "appearance": appearance,
        "settings": {"max_flagged": max_flagged, "alpha": alpha, "pseudo_sites": pseudo_sites, "seed": seed},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CHECK_HTML, render_html(report, site_scores, ref_scores))
    atomic_write_json(out / CHECK_FILE, report)  # last: its presence means the check is complete
    report["out"] = str(out)
    return report


# -------------------------------------------------------------------------------------- output


def _flagged_text(f: dict) -> str:
    """The flagged share as the terminal and the HTML page state it (`flagged_share`'s dict)."""
    where = (f"in {f['patients_flagged']} of {f['patients']} patients; " if f.get("patients") else "")
    clusters = (f", patients counted as clusters: design effect {f['design_effect']:.1f}"
                if f.get("patients") else "")
    return (f"{f['count']} ({f['share']:.1%}; {where}95 % CI {f['ci95'][0]:.1%}-{f['ci95'][1]:.1%}{clusters}; too "
            f"many when the whole interval is above {f['max']:.1%})")


def format_check(report: dict) -> str:
    """The check in a few lines for the terminal."""
    f = report["flagged"]
    lines = [f"site {report['site']}: {report['images']} images ({report['unreadable']} unreadable files)",
             f"  flagged out of distribution: {_flagged_text(f)}"]
    for reason, count in f["reasons"].items():
        lines.append(f"    {count:5d}  {reason}")
    s = report["shift"]
    if s.get("tested"):
        lines.append(f"  OOD-score shift vs the {report['reference']['kind']} ({report['reference']['images']} images of "
                     f"{s['reference_patients']} patients): P(site > reference) {s['auc']:.2f}, p = {s['p_value']:.2g} "
                     f"(alpha {s['alpha']:g}; against sites of {s['pseudo_site_patients']} reference patients, the "
                     f"site counted as {s['site_patients']}: {s['site_patients_from']})")
        if s.get("note"):
            lines.append(f"    {s['note']}")
    else:
        lines.append(f"  OOD-score shift: not tested ({s.get('note', '')})")
    a = report["appearance"]
    lines.append("  appearance: " + (("differs: " + ", ".join(NAMES.get(d, d) for d in a["differs"])) if a["differs"]
                                     else "like the training images" if a["compared"] else a.get("note", "")))
    lines.append(f"verdict: {report['verdict']}" + "".join(f"\n  - {r}" for r in report["reasons"]))
    if report.get("out"):
        lines.append(f"written to {report['out']}")
    return "\n".join(lines)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figures(report: dict, site: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, str]:
    """OOD-score histograms (site vs reference) and the flagged share, as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    s = np.concatenate(site) if site else np.zeros(0)
    r = np.concatenate(ref) if ref else np.zeros(0)
    if len(s) or len(r):
        both = np.concatenate([s, r])
        lo, hi = max(float(both.min()), 1e-3), max(float(both.max()), 1.5)
        bins = np.geomspace(lo, hi * 1.01, 30) if hi / lo > 20 else np.linspace(0, hi * 1.01, 30)
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        for values, label, colour in ((r, f"reference ({len(r)})", "#1f5fa8"), (s, f"site ({len(s)})", "#b3261e")):
            if len(values):
                ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, density=True, alpha=0.5, label=label,
                        color=colour)
        ax.axvline(1.0, color="black", linestyle=":", label="OOD threshold")
        if hi / lo > 20:
            ax.set_xscale("log")
        ax.set(xlabel="OOD score / threshold", ylabel="density", title="OOD scores: site vs reference")
        ax.legend(fontsize=8)
        figs["scores"] = _png(fig)
    f = report["flagged"]
    fig, ax = plt.subplots(figsize=(5.2, 2.2))
    rows = [("site", f["share"], f["ci95"])]
    ref_info = report["reference"]
    if ref_info.get("flagged_share") is not None:
        rows.append(("reference", ref_info["flagged_share"], list(wilson(ref_info["flagged"], ref_info["images"]))))
    for i, (label, share, ci) in enumerate(rows):
        ax.barh(i, share * 100, color="#b3261e" if label == "site" else "#1f5fa8", alpha=0.7)
        ax.errorbar(share * 100, i, xerr=[[max(0.0, (share - ci[0]) * 100)], [max(0.0, (ci[1] - share) * 100)]],
                    color="black", capsize=4)
    ax.axvline(f["max"] * 100, color="black", linestyle=":", label=f"max {f['max']:.0%}")
    ax.set_yticks(range(len(rows)), [lab for lab, _, _ in rows])
    ax.set(xlabel="% flagged out of distribution (95 % CI)", xlim=(0, max(100 * max(r[2][1] for r in rows), 10) * 1.05))
    ax.legend(fontsize=8, loc="lower right")
    figs["flagged"] = _png(fig)
    return figs


BAD_ROW = ' class="bad"'


def render_html(report: dict, site: list[np.ndarray], ref: list[np.ndarray]) -> str:
    """check.html: self-contained (inline style, figures as data URIs, no script, no network)."""
    e = html.escape
    figs = figures(report, site, ref)
    ok = report["verdict"] == "matches"
    f, s, a = report["flagged"], report["shift"], report["appearance"]
    rows = [("Run", report["run"]), ("Model sha256", report["model_sha256"]), ("Site folder", report["data"]),
            ("Date (UTC)", report["date"]),
            ("Images", f"{report['images']} ({report['unreadable']} unreadable files)"),
            ("Flagged out of distribution", _flagged_text(f)),
            ("Reference", f"{report['reference']['kind']}: {report['reference']['description']}")]
    if s.get("tested"):
        rows.append(("OOD-score shift", f"P(site score > reference score) = {s['auc']:.3f}; p = {s['p_value']:.3g} "
                                        f"(alpha {s['alpha']:g}; {s['statistic']}: {s['pseudo_sites']} pseudo-sites of "
                                        f"{s['pseudo_site_patients']} of the {s['reference_patients']} reference "
                                        f"patients; the site: {s['site_patients']} patients, "
                                        f"{s['site_patients_from']})"))
        if s.get("note"):
            rows.append(("Note", s["note"]))
    else:
        rows.append(("OOD-score shift", f"not tested: {s.get('note', '')}"))
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    reasons = "".join(f"<li>{e(r)}</li>" for r in report["reasons"])
    tally = "".join(f"<tr><td>{e(r)}</td><td>{c}</td></tr>" for r, c in f["reasons"].items())
    app = ""
    if a["compared"]:
        app = "".join(
            f"<tr{BAD_ROW if name in a['differs'] else ''}><td>{e(st['name'])}</td>"
            f"<td>{st['site_median']:g} ({st['site_q05']:g}-{st['site_q95']:g})</td>"
            f"<td>{st['training_median']:g} ({st['training_q05']:g}-{st['training_q95']:g})</td>"
            f"<td>{st['share_outside_accepted_range']:.1%}</td></tr>" for name, st in a["statistics"].items())
        app = ("<table><thead><tr><th>Statistic</th><th>Site median (5th-95th pct of its images)</th><th>Training median "
               "(5th-95th pct)</th><th>Site images outside the per-image range</th></tr></thead><tbody>"
               f"{app}</tbody></table><p class=muted>{e(a['rule'])}.</p>")
    else:
        app = f"<p class=muted>{e(a.get('note', ''))}</p>"
    imgs = "".join(f'<img alt="{e(name)}" src="{uri}">' for name, uri in figs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lungcad site check: {e(report['site'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #1c1c1c; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }} th, td {{ text-align: left; padding: .25rem .6rem;
border-bottom: 1px solid #ddd; vertical-align: top; }} .verdict {{ padding: .6rem 1rem; border-radius: .4rem; }}
.ok {{ background: #e1f2e6; color: #1e7a3c; }} .bad, tr.bad td {{ background: #fbe3e1; color: #b3261e; }}
.muted {{ color: #666; }} img {{ max-width: 100%; display: block; margin: .5rem 0; }}
</style></head><body>
<h1>Site check: {e(report['site'])}</h1>
<p class="verdict {'ok' if ok else 'bad'}" id="verdict"><strong>{e(report['verdict'])}</strong></p>
{f'<ul id="reasons">{reasons}</ul>' if reasons else ''}
<table>{table}</table>
<h2>Out-of-distribution flags</h2>
{imgs}
{f'<table><thead><tr><th>Reason</th><th>Images</th></tr></thead><tbody>{tally}</tbody></table>' if tally else '<p class=muted>No image flagged.</p>'}
<h2>Appearance against the training images</h2>
{app}
<p class=muted>lungcad {e(report['lungcad'])}. Decision support, not a diagnosis: a site that matches still needs
local validation with labelled cases.</p>
</body></html>
"""
