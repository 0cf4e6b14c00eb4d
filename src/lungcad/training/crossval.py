"""`lungcad train --folds K`: grouped, stratified K-fold cross-validation.

Each fold is an ordinary run folder (`OUT/fold-1/`, ...) trained by `train` from a split file
written here (`OUT/fold-k.split.csv`: fold k is the test set, a group-disjoint validation set is
carved from the rest). Groups are the same patient proxies the normal split uses, so no patient
is ever on both sides. `OUT/crossval.json` holds per-fold metrics, their mean and standard
deviation, and the pooled out-of-fold metrics (every image predicted by the one model that never
saw it, at that fold's own temperature and threshold) with group-bootstrap intervals;
`OUT/oof.csv` holds the out-of-fold predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lungcad.data.dataset import load_cache
from lungcad.data.discovery import discover, parse_label_map
from lungcad.data.grouping import assign_groups, scan_images
from lungcad.data.split import SplitRow, check_no_leak, write_split
from lungcad.errors import LungcadError
from lungcad.evaluation.bootstrap import attach_intervals, bootstrap_ci, weighted_metrics
from lungcad.evaluation.calibration import decision_threshold
from lungcad.evaluation.metrics import predict_labels
from lungcad.inference.engine import infer_logits
from lungcad.models.contract import load_model
from lungcad.models.factory import logits_to_probs
from lungcad.models.factory import target_index
from lungcad.training.data import output_classes
from lungcad.training.trainer import TrainConfig, _check_out, train
from lungcad.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")
MALIGNANT_KEYS = ("sensitivity", "specificity", "ppv", "roc_auc")


def fold_splits(labels: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float,
                seed: int) -> list[np.ndarray]:
    """One subset array ("train"/"val"/"test") per fold; whole groups only, stratified by label."""
    per_class = {c: len(np.unique(groups[labels == c])) for c in np.unique(labels)}
    short = {c: n for c, n in per_class.items() if n < folds + 1}
    if folds < 2:
        raise LungcadError("--folds needs K >= 2")
    if short:
        raise LungcadError(f"--folds {folds}: class(es) {', '.join(f'{c!r} ({n} groups)' for c, n in short.items())} "
                           f"need at least {folds + 1} groups (one per test fold plus validation)")
    out = []
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        subset = np.full(len(labels), "train", dtype=object)
        subset[test] = "test"
        # validation: about val_fraction of all images, carved from the non-test groups
        n_inner = max(2, min(round((1 - 1 / folds) / val_fraction),
                             min(len(np.unique(groups[rest][labels[rest] == c])) for c in np.unique(labels))))
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + k + 1)
        _, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        subset[rest[val]] = "val"
        out.append(subset)
    return out


def cross_validate(cfg: TrainConfig, folds: int) -> dict:
    """Train K fold runs under cfg.out and summarise them; returns the crossval.json content."""
    out = Path(cfg.out)
    if folds < 2:
        raise LungcadError("--folds needs K >= 2")
    _check_out(out)
    data = Path(cfg.data)
    samples = discover(data, parse_label_map(cfg.label_map))
    infos, _ = scan_images(samples, progress=cfg.progress)
    groups_all = assign_groups(samples, infos)
    keep = sorted(i.index for i in infos)  # unreadable files are left out (train would skip them too)
    samples = [samples[i] for i in keep]
    labels = np.array([s.label for s in samples])
    groups = np.array([groups_all[i] for i in keep])
    splits = fold_splits(labels, groups, folds, cfg.val_fraction, cfg.seed)
    out.mkdir(parents=False)
    per_fold, oof = [], []
    for k, subset in enumerate(splits, start=1):
        rows = [SplitRow(s.path, s.label, g, str(sub)) for s, g, sub in zip(samples, groups, subset)]
        check_no_leak(rows)
        split_file = out / f"fold-{k}.split.csv"
        write_split(split_file, rows, data)
        log.info("fold %d/%d: %d train, %d val, %d test images", k, folds, *(int((subset == s).sum())
                                                                          for s in ("train", "val", "test")))
        fold_dir = train(dataclasses.replace(cfg, out=str(out / f"fold-{k}"), split=str(split_file)))
        test_rows = [r for r in rows if r.subset == "test"]
        per_fold.append(_fold_metrics(fold_dir))
        oof.extend(_oof(fold_dir, test_rows, k, cfg))
    summary = summarise(per_fold, oof, cfg.task)
    atomic_write_json(out / "crossval.json", summary)
    _write_oof(out / "oof.csv", oof, summary["classes"])
    return summary


def _fold_metrics(fold_dir: Path) -> dict:
    import json

    return json.loads((fold_dir / "metrics.json").read_text())


def _oof(fold_dir: Path, rows: list[SplitRow], fold: int, cfg: TrainConfig) -> list[dict]:
    model, contract = load_model(fold_dir)
    cache, bad = load_cache([r.path for r in rows], contract.preprocessing, progress=False)
    if bad:
        raise LungcadError(f"fold {fold}: test image became unreadable: {bad[0][1]}")
    probs = logits_to_probs(infer_logits(model, cache, contract.preprocessing), contract.task,
                            contract.temperature).numpy()
    pred = predict_labels(probs, contract.task, decision_threshold(contract), contract.classes)
    return [{"path": r.path, "label": r.label, "group": r.group, "fold": fold, "y": target_index(r.label, output_classes(cfg.task), cfg.task),
             "pred": int(p), "probs": pr, "classes": contract.classes} for r, p, pr in zip(rows, pred, probs)]


def summarise(per_fold: list[dict], oof: list[dict], task: str) -> dict:
    classes = oof[0]["classes"]
    stats = {}
    for key in SUMMARY_KEYS:
        vals = [m.get(key) for m in per_fold]
        stats[key] = _mean_sd(vals)
    for key in MALIGNANT_KEYS:
        vals = [(m.get("malignant_vs_rest") or {}).get(key) for m in per_fold]
        stats[f"malignant_vs_rest.{key}"] = _mean_sd(vals)
    y = np.array([o["y"] for o in oof])
    pred = np.array([o["pred"] for o in oof])
    probs = np.stack([o["probs"] for o in oof])
    groups = np.array([f"{o['fold']}:{o['group']}" for o in oof])
    point = {k: (None if np.isnan(v[0]) else float(v[0]))
             for k, v in weighted_metrics(y, probs, pred, classes, task, np.ones((1, len(y)))).items()}
    ci = bootstrap_ci(y, probs, pred, groups, classes, task)
    pooled = _nest(point)
    return {
        "folds": len(per_fold), "classes": classes, "n": int(len(y)),
        "per_fold": [{k: m.get(k) for k in (*SUMMARY_KEYS, "n", "malignant_vs_rest", "threshold")} for m in per_fold],
        "mean_sd": stats,
        "pooled_out_of_fold": {"note": "every image predicted by the fold model that never saw it, at that fold's "
                                       "temperature and threshold; group-bootstrap 95 % intervals",
                               "intervals": attach_intervals(pooled, ci), "n_groups": ci["n_groups"]},
    }


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _mean_sd(vals: list) -> dict:
    v = np.array([x for x in vals if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "sd": None, "n_folds": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n_folds": int(len(v))}


def _write_oof(path: Path, oof: list[dict], classes: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "group", "fold", "predicted", *(f"p_{c}" for c in classes)])
    for o in oof:
        w.writerow([str(o["path"]), o["label"], o["group"], o["fold"], classes[o["pred"]],
                    *(f"{p:.6f}" for p in o["probs"])])
    atomic_write_text(path, buf.getvalue())


def format_summary(s: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"{s['folds']}-fold grouped cross-validation, {s['n']} out-of-fold predictions",
             f"{'metric':<34}{'mean':>8}{'sd':>8}{'pooled':>9}  95 % CI"]
    for key, ms in s["mean_sd"].items():
        iv = s["pooled_out_of_fold"]["intervals"].get(key, {})
        ci = f"[{f(iv.get('low'))}, {f(iv.get('high'))}]" if iv.get("low") is not None else iv.get("note", "")
        lines.append(f"{key:<34}{f(ms['mean']):>8}{f(ms['sd']):>8}{f(iv.get('value')):>9}  {ci}")
    return "\n".join(lines)
