"""`lungcad evaluate`: a run's model on its test split or on any labelled folder, with everything a
careful reviewer asks for: metrics with group-bootstrap 95 % intervals, image- and group-level
results, calibration before/after temperature scaling, the operating point, baselines, and a
self-contained report.html beside a metrics.json holding every number the report shows.

Group-level rule (a group is a patient proxy: the split's `group` column, or groups inferred with
`lungcad.data.grouping` for an external folder):
- truth: the most severe label among the group's images (malignant > benign > normal), i.e. a
  patient with any malignant slice is a malignant patient;
- prediction: the mean of the group's calibrated image probabilities, then the same decision rule
  as for images (malignant if mean p(malignant) >= the operating threshold, else the most probable
  other class). The mean rather than the max because IQ-OTH/NCCD labels whole patients (every slice
  of a malignant patient is "malignant"): the mean estimates the patient's score, while the max
  would turn one noisy slice out of forty into a patient-level false positive.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lungcad.data.dataset import load_readable
from lungcad.data.discovery import CLASSES, discover, parse_label_map
from lungcad.errors import LungcadError
from lungcad.evaluation.baselines import texture_features
from lungcad.evaluation.bootstrap import N_BOOT, metrics_with_intervals
from lungcad.evaluation.calibration import calibration_summary
from lungcad.evaluation.compare import comparison_row, init_text
from lungcad.evaluation.metrics import predict_labels
from lungcad.inference.forward import infer_logits
from lungcad.models.contract import ModelContract, load_model
from lungcad.models.factory import logits_to_probs, target_index
from lungcad.models.fusion import TextureHead, contract_probs, contract_texture, fuse
from lungcad.run import RunFolder
from lungcad.utils import atomic_write_json

log = logging.getLogger(__name__)

SEVERITY = {name: i for i, name in enumerate(CLASSES)}  # normal < benign < malignant
# Keys of the training-time metrics.json that evaluation keeps when it rewrites the file.
TRAINING_KEYS = ("best_epoch", "val_macro_f1", "test_loss")


@dataclass
class EvalSet:
    """The labelled images an evaluation runs on."""

    paths: list[Path]
    labels: list[str]
    groups: list[str]
    source: Path
    subset: str  # "test" or the external folder


def eval_set(run_dir: Path, data: str | Path | None, label_map: list[str] | None, progress: bool) -> EvalSet:
    if data is None:
        rows = RunFolder(run_dir).split("test")
        if not rows:
            raise LungcadError("split.csv has no test rows", run_dir / "split.csv")
        return EvalSet([r.path for r in rows], [r.label for r in rows], [r.group for r in rows],
                       run_dir / "split.csv", "test")
    from lungcad.data.grouping import assign_groups, scan_images

    samples = discover(data, parse_label_map(label_map))
    infos, _ = scan_images(samples, progress=progress)  # unreadable ones get singleton groups
    groups = assign_groups(samples, infos)
    return EvalSet([s.path for s in samples], [s.label for s in samples], groups, Path(data), str(data))


def group_level(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, classes: list[str],
                task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group truth, group probabilities, group ids) under the rule in the module docstring."""
    ids, inv = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, inv, probs)
    gprobs = sums / np.bincount(inv)[:, None]
    if task == "binary":
        severity = y  # 1 = malignant is the more severe
    else:
        severity = np.array([SEVERITY.get(classes[t], t) for t in y])
    gtruth = np.zeros(len(ids), dtype=int)
    for g in range(len(ids)):
        members = np.flatnonzero(inv == g)
        gtruth[g] = y[members[np.argmax(severity[members])]]
    return gtruth, gprobs, ids




@dataclass
class Scored:
    """The evaluation images with the model's probabilities and decisions on them."""

    subset: str
    paths: list[Path]
    y: np.ndarray
    groups: np.ndarray
    cache: torch.Tensor  # prepared uint8 images (examples in the report, texture baselines)
    raw: np.ndarray  # probabilities before temperature scaling
    probs: np.ndarray  # calibrated probabilities
    pred: np.ndarray  # decisions
    skipped: int = 0
    folds: np.ndarray | None = None  # fold of each image (out-of-fold evaluation of an ensemble)
    features: np.ndarray | None = None  # texture features of `cache`, if the fusion head needed them


