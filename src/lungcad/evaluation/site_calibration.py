"""`lungcad calibrate RUNDIR DATA --out RUNDIR2`: the operating point re-fitted on a site's labelled cases.

A model's temperature and malignant threshold were fitted where it was trained (on validation, or
on the pooled out-of-fold predictions of a fold ensemble). At another site, or after `lungcad
adapt` changed its BatchNorm statistics without labels, the same threshold can give another
sensitivity: a threshold is only as good as the images it was fitted on. With labelled local cases
(class folders or a manifest, as `lungcad evaluate --data` reads them; patients grouped the same
way), this command fits both again on them and says what that buys:

- **The deployed model** (every member of a fold ensemble scores every site image: none of them
  saw it): the temperature minimising the site cases' negative log-likelihood of the deployed
  probabilities (for an ensemble the member temperature, applied to each member before the mean,
  as `train --folds` stores it), then the highest threshold on calibrated p(malignant) whose
  sensitivity on the site cases reaches the target (`calibration.choose_threshold`).
- **What the site can expect**, estimated honestly: the site's patients split into grouped,
  stratified folds; each fold's images are decided at the operating point fitted on the other
  folds (cross-fitted, as `train --folds` does for its own figures), so no image helps choose the
  threshold it is judged by. Reported beside the source's operating point on the same images, with
  95 % group-bootstrap intervals.

RUNDIR2 is a copy of RUNDIR (what `adapt` copies; the source's results that describe another
operating point are left out) with the new temperature, threshold and `training.operating_point`,
the source's operating point and the site figures in `training.site_calibration`, and
calibration.json. Weights are not touched (same sha256). Its own figures (`evaluate RUNDIR2`
without --data, metrics.json) are still the source's: the site's are in calibration.json. Built
under a temporary name and renamed when complete: nothing half-written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from lungcad.data.dataset import load_readable
from lungcad.errors import LungcadError
from lungcad.evaluation.bootstrap import metrics_with_intervals
from lungcad.evaluation.calibration import (
    TARGET_SENSITIVITY,
    choose_threshold,
    expected_calibration_error,
    minimise_over_temperature,
    probs_nll,
)
from lungcad.evaluation.evaluate import eval_set
from lungcad.evaluation.metrics import malignant_index, predict_labels
from lungcad.inference.forward import infer_logits
from lungcad.models.contract import CONTRACT_FILE, load_model, read_contract
from lungcad.models.ensemble import combine_member_logits
from lungcad.models.factory import logits_to_probs, target_index
from lungcad.models.fusion import contract_texture, fuse
from lungcad.training.adapt import check_copy_out, run_copy, site_fingerprint
from lungcad.utils import atomic_write_json

__all__ = ["FOLDS", "MIN_PER_CLASS", "calibrate_run", "fit_site_operating_point"]

log = logging.getLogger(__name__)

MIN_PER_CLASS = 5  # malignant and other site images each: fewer cannot place a threshold at all
FOLDS = 5  # at most: the cross-fitted estimate's folds (fewer when the site has fewer patients per class)
REPORT = "calibration.json"


def _probs(member_logits: torch.Tensor, task: str, temperature: float, texture: np.ndarray | None = None
           ) -> np.ndarray:
    """The deployed probabilities from (K, N, O) member logits (K = 1: a single model); `texture`:
    a fused texture head's probabilities for the same images (lungcad.models.fusion)."""
    p = logits_to_probs(combine_member_logits(member_logits, task, temperature), task, 1.0).double().numpy()
    return p if texture is None else fuse(p, texture)


def fit_site_operating_point(member_logits: torch.Tensor, y: np.ndarray, task: str, classes: list[str],
                             target_sensitivity: float, texture: np.ndarray | None = None) -> dict:
    """Temperature (of the members, before their mean) minimising the NLL of the deployed
    probabilities, then the malignant threshold on the calibrated ones."""
    temperature = minimise_over_temperature(lambda t: probs_nll(_probs(member_logits, task, t, texture), y))
    probs = _probs(member_logits, task, temperature, texture)
    m = malignant_index(classes)
    op = choose_threshold(probs[:, m], y == m, target_sensitivity)
    return {"temperature": temperature, "threshold": op["threshold"],
            "validation": {"n": int(len(y)), "ece_after": expected_calibration_error(probs, y),
                           **{k: v for k, v in op.items() if k != "threshold"}}}


