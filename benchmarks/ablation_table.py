"""The ablation table of docs/ablations.md, from finished `lungcad train --folds K` run folders.

Every run is scored the same way, from the raw out-of-fold logits in its oof.csv: temperature and
malignant threshold cross-fitted (fitted on the other folds' out-of-fold predictions, see
`lungcad.training.crossval.cross_fitted`), metrics pooled over all folds with 95 % group-bootstrap
intervals, and the paired difference in balanced accuracy against the first run given (the
reference) and against the texture baseline on the same folds.

With `--tta`, each run gets a second row with test-time flip averaging: the out-of-fold logits
are recomputed by each member on its held-out fold, averaged over the image and its mirror.

With `--fuse-texture`, each run gets a row fused with a texture head cross-validated on its folds,
scored exactly as a `train --folds K --fusion texture` run scores itself (lungcad.models.fusion).

With `--unfused`, a `--fusion texture` run also gets a row for its network alone (the same
out-of-fold logits, calibrated and thresholded without the head).

With `--average`, the runs are taken as replicates of one recipe on the same folds (another seed,
or the same seed trained with other thread counts) and a last row scores the mean of their
out-of-fold probabilities: each image then has several members that never saw it, which measures
out of fold what averaging members buys (the deployed ensemble averages the K members of a run,
which out-of-fold figures of one run cannot show).

    python benchmarks/ablation_table.py RUN_A RUN_B ... [--texture] [--tta] [--fuse-texture] [--unfused] [--average] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lungcad.data.dataset import load_cache
from lungcad.evaluation.baselines import out_of_fold_baseline, texture_features
from lungcad.evaluation.bootstrap import metrics_with_intervals, paired_difference
from lungcad.evaluation.calibration import calibration_summary
from lungcad.inference.engines import TorchEngine
from lungcad.inference.forward import cache_batches
from lungcad.models.contract import load_model
from lungcad.models.factory import target_index
from lungcad.run import RunFolder
from lungcad.training.crossval import cross_fitted, out_of_fold_texture


def flip_tta_logits(run: RunFolder) -> np.ndarray:
    """Out-of-fold logits with test-time flip averaging: each image's logits from the member that
    never saw it, averaged over the image and its horizontal mirror (oof.csv's order)."""
    oof = run.out_of_fold()
    out = np.zeros_like(oof.logits, dtype=np.float64)
    for fold in sorted(set(int(f) for f in oof.folds)):
        model, contract = load_model(run.path / f"fold-{fold}")
        engine, pp = TorchEngine(model), contract.preprocessing
        idx = np.flatnonzero(oof.folds == fold)
        cache, bad = load_cache([oof.paths[i] for i in idx], pp, progress=False)
        if bad:
            raise SystemExit(f"{bad[0][0]}: {bad[0][1]}")
        start = 0
        for x in cache_batches(cache, pp, batch_size=64):
            plain, _ = engine.run(x)
            flipped, _ = engine.run(torch.flip(x, dims=[-1]))
            out[idx[start : start + len(x)]] = (plain + flipped) / 2
            start += len(x)
    return out


def texture_oof(run: RunFolder, y: np.ndarray) -> np.ndarray:
    """A texture head's out-of-fold probabilities on a run's folds (what `--fusion texture` would
    have fused): features of the run's prepared images, one head per fold fitted on the others."""
    contract, oof = run.contract(), run.out_of_fold()
    cache, bad = load_cache(oof.paths, contract.preprocessing, progress=False)
    if bad:
        raise SystemExit(f"{bad[0][0]}: {bad[0][1]}")
    return out_of_fold_texture(texture_features(cache), y, oof.folds, len(contract.classes),
                               int(run.config.get("seed", 0)))


def score(run_dir: Path, tta: bool = False, logits: np.ndarray | None = None, name: str | None = None,
          fuse_texture: bool = False, unfused: bool = False) -> dict:
    run = RunFolder(run_dir)
    contract = run.contract()
    oof = run.out_of_fold()
    classes, task = contract.classes, contract.task
    y = np.array([target_index(lab, classes, task) for lab in oof.labels])
    groups = np.array([f"{f}:{g}" for f, g in zip(oof.folds, oof.groups)])
    target = contract.training["operating_point"]["validation"]["target_sensitivity"]
    if logits is None:
        logits = flip_tta_logits(run) if tta else oof.logits
    texture = None if unfused else oof.texture  # a --fusion texture run's own head
    if unfused and oof.texture is not None:
        name = name or f"{run_dir.name} (network alone)"
    if fuse_texture and texture is None:
        texture = texture_oof(run, y)
        name = name or f"{run_dir.name} + texture head"
    probs, pred, _ = cross_fitted(torch.as_tensor(logits, dtype=torch.float32), y, oof.folds, task, classes,
                                  target, texture)
    m = metrics_with_intervals(y, probs, None, groups, classes, task, pred=pred)
    recipe = contract.training.get("recipe", {})
    seconds = [float(r["seconds"]) for member in run.members() for r in member.history()]
    return {"run": name or (run_dir.name + (" + flip TTA" if tta else "")), "recipe": recipe, "y": y, "probs": probs, "pred": pred, "groups": groups,
            "folds": oof.folds, "paths": oof.paths, "classes": classes, "task": task, "target": target,
            "metrics": m, "ece": calibration_summary(probs, y, task)["ece"],
            "train_minutes": sum(seconds) / 60.0, "pp": contract.preprocessing}


def averaged_logits(run_dirs: list[Path]) -> np.ndarray:
    """log of the mean of the runs' out-of-fold probabilities (temperature 1), as logits for `score`
    (the cross-fitted temperature then re-calibrates the average); the runs must share their folds."""
    runs = [RunFolder(r) for r in run_dirs]
    oofs = [run.out_of_fold() for run in runs]
    # the images under each run's data root (one run may name the data folder relatively, another absolutely)
    images = [[p.relative_to(run.data_root) for p in o.paths] for run, o in zip(runs, oofs)]
    for r, o, names in zip(run_dirs[1:], oofs[1:], images[1:]):
        if names != images[0] or not np.array_equal(o.folds, oofs[0].folds):
            raise SystemExit(f"{r}: not the same images and folds as {run_dirs[0]}: cannot average out of fold")
    task = runs[0].contract().task
    z = [torch.as_tensor(o.logits, dtype=torch.float64) for o in oofs]
    if task == "binary":  # one logit: average the sigmoids, back to a logit
        p = torch.stack([torch.sigmoid(x) for x in z]).mean(0).clamp(1e-12, 1 - 1e-12)
        return torch.log(p / (1 - p)).numpy()
    p = torch.stack([torch.softmax(x, dim=1) for x in z]).mean(0)
    return torch.log(p.clamp_min(1e-12)).numpy()


def _ci(m: dict, key: str) -> str:
    v = m["intervals"][key]
    if v["value"] is None:
        return "n/a"
    if v.get("low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--texture", action="store_true", help="add the texture baseline on the first run's folds")
    ap.add_argument("--tta", action="store_true",
                    help="add a row per run with test-time flip averaging (recomputes its out-of-fold logits)")
    ap.add_argument("--fuse-texture", action="store_true",
                    help="add a row per run fused with a texture head fitted on its folds (as --fusion texture)")
    ap.add_argument("--unfused", action="store_true",
                    help="add a row per --fusion texture run scoring its network alone (its fold members' logits)")
    ap.add_argument("--average", action="store_true",
                    help="add a row for the mean of the runs' out-of-fold probabilities (replicates on the same folds)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)
    rows = []
    for r in args.runs:
        rows.append(score(r))
        if args.tta:
            rows.append(score(r, tta=True))
        if args.fuse_texture:
            rows.append(score(r, fuse_texture=True))
        if args.unfused and RunFolder(r).out_of_fold().texture is not None:
            rows.append(score(r, unfused=True))
    if args.average:
        rows.append(score(args.runs[0], logits=averaged_logits(args.runs),
                          name="mean of " + " + ".join(r.name for r in args.runs)))
    ref = rows[0]
    header = ("| run | balanced accuracy | macro-F1 | malignant ROC-AUC | sensitivity / specificity | ECE | "
              "Δ bal. acc. vs first [95 % CI] | training min |")
    lines = [header, "|" + "---|" * 8]
    table = []
    for r in rows:
        m = r["metrics"]
        mv = m["malignant_vs_rest"]
        if r is ref:
            diff = "reference"
        else:
            same = all(np.array_equal(a, b) for a, b in ((r["y"], ref["y"]), (r["folds"], ref["folds"])))
            if not same:
                diff = "other folds"
            else:
                d = paired_difference(r["y"], r["probs"], r["pred"], ref["probs"], ref["pred"], r["groups"],
                                      r["classes"], r["task"])
                diff = f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"| {r['run']} | {_ci(m, 'balanced_accuracy')} | {_ci(m, 'macro_f1')} | "
                     f"{_ci(m, 'malignant_vs_rest.roc_auc')} | {mv['sensitivity']:.3f} / {mv['specificity']:.3f} | "
                     f"{r['ece']:.3f} | {diff} | {r['train_minutes']:.0f} |")
        table.append({"run": r["run"], "recipe": r["recipe"], "balanced_accuracy": m["intervals"]["balanced_accuracy"],
                      "macro_f1": m["intervals"]["macro_f1"],
                      "malignant_roc_auc": m["intervals"]["malignant_vs_rest.roc_auc"],
                      "sensitivity": mv["sensitivity"], "specificity": mv["specificity"], "fp": mv["fp"],
                      "fn": mv["fn"], "ece": r["ece"], "difference_vs_first": diff,
                      "train_minutes": r["train_minutes"]})
    if args.texture:
        cache, bad = load_cache(ref["paths"], ref["pp"], progress=False)
        assert not bad, bad[:1]
        probs, pred = out_of_fold_baseline(texture_features(cache), ref["y"], ref["folds"], ref["classes"],
                                           ref["task"], ref["target"], "classical")
        m = metrics_with_intervals(ref["y"], probs, None, ref["groups"], ref["classes"], ref["task"], pred=pred)
        mv = m["malignant_vs_rest"]
        # paired against the first run, and against the runs' mean when there is one
        compared = {"first run": ref, **({"mean": rows[-1]} if args.average else {}),
                    **{r["run"]: r for r in rows if r["run"].endswith("+ texture head")}}
        diffs = {who: paired_difference(ref["y"], r["probs"], r["pred"], probs, pred, ref["groups"], ref["classes"],
                                        ref["task"]) for who, r in compared.items()}
        text = "; ".join(f"{who} minus texture: {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                         for who, d in diffs.items())
        lines.append(f"| texture baseline (same folds) | {_ci(m, 'balanced_accuracy')} | {_ci(m, 'macro_f1')} | "
                     f"{_ci(m, 'malignant_vs_rest.roc_auc')} | {mv['sensitivity']:.3f} / {mv['specificity']:.3f} | "
                     f"{calibration_summary(probs, ref['y'], ref['task'])['ece']:.3f} | {text} | - |")
        table.append({"run": "texture baseline", "balanced_accuracy": m["intervals"]["balanced_accuracy"],
                      "first_minus_texture": diffs["first run"], "mean_minus_texture": diffs.get("mean"),
                      "fused_minus_texture": {k: v for k, v in diffs.items() if k.endswith("+ texture head")},
                      "fp": mv["fp"], "fn": mv["fn"]})
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