def _decoded(paths: list[Path], contract: ModelContract, progress: bool) -> tuple[torch.Tensor, list[int], int]:
    """(cache of the readable images, their indices, number skipped)."""
    cache, keep, bad = load_readable(paths, contract.preprocessing, progress=progress, desc="decoding")
    for _, reason in bad:
        log.warning("skipping unreadable image: %s", reason)
    return cache, keep, len(bad)


def _scored(model, contract: ModelContract, es: EvalSet, progress: bool) -> Scored:
    """Run the model on an evaluation set (its test split, or an external folder)."""
    targets = [target_index(lab, contract.classes, contract.task, es.source) for lab in es.labels]
    cache, keep, skipped = _decoded(es.paths, contract, progress)
    if not keep:
        raise LungcadError("no readable images to evaluate", es.source)
    logits = infer_logits(model, cache, contract.preprocessing)
    # once, for both temperatures and for baseline (b)
    features = texture_features(cache, progress) if contract.fusion else None
    texture = contract_texture(cache, contract, features)
    probs = contract_probs(logits, cache, contract, texture=texture)
    raw = contract_probs(logits, cache, contract, temperature=1.0, texture=texture)
    return Scored(es.subset, [es.paths[i] for i in keep], np.array([targets[i] for i in keep], dtype=int),
                  np.array([es.groups[i] for i in keep]), cache, raw,
                  probs, predict_labels(probs, contract.task, contract.decision_threshold(), contract.classes),
                  skipped, features=features)


def _out_of_fold(run: RunFolder, contract: ModelContract, progress: bool) -> Scored:
    """A fold ensemble's own figures: every image as predicted by the member that never saw it, at
    the temperature and threshold fitted on the other folds (written by `train --folds`)."""
    oof = run.out_of_fold()
    cache, keep, skipped = _decoded(oof.paths, contract, progress)
    if skipped:
        raise LungcadError(f"{skipped} out-of-fold image(s) unreadable: the data folder changed since training",
                           run.data_root)
    classes, task = contract.classes, contract.task
    raw = logits_to_probs(torch.as_tensor(oof.logits, dtype=torch.float32), task, 1.0).numpy()
    if oof.texture is not None:  # a --fusion texture run: raw as inference would fuse it, at temperature 1
        raw = fuse(raw, oof.texture, TextureHead.from_dict(contract.fusion).weight)
    return Scored("out-of-fold", oof.paths,
                  np.array([target_index(lab, classes, task, run.file("oof.csv")) for lab in oof.labels]),
                  np.array([f"{f}:{g}" for f, g in zip(oof.folds, oof.groups)]), cache, raw, oof.probs,
                  np.array([classes.index(p) for p in oof.predicted]), skipped, oof.folds)


