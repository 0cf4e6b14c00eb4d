"""The comparison table: baselines (a)-(c) and other run folders (d), scored on exactly the
evaluation images and groups the model was scored on. See `lungcad.evaluation.baselines`.

For a fold ensemble evaluated on its own images, the baselines are cross-validated on the same
folds with the same cross-fitted threshold rule, and each row carries the paired group-bootstrap
difference in balanced accuracy against the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lungcad.data.dataset import load_cache
from lungcad.errors import LungcadError
from lungcad.evaluation.baselines import (
    majority_probs,
    metadata_features,
    out_of_fold_baseline,
    run_feature_baselines,
    texture_features,
)
from lungcad.evaluation.bootstrap import metrics_with_intervals, paired_difference
from lungcad.evaluation.calibration import TARGET_SENSITIVITY
from lungcad.inference.forward import infer_logits
from lungcad.models.contract import ModelContract, load_model
from lungcad.models.factory import target_index
from lungcad.models.fusion import contract_probs
from lungcad.run import RunFolder

__all__ = ["baseline_rows", "comparison_row", "init_text", "out_of_fold_baseline_rows", "score_probs"]

log = logging.getLogger(__name__)


def init_text(contract: ModelContract) -> str:
    init = contract.init.get("pretrained", "?")
    return {"none": "random initialisation", "imagenet": "ImageNet initialisation"}.get(init, f"init: {init}")


def comparison_row(name: str, detail: str, m: dict) -> dict:
    """One line of the comparison table: the same metrics (with intervals) for every method."""
    mv = m.get("malignant_vs_rest") or {}
    iv = m.get("intervals", {})

    def ci(key):
        v = iv.get(key, {})
        return {"value": v.get("value"), "low": v.get("low"), "high": v.get("high")}

    return {
        "method": name, "detail": detail, "threshold": m.get("threshold"),
        "accuracy": ci("accuracy"), "balanced_accuracy": ci("balanced_accuracy"), "macro_f1": ci("macro_f1"),
        "roc_auc": ci("roc_auc"),
        "sensitivity": ci("malignant_vs_rest.sensitivity"), "specificity": ci("malignant_vs_rest.specificity"),
        "false_positives": mv.get("fp"), "false_negatives": mv.get("fn"),
        "per_class_false_positives": {c: v["false_positives"] for c, v in m["per_class"].items()},
        "per_class_false_negatives": {c: v["false_negatives"] for c, v in m["per_class"].items()},
    }


def score_probs(name: str, detail: str, y: np.ndarray, probs: np.ndarray, threshold: float | None,
                groups: np.ndarray, classes: list[str], task: str, n_boot: int, seed: int, pred=None,
                **extra) -> dict:
    """A comparison-table row for any method's probabilities on the evaluation images."""
    m = metrics_with_intervals(y, probs, threshold, groups, classes, task, n_boot, seed, pred=pred)
    return {**comparison_row(name, detail, m), **extra}


def _target_sensitivity(contract: ModelContract) -> float:
    return ((contract.training.get("operating_point") or {}).get("validation", {}).get("target_sensitivity")
            or TARGET_SENSITIVITY)


def out_of_fold_baseline_rows(contract: ModelContract, s, n_boot: int, seed: int, progress: bool) -> list[dict]:
    """Baselines (a)-(c) cross-validated on the ensemble's own folds (`s`: evaluate's Scored set)."""
    classes, task = contract.classes, contract.task
    target = _target_sensitivity(contract)
    common = dict(y=s.y, groups=s.groups, classes=classes, task=task, n_boot=n_boot, seed=seed)
    rows = []
    majority = np.zeros((len(s.y), len(classes)))
    for k in np.unique(s.folds):
        mine = s.folds == k
        majority[mine] = majority_probs(s.y[~mine], int(mine.sum()), len(classes))
    rows.append(score_probs("(a) majority class", "always the commonest class of the other folds", probs=majority,
                            threshold=0.5 if task == "binary" else None, **common))
    for name, detail, which, feats in (
        ("(b) classical texture model", "intensity histogram + GLCM + LBP features, logistic regression; "
         "cross-validated on the same folds, threshold cross-fitted like the model's", "classical",
         texture_features(s.cache, progress)),
        ("(c) metadata shortcut", "audit's depth-3 tree on file size, image size, mode, format only; same folds",
         "metadata", metadata_features(s.paths)),
    ):
        probs, pred = out_of_fold_baseline(feats, s.y, s.folds, classes, task, target, which, seed)
        diff = paired_difference(s.y, s.probs, s.pred, probs, pred, s.groups, classes, task, n_boot=n_boot,
                                 seed=seed)
        rows.append(score_probs(name, detail, probs=probs, threshold=None, pred=pred,
                                model_minus_this=diff, **common))
    return rows