def _member_logits(model: torch.nn.Module, cache: torch.Tensor, pp, ensemble: bool) -> torch.Tensor:
    members = list(model.members) if ensemble else [model]
    return torch.stack([infer_logits(m, cache, pp).float() for m in members])


def _summary(metrics: dict) -> dict:
    """The figures a site asks about, each with its interval."""
    out = {}
    for key in ("balanced_accuracy", "macro_f1", "malignant_vs_rest.sensitivity", "malignant_vs_rest.specificity",
                "malignant_vs_rest.roc_auc"):
        row = metrics["intervals"].get(key)
        if row is not None:
            out[key] = {k: row.get(k) for k in ("value", "low", "high")}
    mvr = metrics.get("malignant_vs_rest") or {}
    out.update({k: mvr.get(k) for k in ("tp", "fp", "fn", "tn")})
    return out


def calibrate_run(run_dir: str | Path, data: str | Path, out: str | Path, label_map: list[str] | None = None,
                  target_sensitivity: float | None = None, progress: bool = False, seed: int = 0) -> dict:
    """Write RUNDIR2 = `out` (module docstring); returns the calibration.json content."""
    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    contract = read_contract(run_dir)  # one-line errors for a missing or unfinished run folder
    if not data.is_dir():
        raise LungcadError("labelled site folder not found" if not data.exists() else
                           "not a folder (lungcad calibrate takes a folder of labelled site images)", data)
    m = malignant_index(contract.classes)
    if m is None:
        raise LungcadError(f"the model's classes ({', '.join(contract.classes)}) have no malignant class: "
                           "there is no malignant threshold to fit", run_dir)
    source_op = contract.training.get("operating_point") or {}
    target = (target_sensitivity if target_sensitivity is not None else
              (source_op.get("validation") or {}).get("target_sensitivity") or TARGET_SENSITIVITY)
    if not 0.0 < target <= 1.0:
        raise LungcadError(f"--target-sensitivity must be in (0, 1], not {target}")
    check_copy_out(out, run_dir)

    es = eval_set(run_dir, data, label_map, progress)
    targets = [target_index(lab, contract.classes, contract.task, es.source) for lab in es.labels]
    model, contract = load_model(run_dir)  # the weights' sha256 checked
    pp, task, classes = contract.preprocessing, contract.task, contract.classes
    cache, keep, bad = load_readable(es.paths, pp, progress=progress, desc="decoding")
    for _, reason in bad:
        log.warning("skipping unreadable image: %s", reason)
    y = np.array([targets[i] for i in keep], dtype=int)
    groups = np.array([es.groups[i] for i in keep])
    paths = [es.paths[i] for i in keep]
    malignant = y == m
    counts = {"malignant": int(malignant.sum()), "other": int((~malignant).sum())}
    if min(counts.values()) < MIN_PER_CLASS:
        raise LungcadError(f"{counts['malignant']} malignant and {counts['other']} other readable image(s); fitting a "
                           f"malignant threshold needs at least {MIN_PER_CLASS} of each", data)

    ensemble = bool(contract.ensemble)
    logits = _member_logits(model, cache, pp, ensemble)
    source_t = float(contract.ensemble["member_temperature"]) if ensemble else float(contract.temperature)
    source_threshold = contract.decision_threshold()
    # a fused texture head: its probabilities are fixed (only the network's temperature is refitted)
    texture = contract_texture(cache, contract)
    before_probs = _probs(logits, task, source_t, texture)
    before = metrics_with_intervals(y, before_probs, source_threshold, groups, classes, task, seed=seed)

    # cross-fitted: each fold of the site's patients at the operating point fitted on the others
    n_groups = {c: len(np.unique(groups[malignant == c])) for c in (True, False)}
    k = min(FOLDS, *n_groups.values())
    estimate: dict
    if k >= 2:
        probs, pred = np.zeros_like(before_probs), np.zeros(len(y), dtype=int)
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for rest, held in folds.split(np.zeros(len(y)), malignant, groups):
            op = fit_site_operating_point(logits[:, rest], y[rest], task, classes, target,
                                          None if texture is None else texture[rest])
            probs[held] = _probs(logits[:, held], task, op["temperature"], None if texture is None else texture[held])
            pred[held] = predict_labels(probs[held], task, op["threshold"], classes)
        after = metrics_with_intervals(y, probs, None, groups, classes, task, seed=seed, pred=pred)
        estimate = {"folds": k, "metrics": _summary(after), "ece": expected_calibration_error(probs, y)}
    else:
        estimate = {"folds": 0, "note": f"too few patients per class ({n_groups[True]} malignant, {n_groups[False]} "
                                        "other) to cross-fit: the site's figures at the new operating point are not "
                                        "estimated; gather more labelled patients"}
        log.warning("no cross-fitted estimate: %s", estimate["note"])

    fitted = fit_site_operating_point(logits, y, task, classes, target, texture)
    fitted_on = f"labelled site cases: {data.resolve()}"
    report = {
        "source": str(run_dir.resolve()), "data": str(data.resolve()), "images": int(len(y)),
        "unreadable": len(bad), "groups": int(len(np.unique(groups))), "classes": counts,
        "data_fingerprint_sha256": site_fingerprint(paths), "target_sensitivity": target,
        "source_operating_point": {"temperature": source_t, "threshold": source_threshold,
                                   "fitted_on": source_op.get("fitted_on")},
        "operating_point": {"temperature": fitted["temperature"], "threshold": fitted["threshold"],
                            "fitted_on": fitted_on},
        "at_source_operating_point": {**_summary(before), "ece": expected_calibration_error(before_probs, y)},
        "cross_fitted": estimate,
    }
    op = {"temperature": fitted["temperature"], "threshold": fitted["threshold"], "fitted_on": fitted_on,
          "validation": fitted["validation"]}
    contract.training = {**contract.training, "operating_point": op, "site_calibration": report}
    contract.thresholds = {**contract.thresholds, "malignant": fitted["threshold"]}
    if ensemble:
        contract.ensemble = {**contract.ensemble, "member_temperature": fitted["temperature"]}
    else:
        contract.temperature = fitted["temperature"]
    if "operating_point" in contract.init:  # an adapted run's lineage said "not validated at the site"
        contract.init = {**contract.init, "operating_point": f"re-fitted on {len(y)} labelled site images "
                                                              f"({report['groups']} groups): lungcad calibrate"}

    with run_copy(run_dir, out, "calibrating") as tmp:
        atomic_write_json(tmp / CONTRACT_FILE, contract.to_dict())
        if (tmp / "init.json").is_file():
            atomic_write_json(tmp / "init.json", contract.init)
        atomic_write_json(tmp / REPORT, report)
        load_model(tmp)  # the copy loads as a model before it is called done
    return report


