"""Rows of the comparison table: baselines (a)-(c) and other run folders (d), scored on exactly the
evaluation images and groups the model was scored on. See `lungcad.evaluation.baselines`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lungcad.data.dataset import load_cache
from lungcad.errors import LungcadError
from lungcad.evaluation.baselines import majority_probs, metadata_features, run_feature_baselines, texture_features
from lungcad.evaluation.calibration import TARGET_SENSITIVITY, decision_threshold
from lungcad.inference.engine import infer_logits
from lungcad.models.contract import ModelContract, load_model
from lungcad.models.factory import logits_to_probs

log = logging.getLogger(__name__)


def baseline_rows(run_dir: Path, contract: ModelContract, cache: torch.Tensor, paths: list[Path], y: np.ndarray,
                  groups: np.ndarray, compare: list, baselines: bool, progress: bool, n_boot: int,
                  seed: int) -> list[dict]:
    from lungcad.evaluation.evaluate import run_split, score_probs
    from lungcad.models.factory import target_index

    classes, task = contract.classes, contract.task
    target = (contract.training.get("operating_point") or {}).get("validation", {}).get(
        "target_sensitivity") or TARGET_SENSITIVITY
    common = dict(y=y, groups=groups, classes=classes, task=task, n_boot=n_boot, seed=seed)
    rows: list[dict] = []
    if baselines:
        try:
            split = run_split(run_dir)
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
        feats = {k: texture_features(v, progress) for k, v in caches.items()}
        feats["eval"] = texture_features(cache, progress)
        p, thr, info = run_feature_baselines(feats, t, classes, task, target, "classical", seed)
        rows.append(score_probs("(b) classical texture model",
                                "intensity histogram + GLCM + LBP features, logistic regression; "
                                "threshold on validation", probs=p, threshold=thr, validation=info, **common))
        meta = {"train": metadata_features([r.path for r in train]), "val": metadata_features([r.path for r in val]),
                "eval": metadata_features(paths)}
        p, thr, info = run_feature_baselines(meta, t, classes, task, target, "metadata", seed)
        rows.append(score_probs("(c) metadata shortcut", "audit's depth-3 tree on file size, image size, "
                                "mode, format only; threshold on validation", probs=p, threshold=thr,
                                validation=info, **common))
    return rows + _compare_rows(compare, paths, common)


def _compare_rows(compare: list, paths: list[Path], common: dict) -> list[dict]:
    from lungcad.evaluation.evaluate import _init_text, run_split, score_probs

    rows = []
    for other in compare:
        other = Path(other)
        model, c = load_model(other)
        if c.classes != common["classes"] or c.task != common["task"]:
            raise LungcadError(f"--compare run predicts {c.task} {c.classes}, not {common['task']} "
                               f"{common['classes']}", other)
        try:  # a compare run trained on our evaluation images would flatter itself
            seen = {r.path.resolve() for r in run_split(other) if r.subset != "test"}
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
        probs = logits_to_probs(logits, c.task, c.temperature).numpy()
        rows.append(score_probs(f"(d) {other.name}", f"ResNet-50, {_init_text(c)} (run folder {other})",
                                probs=probs, threshold=decision_threshold(c), **common))
    return rows
