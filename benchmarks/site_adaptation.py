"""How much do a few labelled images of a new site recover? `lungcad train --init-from`, measured.

A new "site" is built from patients a model never saw: the held-out fold of one member of a fold
ensemble, every slice re-rendered with one of `ood_shifts.SHIFTS` (by default the lung window: the
soft-tissue JPEG mapped back to HU and shown at level -600 / width 1500, the way a lung-window
export from another hospital looks). Its patients are split into grouped inner folds; for each
inner fold the member is fine-tuned (`lungcad train --init-from MEMBER --data SITE --split ...`)
on labelled images of the *other* inner folds' patients (all of them, or only `--patients N`
of them: "a few labelled local cases") and scored on the inner fold's. Three arms on the same
images, pooled over the inner folds, with 95 % group-bootstrap intervals:

- the member on the site's images as they were (no shift: the ceiling),
- the member on the shifted images (no adaptation: what a site would get out of the box),
- the fine-tuned member on the shifted images (adaptation), one row per patient budget;
- with `--adapt-bn`: also the member with its BatchNorm statistics re-estimated on the other inner
  folds' shifted images and nothing else (AdaBN: no labels at all), and every fine-tuning starts
  with that re-estimation (`lungcad train --adapt-bn`).

The fine-tuning recipe is `lungcad train --init-from`'s default (all layers, AdamW 3e-4) unless
`--finetune fc|layer4` and/or `--lr` say otherwise: a few patients can overfit all layers.

Decisions are argmax of the three classes for every arm (the fine-tuned runs have no validation
images to calibrate on); the malignant ROC-AUC does not depend on a threshold.

    python benchmarks/site_adaptation.py RUN --data DATA [--member 1] [--shift NAME]
        [--patients 4 8 all] [--inner-folds 5] [--epochs 8] [--finetune all|layer4|fc] [--lr LR]
        [--adapt-bn] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from lungcad.cli import main as lungcad_main
from lungcad.data.dataset import load_cache
from lungcad.data.images import decode_image
from lungcad.evaluation.bootstrap import metrics_with_intervals
from lungcad.inference.engines import TorchEngine
from lungcad.inference.forward import run_engine
from lungcad.models.contract import load_model
from lungcad.models.factory import logits_to_probs
from lungcad.training.init_from import adapt_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_shifts import SHIFTS  # noqa: E402

from _machine import detect  # noqa: E402


def _cache(paths: list[Path], contract) -> torch.Tensor:
    cache, bad = load_cache(paths, contract.preprocessing, progress=False)
    if bad:
        raise SystemExit(f"unreadable: {bad[0]}")
    return cache


def _probs(run_dir: Path, paths: list[Path], adapt_on: list[Path] | None = None) -> tuple[np.ndarray, list[str]]:
    """The run's calibrated probabilities on `paths`; first AdaBN on `adapt_on` when given."""
    model, contract = load_model(run_dir)
    if adapt_on is not None:
        adapt_batchnorm(model, _cache(adapt_on, contract), contract.preprocessing)
    logits, _ = run_engine(TorchEngine(model), _cache(paths, contract), contract.preprocessing)
    return logits_to_probs(torch.as_tensor(logits), contract.task, contract.temperature).numpy(), contract.classes


def _summary(y, probs, groups, classes, task) -> dict:
    m = metrics_with_intervals(y, probs, None, groups, classes, task)
    keys = ("balanced_accuracy", "macro_f1", "malignant_vs_rest.roc_auc")
    return {k: m["intervals"][k] for k in keys if k in m["intervals"]}


def _budget_groups(train_groups: np.ndarray, labels: np.ndarray, n: int, rng) -> set:
    """n patients of the training folds, at least one per class present (stratified by the group's label)."""
    by_class: dict[str, list] = {}
    for g in np.unique(train_groups):
        by_class.setdefault(labels[train_groups == g][0], []).append(g)
    chosen = [rng.choice(sorted(gs)) for gs in by_class.values()]
    rest = [g for gs in by_class.values() for g in gs if g not in chosen]
    extra = rng.choice(rest, size=max(0, min(n - len(chosen), len(rest))), replace=False) if rest else []
    return set(chosen) | set(extra)