def format_report(r: dict) -> str:
    """The terminal summary of calibration.json."""
    def fmt(row) -> str:
        if not isinstance(row, dict) or row.get("value") is None:
            return "n/a"
        ci = f" [{row['low']:.3f}, {row['high']:.3f}]" if row.get("low") is not None else ""
        return f"{row['value']:.3f}{ci}"

    src, new = r["source_operating_point"], r["operating_point"]
    lines = [f"{r['images']} labelled site images ({r['classes']['malignant']} malignant), {r['groups']} groups; "
             f"target sensitivity {r['target_sensitivity']:.2f}",
             f"source operating point: temperature {src['temperature']:.3f}, threshold "
             + (f"{src['threshold']:.3f}" if src["threshold"] is not None else "none (argmax)"),
             f"site operating point:   temperature {new['temperature']:.3f}, threshold {new['threshold']:.3f}"]
    rows = [("at the source's operating point", r["at_source_operating_point"])]
    if r["cross_fitted"].get("folds"):
        rows.append((f"re-fitted, cross-fitted over {r['cross_fitted']['folds']} folds of the site's patients",
                     r["cross_fitted"]["metrics"]))
    for title, s in rows:
        lines.append(f"{title}: sensitivity {fmt(s.get('malignant_vs_rest.sensitivity'))}, specificity "
                     f"{fmt(s.get('malignant_vs_rest.specificity'))}, balanced accuracy {fmt(s.get('balanced_accuracy'))}"
                     f" (FP {s.get('fp')}, FN {s.get('fn')})")
    if not r["cross_fitted"].get("folds"):
        lines.append(r["cross_fitted"]["note"])
    return "\n".join(lines)