def _audit_warnings(run_dir: Path) -> dict:
    """Audit warnings saved in the run folder (audit.json) or beside it (the Makefile's RUN.audit.json)."""
    for path in (run_dir / "audit.json", run_dir.with_name(run_dir.name + ".audit.json")):
        if path.is_file():
            try:
                report = json.loads(path.read_text())
                return {"source": str(path), "warnings": list(report.get("warnings", []))}
            except (OSError, ValueError):
                log.warning("%s: unreadable audit report, ignored", path)
    return {"source": None, "warnings": [],
            "note": "no audit report found; run `lungcad audit DATA --json RUNDIR/audit.json` to include it"}


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    label_map: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    compare: list[str | Path] | None = None,
    baselines: bool = True,
    report: bool = True,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Evaluate a run; writes metrics.json (+ report.html) to `out` and returns the metrics.

    `out` defaults to the run folder for its own test split and to RUNDIR/eval-<folder name> for an
    external folder (so the run's own test metrics are never overwritten by another data set's).
    """
    run_dir = Path(run_dir)
    model, contract = load_model(run_dir)
    model = model.to(memory_format=torch.channels_last)
    classes, task = contract.classes, contract.task
    run = RunFolder(run_dir)
    if data is None and contract.ensemble:
        s = _out_of_fold(run, contract, progress)
        if compare:
            raise LungcadError("--compare needs --data for a fold ensemble (its own images are out-of-fold)")
    else:
        s = _scored(model, contract, eval_set(run_dir, data, label_map, progress), progress)
    y, probs, groups, pred = s.y, s.probs, s.groups, s.pred
    threshold = contract.decision_threshold()

    metrics = {"subset": s.subset, "skipped": s.skipped, "n_groups": int(len(np.unique(groups)))}
    metrics["group_concentration"] = group_concentration(y, groups, classes)
    for warning in metrics["group_concentration"]["warnings"]:
        log.warning("%s", warning)
    metrics.update(metrics_with_intervals(y, probs, threshold, groups, classes, task, n_boot, seed, pred=pred))
    # group level: the ensemble's per-fold thresholds do not average; the deployed one is used there
    gy, gp, gids = group_level(y, probs, groups, classes, task)
    metrics["group_level"] = {
        "rule": "truth: most severe label in the group; prediction: mean calibrated probabilities, "
                "then the image decision rule at the same threshold",
        **metrics_with_intervals(gy, gp, threshold, gids, classes, task, n_boot, seed),
    }
    op = contract.training.get("operating_point", {})
    metrics["calibration"] = {
        "temperature": contract.ensemble.get("member_temperature", contract.temperature),
        "before": calibration_summary(s.raw, y, task),
        "after": calibration_summary(probs, y, task),
        "validation": op.get("validation"),
        "fitted_on": op.get("fitted_on"),
    }
    metrics["operating_point"] = _operating_point(contract, threshold, metrics)
    if s.subset == "test":
        metrics.update(_training_metrics(run_dir))

    comparison = [comparison_row("lungcad ResNet-50 (this run)" if not contract.ensemble else
                       f"lungcad ResNet-50, {len(contract.ensemble['members'])}-fold ensemble",
                       init_text(contract), metrics)]
    if baselines and s.folds is not None:
        from lungcad.evaluation.compare import out_of_fold_baseline_rows

        comparison += out_of_fold_baseline_rows(contract, s, n_boot, seed, progress)
    elif baselines or compare:
        from lungcad.evaluation.compare import baseline_rows

        comparison += baseline_rows(run_dir, contract, s.cache, s.paths, y, groups, compare or [], baselines,
                                    progress, n_boot, seed, features=s.features)
    metrics["comparison"] = comparison

    out_dir = Path(out) if out is not None else (run_dir if data is None else run_dir / f"eval-{Path(data).name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["report"] = {"metrics_json": str(out_dir / "metrics.json"),
                         "report_html": str(out_dir / "report.html") if report else None}
    atomic_write_json(out_dir / "metrics.json", metrics)
    if report:
        from lungcad.evaluation.report import write_report

        write_report(out_dir / "report.html", metrics, contract=contract, run_dir=run_dir, y=y, probs=probs,
                     raw=s.raw, pred=pred, cache=s.cache, paths=s.paths, history=run.history(),
                     audit=_audit_warnings(run_dir))
    return metrics


DOMINANT_GROUP_SHARE = 0.5  # above this, one patient proxy decides a class's figures


def group_concentration(y: np.ndarray, groups: np.ndarray, classes: list[str]) -> dict:
    """Per class: images, groups and the share of the largest group, plus a warning per class that
    one group dominates. Per-class sensitivity, PPV and the like then describe mostly one patient
    (whatever the interval says: the group bootstrap can only resample the groups there are)."""
    per_class, warnings = {}, []
    for k, name in enumerate(classes):
        members = groups[y == k]
        if len(members) == 0:
            continue
        _, counts = np.unique(members, return_counts=True)
        share = float(counts.max() / len(members))
        per_class[name] = {"images": int(len(members)), "groups": int(len(counts)),
                           "largest_group_images": int(counts.max()), "largest_group_share": round(share, 3)}
        if share > DOMINANT_GROUP_SHARE and len(counts) > 1:
            warnings.append(f"{name}: {counts.max()} of {len(members)} images ({share:.0%}) are one group; "
                            f"its figures mostly measure that one patient proxy")
        elif len(counts) == 1 and len(members) > 1:
            warnings.append(f"{name}: all {len(members)} images are one group; its figures measure one patient proxy")
    return {"per_class": per_class, "warnings": warnings}


def _training_metrics(run_dir: Path) -> dict:
    try:
        saved = RunFolder(run_dir).metrics() or {}
    except LungcadError:
        return {}
    return {k: saved[k] for k in TRAINING_KEYS if k in saved}


def _operating_point(contract: ModelContract, threshold: float | None, metrics: dict) -> dict:
    op = contract.training.get("operating_point")
    mv = metrics.get("malignant_vs_rest")
    if mv is None:
        return {"threshold": None, "note": "the model has no malignant class"}
    iv = metrics["intervals"]
    result = {
        "threshold": threshold,
        "target_sensitivity": (op or {}).get("validation", {}).get("target_sensitivity"),
        "validation": (op or {}).get("validation"),
        "test": {k: {"value": mv[k], "low": iv[f"malignant_vs_rest.{k}"]["low"],
                     "high": iv[f"malignant_vs_rest.{k}"]["high"],
                     **({"note": iv[f"malignant_vs_rest.{k}"]["note"]} if "note" in iv[f"malignant_vs_rest.{k}"] else {})}
                 for k in ("sensitivity", "specificity", "ppv", "npv")},
        "test_counts": {k: mv[k] for k in ("tp", "fp", "fn", "tn")},
    }
    if op is None:
        result["note"] = ("this run predates operating-point selection: multiclass labels are argmax, "
                          "binary uses the contract threshold; retrain to fit one on validation")
    return result


__all__ = ["evaluate_run", "group_level"]


def format_evaluation(m: dict) -> str:
    """Terminal summary: the metrics table, headline intervals, the comparison, where the report is."""
    from lungcad.evaluation.metrics import format_metrics
    from lungcad.evaluation.report import HEADLINE, fmt, fmt_ci

    lines = [format_metrics(m), f"95 % intervals ({m['ci']['method']}, {m['ci']['n_boot']} resamples, "
                                f"{m['ci']['n_groups']} groups); group level: {m['group_level']['n']} groups"]
    lines.append(f"{'metric':<30}{'images':>8}  {'95 % CI':<18}{'groups':>8}  95 % CI")
    for key, label in HEADLINE:
        if key in m["intervals"]:
            a, g = m["intervals"][key], m["group_level"]["intervals"][key]
            lines.append(f"{label:<30}{fmt(a['value']):>8}  {fmt_ci(a):<18}{fmt(g['value']):>8}  {fmt_ci(g)}")
    cal = m["calibration"]
    lines.append(f"calibration: temperature {fmt(cal['temperature'])}, ECE {fmt(cal['before']['ece'])} -> "
                 f"{fmt(cal['after']['ece'])}, Brier {fmt(cal['before']['brier'])} -> {fmt(cal['after']['brier'])}")
    lines.append(f"{'method':<34}{'bal.acc':>8}  {'95 % CI':<18}{'sens.':>7}{'spec.':>7}{'FP':>5}{'FN':>5}")
    for r in m.get("comparison", []):
        if "note" in r:
            lines.append(f"{r['method']:<34}{r['note']}")
            continue
        lines.append(f"{r['method'][:33]:<34}{fmt(r['balanced_accuracy']['value']):>8}  "
                     f"{fmt_ci(r['balanced_accuracy']):<18}{fmt(r['sensitivity']['value']):>7}"
                     f"{fmt(r['specificity']['value']):>7}{fmt(r['false_positives']):>5}{fmt(r['false_negatives']):>5}")
    rep = m.get("report", {})
    lines.append(f"metrics: {rep.get('metrics_json')}" + (f"  report: {rep['report_html']}" if rep.get("report_html") else ""))
    return "\n".join(lines)