def measure(run: Path, data: Path, member: int, shift: str, budgets: list[str], inner_folds: int, epochs: int,
            work: Path, recipe: list[str] = ()) -> dict:
    """The arms (module docstring) on member `member`'s held-out patients; `recipe`: extra
    `lungcad train` options of every fine-tuning (e.g. ["--finetune", "layer4", "--adapt-bn"])."""
    member_dir = run / f"fold-{member}"
    rows = [r for r in csv.DictReader(open(run / f"fold-{member}.split.csv")) if r["subset"] == "test"]
    contract = load_model(member_dir)[1]
    classes, task = contract.classes, contract.task
    fn = SHIFTS[shift][0]
    rng = np.random.default_rng(0)
    site = work / "site"
    for r in rows:  # the site's images: the member's unseen patients, re-rendered
        dst = site / r["label"] / (Path(r["path"]).stem + ".png")
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fn(decode_image(data / r["path"], contract.preprocessing.colour), rng)).save(dst)
    rel = [f"{r['label']}/{Path(r['path']).stem}.png" for r in rows]
    labels = np.array([r["label"] for r in rows])
    groups = np.array([r["group"] for r in rows])
    y = np.array([classes.index(lab) for lab in labels]) if task == "multiclass" else (labels == "malignant").astype(int)
    inner = np.zeros(len(rows), dtype=int)
    for j, (_, test) in enumerate(StratifiedGroupKFold(inner_folds, shuffle=True, random_state=0).split(
            rel, labels, groups)):
        inner[test] = j
    out = {"run": str(run), "member": member, "shift": shift, "images": len(rows),
           "patients": int(len(np.unique(groups))), "inner_folds": inner_folds, "epochs": epochs,
           "recipe": " ".join(recipe) or "default (all layers, AdamW 3e-4)", "cpu": detect().cpu, "arms": []}
    p_clean, _ = _probs(member_dir, [data / r["path"] for r in rows])
    out["arms"].append({"arm": "no shift (ceiling)", **_summary(y, p_clean, groups, classes, task)})
    p_shift, _ = _probs(member_dir, [site / p for p in rel])
    out["arms"].append({"arm": "shifted, no adaptation", **_summary(y, p_shift, groups, classes, task)})
    if "--adapt-bn" in recipe:  # no labels: BatchNorm statistics of the other inner folds' images only
        probs = np.zeros_like(p_shift)
        for j in range(inner_folds):
            test = inner == j
            probs[test], _ = _probs(member_dir, [site / p for p, t in zip(rel, test) if t],
                                    adapt_on=[site / p for p, t in zip(rel, test) if not t])
        out["arms"].append({"arm": "shifted, BatchNorm re-estimated (AdaBN, no labels)",
                            **_summary(y, probs, groups, classes, task)})
    for budget in budgets:
        t0 = time.perf_counter()
        probs = np.zeros_like(p_shift)
        n_train = []
        for j in range(inner_folds):
            train_groups = np.unique(groups[inner != j])
            if budget != "all":
                train_groups = np.array(sorted(_budget_groups(groups[inner != j], labels[inner != j], int(budget),
                                                              np.random.default_rng(j))))
            subset = np.where(inner == j, "test", np.where(np.isin(groups, train_groups), "train", "unused"))
            split = work / f"split-{budget}-{j}.csv"
            with open(split, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label", "group", "subset"])
                w.writerows([p, lab, g, s] for p, lab, g, s in zip(rel, labels, groups, subset) if s != "unused")
            n_train.append(int((subset == "train").sum()))
            tag = "".join(a.lstrip("-")[:8] for a in recipe)
            out_dir = work / f"adapt-{tag + '-' if tag else ''}{budget}-{j}"
            if not (out_dir / "model.json").is_file():
                code = lungcad_main(["train", "--init-from", str(member_dir), "--data", str(site), "--split", str(split),
                                     "--out", str(out_dir), "--epochs", str(epochs), "--no-progress", "--threads", "1",
                                     *recipe])
                if code != 0:
                    raise SystemExit(f"fine-tuning failed for budget {budget}, inner fold {j}")
            test = inner == j
            probs[test], _ = _probs(out_dir, [site / p for p, t in zip(rel, test) if t])
        out["arms"].append({"arm": f"shifted, fine-tuned on {budget} patients" if budget != "all"
                            else "shifted, fine-tuned on all other patients",
                            "train_images_per_fold": n_train, "seconds": round(time.perf_counter() - t0),
                            **_summary(y, probs, groups, classes, task)})
        print(json.dumps(out["arms"][-1]), file=sys.stderr, flush=True)
    return out


def markdown(result: dict) -> str:
    def ci(v):
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" if v.get("low") is not None else f"{v['value']:.3f}"

    lines = [f"Member {result['member']} of `{result['run']}`: its {result['images']} held-out images "
             f"({result['patients']} patients), shift: {result['shift']}; {result['inner_folds']} grouped inner folds, "
             f"{result['epochs']} epochs; fine-tuning recipe: {result.get('recipe', 'default')}; CPU: {result['cpu']}.",
             "",
             "| arm | train images per inner fold | balanced accuracy | macro-F1 | malignant ROC-AUC |", "|---|---|---|---|---|"]
    for a in result["arms"]:
        n = "–" if "train_images_per_fold" not in a else f"{min(a['train_images_per_fold'])}-{max(a['train_images_per_fold'])}"
        lines.append(f"| {a['arm']} | {n} | {ci(a['balanced_accuracy'])} | {ci(a['macro_f1'])} | "
                     f"{ci(a['malignant_vs_rest.roc_auc'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a fold-ensemble run folder")
    ap.add_argument("--data", type=Path, required=True, help="the data folder the run was trained on")
    ap.add_argument("--member", type=int, default=1, help="the member whose held-out patients form the site")
    ap.add_argument("--shift", default="lung window (simulated)", choices=list(SHIFTS))
    ap.add_argument("--patients", nargs="*", default=["4", "8", "all"],
                    help="labelled patients per fine-tuning (none: only the arms without fine-tuning)")
    ap.add_argument("--inner-folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--finetune", choices=["all", "layer4", "fc"], default="all", help="layers the fine-tuning trains")
    ap.add_argument("--lr", type=float, help="fine-tuning learning rate (default: lungcad train's)")
    ap.add_argument("--adapt-bn", action="store_true", help="AdaBN first (and a no-label AdaBN arm)")
    ap.add_argument("--work", type=Path, help="working folder (kept; default: a temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        recipe = ([] if args.finetune == "all" else ["--finetune", args.finetune]) + \
            ([] if args.lr is None else ["--lr", str(args.lr)]) + (["--adapt-bn"] if args.adapt_bn else [])
        result = measure(args.run, args.data, args.member, args.shift, args.patients, args.inner_folds, args.epochs,
                         work, recipe)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