def baseline_rows(run_dir: Path, contract: ModelContract, cache: torch.Tensor, paths: list[Path], y: np.ndarray,
                  groups: np.ndarray, compare: list, baselines: bool, progress: bool, n_boot: int,
                  seed: int, features: np.ndarray | None = None) -> list[dict]:
    """Rows (a)-(c) and --compare's runs, on the evaluation images (`cache`; `features`: their texture
    features when the caller has computed them already)."""
    classes, task = contract.classes, contract.task
    target = _target_sensitivity(contract)
    common = dict(y=y, groups=groups, classes=classes, task=task, n_boot=n_boot, seed=seed)
    rows: list[dict] = []
    if baselines:
        try:
            split = RunFolder(run_dir).split()
        except LungcadError as exc:
            log.warning("baselines skipped: %s", exc)
            return [{"method": "baselines (a)-(c)", "note": f"skipped: {exc}"}] + _compare_rows(compare, paths, common)
        train = [r for r in split if r.subset == "train"]
        val = [r for r in split if r.subset == "val"]
        t = {"train": np.array([target_index(r.label, classes, task, run_dir) for r in train]),
             "val": np.array([target_index(r.label, classes, task, run_dir) for r in val]), "eval": y}
        rows.append(score_probs("(a) majority class", "always the commonest training class",
                                probs=majority_probs(t["train"], len(y), len(classes)),
                                threshold=0.5 if task == "binary" else None, **common))
        try:
            caches = {}
            for name, subset in (("train", train), ("val", val)):
                caches[name], bad = load_cache([r.path for r in subset], contract.preprocessing, progress=progress,
                                               desc=f"decoding {name} (baselines)")
                if bad:
                    raise LungcadError(f"{len(bad)} training image(s) unreadable, e.g. {bad[0][1]}")
        except LungcadError as exc:
            log.warning("baselines (b), (c) skipped: %s", exc)
            rows.append({"method": "(b), (c)", "note": f"skipped: training images unavailable ({exc})"})
            return rows + _compare_rows(compare, paths, common)
        # a fold ensemble has no validation split: thresholds on the baselines' out-of-fold probabilities
        folds = _training_folds(run_dir, train) if not val else None
        feats = {k: texture_features(v, progress) for k, v in caches.items() if len(v)}
        feats["eval"] = texture_features(cache, progress) if features is None else features
        p, thr, info = run_feature_baselines(feats, t, classes, task, target, "classical", seed, folds)
        rows.append(score_probs("(b) classical texture model",
                                "intensity histogram + GLCM + LBP features, logistic regression; "
                                "threshold on validation", probs=p, threshold=thr, validation=info, **common))
        meta = {"train": metadata_features([r.path for r in train]), "val": metadata_features([r.path for r in val]),
                "eval": metadata_features(paths)}
        p, thr, info = run_feature_baselines(meta, t, classes, task, target, "metadata", seed, folds)
        rows.append(score_probs("(c) metadata shortcut", "audit's depth-3 tree on file size, image size, "
                                "mode, format only; threshold on validation", probs=p, threshold=thr,
                                validation=info, **common))
    return rows + _compare_rows(compare, paths, common)


def _training_folds(run_dir: Path, train: list) -> np.ndarray:
    """The fold of each training image of a fold ensemble (from its oof.csv)."""
    oof = RunFolder(run_dir).out_of_fold()
    fold_of = {Path(p).resolve(): int(f) for p, f in zip(oof.paths, oof.folds)}
    try:
        return np.array([fold_of[Path(r.path).resolve()] for r in train])
    except KeyError as exc:
        raise LungcadError(f"training image {exc} is not in oof.csv", run_dir) from None


def _compare_rows(compare: list, paths: list[Path], common: dict) -> list[dict]:
    rows = []
    for other in compare:
        other = Path(other)
        model, c = load_model(other)
        if c.classes != common["classes"] or c.task != common["task"]:
            raise LungcadError(f"--compare run predicts {c.task} {c.classes}, not {common['task']} "
                               f"{common['classes']}", other)
        try:  # a compare run trained on our evaluation images would flatter itself
            seen = {r.path.resolve() for r in RunFolder(other).split() if r.subset != "test"}
        except LungcadError:
            seen = set()
        leaked = sum(Path(p).resolve() in seen for p in paths)
        if leaked:
            raise LungcadError(f"--compare run trained or validated on {leaked} of the evaluation images; "
                               "train it with --split on the same split.csv", other)
        cache, bad = load_cache(paths, c.preprocessing, progress=False, desc=f"decoding ({other.name})")
        if bad:
            raise LungcadError(f"cannot decode {len(bad)} evaluation image(s) for the compare run", other)
        logits = infer_logits(model.to(memory_format=torch.channels_last), cache, c.preprocessing)
        probs = contract_probs(logits, cache, c)
        rows.append(score_probs(f"(d) {other.name}", f"ResNet-50, {init_text(c)} (run folder {other})",
                                probs=probs, threshold=c.decision_threshold(), **common))
    return rows
