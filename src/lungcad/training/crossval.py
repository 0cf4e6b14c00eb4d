"""`lungcad train --folds K`: grouped, stratified K-fold cross-validation, and the fold ensemble.

Run folder (OUT):
    config.json         the recipe (TrainConfig) every fold was trained with, and `folds`
    data.json           images, groups, classes, skipped files
    split.csv           every development image (subset "train": the ensemble saw them all) + its fold
    fold-k.split.csv    fold k's split: fold k is "test", the other folds "train" (no validation:
                        the epochs are part of the recipe, chosen by cross-validation)
    fold-k/             an ordinary run folder: the member trained without fold k
    oof.csv             out-of-fold predictions: every image predicted by the one member that never
                        saw it (raw logits, calibrated probabilities, the decision)
    crossval.json       per-fold metrics, their mean and sd, the pooled out-of-fold metrics with
                        group-bootstrap intervals
    metrics.json        the pooled out-of-fold metrics (what `lungcad evaluate` reports for this run)
    model.json          the ensemble's contract: its members (with sha256), the temperature and the
                        malignant threshold fitted on the pooled out-of-fold predictions (hundreds of
                        images and about a hundred groups, instead of one small validation split),
                        the out-of-distribution detector of every member

Groups are the same patient proxies the normal split uses, so no patient is ever on both sides.
The out-of-fold estimate describes one member on unseen patients; the deployed ensemble averages
K members and is usually at least as good (see docs/ablations.md).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import platform
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.model_selection import StratifiedGroupKFold

import lungcad
from lungcad.data.dataset import load_cache
from lungcad.data.discovery import discover, parse_label_map
from lungcad.data.grouping import assign_groups, scan_images, scan_results
from lungcad.data.split import SplitRow, check_no_leak, portable_path, split_summary, write_split
from lungcad.errors import LungcadError
from lungcad.evaluation.baselines import texture_features
from lungcad.evaluation.bootstrap import attach_intervals, bootstrap_ci, weighted_metrics
from lungcad.evaluation.calibration import fit_operating_point, scaled_probs
from lungcad.evaluation.metrics import classification_metrics, predict_labels
from lungcad.inference import appearance
from lungcad.inference.engines import TorchEngine
from lungcad.inference.forward import run_engine
from lungcad.inference.ood import OutOfFoldScores, ensemble_ood_entry, load_ood_detector
from lungcad.models.contract import (
    CONTRACT_FILE,
    ModelContract,
    ensemble_members,
    ensemble_sha256,
    load_model,
    read_contract,
)
from lungcad.models.factory import target_index
from lungcad.models.fusion import TextureHead, fuse
from lungcad.run import RunFolder
from lungcad.training.config import RECIPE_KEYS, TrainConfig
from lungcad.training.data import check_two_classes, output_classes
from lungcad.training.parallel import Member, check_jobs, train_in_parallel
from lungcad.training.trainer import check_out_dir, train
from lungcad.utils import atomic_write_json, atomic_write_text

__all__ = ["cross_validate", "fold_splits", "format_summary", "summarise"]

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")
MALIGNANT_KEYS = ("sensitivity", "specificity", "ppv", "roc_auc")


def fold_splits(labels: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float,
                seed: int) -> list[np.ndarray]:
    """One subset array ("train"/"val"/"test") per fold; whole groups only, stratified by label.

    With `val_fraction` 0 there is no "val": every group outside the test fold trains.
    """
    if folds < 2:
        raise LungcadError("--folds needs K >= 2")
    per_class = {c: len(np.unique(groups[labels == c])) for c in np.unique(labels)}
    need = folds + (1 if val_fraction > 0 else 0)
    short = {c: n for c, n in per_class.items() if n < need}
    if short:
        raise LungcadError(f"--folds {folds}: class(es) {', '.join(f'{c!r} ({n} groups)' for c, n in short.items())} "
                           f"need at least {need} groups (one per test fold"
                           + (" plus validation)" if val_fraction > 0 else ")"))
    out = []
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        subset = np.full(len(labels), "train", dtype=object)
        subset[test] = "test"
        if val_fraction > 0:  # about val_fraction of all images, carved from the non-test groups
            n_inner = max(2, min(round((1 - 1 / folds) / val_fraction),
                                 min(len(np.unique(groups[rest][labels[rest] == c])) for c in np.unique(labels))))
            inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + k + 1)
            _, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
            subset[rest[val]] = "val"
        out.append(subset)
    return out


def cross_validate(cfg: TrainConfig, folds: int, resume: bool = False, jobs: int = 1) -> dict:
    """Train K fold members under cfg.out, calibrate on their pooled out-of-fold predictions and
    write the ensemble's run folder (module docstring); returns the crossval.json content.

    `resume` continues an interrupted cross-validation: finished members are kept, interrupted
    ones resume from their checkpoints. `jobs` > 1 trains that many members at once, each in its
    own process (`lungcad.training.parallel`).
    """
    out = Path(cfg.out)
    if folds < 2:
        raise LungcadError("--folds needs K >= 2")
    if resume:
        cfg, folds = _resume_config(out, cfg.progress)
    else:
        check_out_dir(out)
    jobs = check_jobs(jobs, cfg.device)
    data = Path(cfg.data)
    samples = discover(data, parse_label_map(cfg.label_map))
    infos, unreadable = scan_images(samples, progress=cfg.progress)  # once: every fold's plan reuses it
    known = scan_results(samples, infos, unreadable)
    groups_all = assign_groups(samples, infos)
    keep = sorted(i.index for i in infos)  # unreadable files are left out (train would skip them too)
    samples = [samples[i] for i in keep]
    labels = np.array([s.label for s in samples])
    check_two_classes(list(labels), cfg.task, data)  # before the run folder appears
    groups = np.array([groups_all[i] for i in keep])
    splits = fold_splits(labels, groups, folds, cfg.val_fraction, cfg.resolved_fold_seed())
    if not resume:
        out.mkdir(parents=True)
        atomic_write_json(out / "config.json", {**dataclasses.asdict(cfg), "folds": folds})
        all_rows = [SplitRow(s.path, s.label, g, "train") for s, g in zip(samples, groups)]
        write_split(out / "split.csv", all_rows, data)
        atomic_write_json(out / "data.json", {
            "data": str(data), "images": len(samples), "groups": int(len(np.unique(groups))),
            "skipped": len(unreadable), "split": split_summary(all_rows), "folds": folds,
            "fold_of_image": "split.csv rows in order; see fold-k.split.csv for each fold's test images",
            "skipped_files": [{"path": str(p), "reason": r} for p, r in unreadable]})
    fold_rows, todo = [], []
    for k, subset in enumerate(splits, start=1):
        rows = [SplitRow(s.path, s.label, g, str(sub)) for s, g, sub in zip(samples, groups, subset)]
        check_no_leak(rows)
        fold_rows.append(rows)
        split_file = out / f"fold-{k}.split.csv"
        fold_dir = out / f"fold-{k}"
        if (fold_dir / CONTRACT_FILE).is_file():
            log.info("fold %d/%d: finished earlier, kept", k, folds)
            continue
        log.info("fold %d/%d: %d train, %d val, %d test images", k, folds,
                 *(int((subset == s).sum()) for s in ("train", "val", "test")))
        if (fold_dir / "checkpoint.pt").is_file():
            todo.append(Member(k, dataclasses.replace(cfg, out=str(fold_dir), fusion="none"), resume=True))
            continue
        if fold_dir.exists():  # a member that died before its first checkpoint: start it again
            import shutil

            shutil.rmtree(fold_dir)
        write_split(split_file, rows, data)
        todo.append(Member(k, dataclasses.replace(cfg, out=str(fold_dir), split=str(split_file), fusion="none")))
    if jobs > 1 and len(todo) > 1:
        train_in_parallel(todo, jobs, known, f"lungcad train --resume --folds {folds} --out {out}")
    else:
        for member in todo:
            train(member.cfg, resume=member.resume, known=known)
    per_fold, oof = [], []
    for k, rows in enumerate(fold_rows, start=1):
        fold_dir = out / f"fold-{k}"
        fold_metrics = RunFolder(fold_dir).metrics()
        if fold_metrics is None:
            raise LungcadError("fold member has no metrics.json (its training did not finish)", fold_dir)
        per_fold.append(fold_metrics)
        oof.extend(_oof(fold_dir, [r for r in rows if r.subset == "test"], k, cfg))
    return _finish_ensemble(out, cfg, folds, per_fold, oof)


def _resume_config(out: Path, progress: bool) -> tuple[TrainConfig, int]:
    run = RunFolder(out)
    try:
        cfg, folds = run.train_config(), run.folds
    except LungcadError as exc:
        raise LungcadError(f"cannot resume cross-validation: {exc}") from None
    if not folds:
        raise LungcadError("cannot resume cross-validation: config.json has no 'folds' (a single run? "
                           "lungcad train --resume continues it)", out)
    cfg.progress = progress
    return cfg, folds


def _oof(fold_dir: Path, rows: list[SplitRow], fold: int, cfg: TrainConfig) -> list[dict]:
    """The fold member on its test images: raw logits (calibration happens on the pooled set), its
    raw out-of-distribution score and its appearance check (both calibrated on the pooled set too)."""
    model, contract = load_model(fold_dir)
    pp = contract.preprocessing
    cache, bad = load_cache([r.path for r in rows], pp, progress=False)
    if bad:
        raise LungcadError(f"fold {fold}: test image became unreadable: {bad[0][1]}")
    logits, features = run_engine(TorchEngine(model), cache, pp)
    detector = load_ood_detector(fold_dir, contract.ood)
    ood = detector.score(features) if detector is not None else np.full(len(rows), np.nan)
    classes = output_classes(cfg.task)
    # the texture head's inputs (--fusion texture), from the same prepared images the member saw
    texture = texture_features(cache) if cfg.fusion == "texture" else [None] * len(rows)
    return [{"path": r.path, "label": r.label, "group": r.group, "fold": fold,
             "y": target_index(r.label, classes, cfg.task), "logits": z, "ood_score": float(s),
             "appearance_flag": bool(appearance.check(None, x, contract.appearance or {}, pp)), "texture": t}
            for r, z, s, x, t in zip(rows, logits, ood, cache, texture)]


def out_of_fold_texture(features: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int,
                        seed: int = 0) -> np.ndarray:
    """The texture head's out-of-fold probabilities: fold k's images by a head fitted on the other
    folds, as each network member was trained."""
    probs = np.zeros((len(y), n_classes))
    for k in np.unique(folds):
        mine = folds == k
        probs[mine] = TextureHead.fit(features[~mine], y[~mine], n_classes, seed).predict_proba(features[mine])
    return probs


def _fused_with(texture: np.ndarray | None):
    return None if texture is None else partial(fuse, p_texture=texture)


def fused_operating_point(logits: torch.Tensor, y: np.ndarray, task: str, classes: list[str],
                          target_sensitivity: float, fitted_on: str, texture: np.ndarray | None = None) -> dict:
    """`fit_operating_point`, with a texture head's probabilities for the same images (`texture`):
    temperature and threshold are then fitted on the fused probabilities, the ones inference
    produces (the network alone is overconfident, the fused mean much less: docs/ablations.md)."""
    op = fit_operating_point(logits, y, task, classes, target_sensitivity, fitted_on, _fused_with(texture))
    if texture is not None:
        op["fusion"] = "temperature and threshold fitted on the texture-fused probabilities"
    return op


def cross_fitted(logits: torch.Tensor, y: np.ndarray, folds: np.ndarray, task: str, classes: list[str],
                 target_sensitivity: float, texture: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """Calibrated probabilities and decisions for every out-of-fold image, with the temperature and
    threshold fitted on the *other* folds' out-of-fold predictions (so no image helps choose its
    own operating point: the sensitivity reported is the one a new patient would meet, not the
    target by construction). `texture`: the texture head's out-of-fold probabilities, fused as
    inference fuses them. Returns (probs, predictions, operating point per fold)."""
    probs = np.zeros((len(y), len(classes)))
    pred = np.zeros(len(y), dtype=int)
    per_fold = {}
    for k in np.unique(folds):
        mine = folds == k
        op = fused_operating_point(logits[~mine], y[~mine], task, classes, target_sensitivity,
                                   f"out-of-fold predictions outside fold {k}",
                                   None if texture is None else texture[~mine])
        probs[mine] = scaled_probs(logits[mine], task, op["temperature"],
                                   _fused_with(None if texture is None else texture[mine]))
        pred[mine] = predict_labels(probs[mine], task, op["threshold"], classes)
        per_fold[int(k)] = {"temperature": op["temperature"], "threshold": op["threshold"]}
    return probs, pred, per_fold


def _finish_ensemble(out: Path, cfg: TrainConfig, folds: int, per_fold: list[dict], oof: list[dict]) -> dict:
    classes = output_classes(cfg.task)
    logits = torch.as_tensor(np.stack([o["logits"] for o in oof]), dtype=torch.float32)
    y = np.array([o["y"] for o in oof])
    fold_of = np.array([o["fold"] for o in oof])
    texture, head = None, None
    if cfg.fusion == "texture":
        features = np.stack([o["texture"] for o in oof])
        texture = out_of_fold_texture(features, y, fold_of, len(classes), cfg.seed)
        head = TextureHead.fit(features, y, len(classes), cfg.seed)  # the deployed head: every image
    # the deployed operating point: fitted on every out-of-fold prediction
    op = fused_operating_point(logits, y, cfg.task, classes, cfg.target_sensitivity, "pooled out-of-fold predictions",
                               texture)
    # the honest estimate of what it does on new patients: cross-fitted (see cross_fitted)
    probs, pred, fold_ops = cross_fitted(logits, y, fold_of, cfg.task, classes, cfg.target_sensitivity, texture)
    op["cross_fitted"] = fold_ops
    for o, p, pr in zip(oof, pred, probs):
        o["pred"], o["probs"] = int(p), pr
    summary = summarise(per_fold, oof, cfg.task, classes)
    summary["operating_point"] = op
    atomic_write_json(out / "crossval.json", summary)
    _write_oof(out / "oof.csv", oof, classes, Path(cfg.data), texture)
    metrics = {"subset": "out-of-fold", "folds": folds,
               **classification_metrics(y, probs, classes, cfg.task, y_pred=pred)}
    atomic_write_json(out / "metrics.json", metrics)

    members = [read_contract(out / f"fold-{k}") for k in range(1, folds + 1)]
    first = members[0]
    contract = ModelContract(
        arch=first.arch, task=cfg.task, classes=classes, preprocessing=first.preprocessing, init=first.init,
        training={
            "data": cfg.data, "folds": folds, "recipe": {k: getattr(cfg, k) for k in RECIPE_KEYS},
            "seed": cfg.seed, "fold_seed": cfg.resolved_fold_seed(),
            "lr": cfg.resolved_lr(), "operating_point": op,
            "data_fingerprints_sha256": [m.training.get("data_fingerprint_sha256") for m in members],
        },
        temperature=1.0,  # the members' temperature is inside the ensemble (ensemble.member_temperature)
        thresholds={"malignant": op["threshold"]},
        metrics={"subset": "out-of-fold", **{k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy",
                                                                       "macro_f1", "roc_auc")}},
        versions={"lungcad": lungcad.__version__, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": platform.python_version()},
        ood=_ensemble_ood(members, oof),
        # every member's training images are K-1 of the K folds of the same data: one profile serves
        appearance=first.appearance,
        ensemble={"members": [{"path": f"fold-{k}", "model_sha256": m.model_sha256}
                              for k, m in enumerate(members, start=1)],
                  "member_temperature": op["temperature"],
                  "combine": "mean of the members' probabilities at member_temperature"},
        fusion=head.to_dict() if head is not None else {},
        model_sha256=ensemble_sha256([m.model_sha256 for m in members]),
    )
    atomic_write_json(out / CONTRACT_FILE, contract.to_dict())
    # The folder must load as a model before we call it done: every member's weights were loaded
    # and sha256-checked by _oof moments ago, so reading the contracts back is what is left to check.
    ensemble_members(out, read_contract(out))
    return summary


def _ensemble_ood(members: list[ModelContract], oof: list[dict]) -> dict:
    entries = [(f"fold-{k}", m.ood) for k, m in enumerate(members, start=1)]
    scores = np.array([o["ood_score"] for o in oof])
    if np.isnan(scores).any():  # a member without a detector: ensemble_ood_entry warns and returns {}
        return ensemble_ood_entry(entries)
    pooled = OutOfFoldScores(scores, np.array([o["fold"] for o in oof]), np.array([o["group"] for o in oof]),
                             np.array([o["appearance_flag"] for o in oof]))
    entry = ensemble_ood_entry(entries, pooled)
    rates = entry["calibration"]["cross_fitted_false_flags"]
    log.info("out-of-distribution: threshold %.3g (%.2f quantile of %d out-of-fold scores); in-distribution "
             "images flagged on new patients (cross-fitted): feature %.1f %%, appearance %.1f %%, either %.1f %% "
             "[95 %% CI %.1f, %.1f]", entry["threshold"], entry["quantile"], len(scores),
             100 * rates["feature"]["rate"], 100 * rates["appearance"]["rate"], 100 * rates["either"]["rate"],
             *(100 * v for v in rates["either"]["ci95"]))
    return entry


def summarise(per_fold: list[dict], oof: list[dict], task: str, classes: list[str]) -> dict:
    stats = {}
    for key in SUMMARY_KEYS:
        stats[key] = _mean_sd([m.get(key) for m in per_fold])
    for key in MALIGNANT_KEYS:
        stats[f"malignant_vs_rest.{key}"] = _mean_sd([(m.get("malignant_vs_rest") or {}).get(key) for m in per_fold])
    y = np.array([o["y"] for o in oof])
    pred = np.array([o["pred"] for o in oof])
    probs = np.stack([o["probs"] for o in oof])
    groups = np.array([f"{o['fold']}:{o['group']}" for o in oof])
    point = {k: (None if np.isnan(v[0]) else float(v[0]))
             for k, v in weighted_metrics(y, probs, pred, classes, task, np.ones((1, len(y)))).items()}
    ci = bootstrap_ci(y, probs, pred, groups, classes, task)
    return {
        "folds": len(per_fold), "classes": classes, "n": int(len(y)),
        "per_fold": [{k: m.get(k) for k in (*SUMMARY_KEYS, "n", "malignant_vs_rest", "threshold")} for m in per_fold],
        "per_fold_note": "each member on its own test fold at temperature 1 and argmax (members are not calibrated "
                         "alone)",
        "mean_sd": stats,
        "pooled_out_of_fold": {"note": "every image predicted by the fold member that never saw it, at the "
                                       "temperature and threshold fitted on the other folds' out-of-fold "
                                       "predictions; group-bootstrap 95 % intervals",
                               "intervals": attach_intervals(_nest(point), ci), "n_groups": ci["n_groups"]},
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


def _write_oof(path: Path, oof: list[dict], classes: list[str], root: Path, texture: np.ndarray | None = None) -> None:
    """oof.csv; with a texture head, its out-of-fold probabilities too (texture_p_*: what the
    cross-fitted fusion was computed from)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n_logits = len(oof[0]["logits"]) if oof else 0
    w.writerow(["path", "label", "group", "fold", "predicted", *(f"p_{c}" for c in classes),
                *(f"logit_{i}" for i in range(n_logits)), *(f"texture_p_{c}" for c in classes if texture is not None)])
    for i, o in enumerate(oof):
        w.writerow([portable_path(o["path"], root), o["label"], o["group"], o["fold"], classes[o["pred"]],
                    *(f"{p:.6f}" for p in o["probs"]), *(f"{z:.6f}" for z in o["logits"]),
                    *(f"{p:.6f}" for p in (texture[i] if texture is not None else ()))])
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
    op = s.get("operating_point")
    if op:
        lines.append(f"pooled calibration: temperature {op['temperature']:.3f}, malignant threshold "
                     f"{op['threshold']:.3f} (out-of-fold sensitivity {f(op['validation'].get('sensitivity'))}, "
                     f"specificity {f(op['validation'].get('specificity'))})")
    return "\n".join(lines)
