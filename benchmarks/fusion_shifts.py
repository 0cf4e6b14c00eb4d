"""Does a texture head fused with the network (`--fusion texture`) hold up under export shifts?

For a fold ensemble trained *without* fusion, every development image is scored by the member
that never saw it and by a texture head fitted on the other folds' clean images (as `--fusion
texture` fits it), clean and under the simulated export shifts of `benchmarks/ood_shifts.py`
(applied to the decoded pixels before the shared preprocessing). Reported per shift, for the
network, the texture head and their equal-weight mean: malignant-vs-rest ROC-AUC, and the
three-class balanced accuracy of the argmax of the probabilities at temperature 1. No operating
point is fitted, so compare columns within a row, not with cross-fitted figures.

    python benchmarks/fusion_shifts.py RUN [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from lungcad.data.images import decode_image
from lungcad.data.transforms import prepare
from lungcad.evaluation.baselines import texture_features
from lungcad.inference.engines import TorchEngine
from lungcad.inference.forward import run_engine
from lungcad.models.contract import load_model
from lungcad.models.factory import target_index
from lungcad.models.fusion import TextureHead, fuse
from lungcad.run import RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_shifts import SHIFTS  # noqa: E402

NAMES = ["clean", "hflip", "gamma 0.67", "gamma 1.5", "blur sd 2", "4x lower resolution", "contrast x0.85",
         "noise sd 12", "contrast x0.6", "lung window (simulated)"]


def measure(run_dir: Path) -> dict:
    run = RunFolder(run_dir)
    if not run.is_ensemble:
        raise SystemExit(f"{run_dir}: not a fold ensemble (train with --folds K)")
    oof, contract = run.out_of_fold(), run.contract()
    classes, task = contract.classes, contract.task
    if task != "multiclass":
        raise SystemExit(f"{run_dir}: a three-class run is needed (this one is {task})")
    y = np.array([target_index(lab, classes, task) for lab in oof.labels])
    rng = np.random.default_rng(0)
    probs = {n: {"network": np.zeros((len(y), 3)), "texture": np.zeros((len(y), 3))} for n in NAMES}
    clean_features = np.zeros((len(y), 0))
    folds = sorted(set(int(f) for f in oof.folds))
    raws = {}
    for fold in folds:  # the clean features first: each fold's head is fitted on the other folds
        idx = np.flatnonzero(oof.folds == fold)
        pp = contract.preprocessing
        raws[fold] = [decode_image(oof.paths[i], pp.colour) for i in idx]
        feats = texture_features(torch.stack([prepare(r, pp) for r in raws[fold]]))
        if not clean_features.size:
            clean_features = np.zeros((len(y), feats.shape[1]))
        clean_features[idx] = feats
    for fold in folds:
        model, member = load_model(run.path / f"fold-{fold}")
        engine, pp = TorchEngine(model), member.preprocessing
        mine = oof.folds == fold
        head = TextureHead.fit(clean_features[~mine], y[~mine], 3, int(run.config.get("seed", 0)))
        for name in NAMES:
            images = raws[fold] if name == "clean" else [SHIFTS[name][0](r, rng) for r in raws[fold]]
            cache = torch.stack([prepare(r, pp) for r in images])
            logits, _ = run_engine(engine, cache, pp)
            probs[name]["network"][mine] = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
            probs[name]["texture"][mine] = head.predict_proba(texture_features(cache))
        print(f"fold {fold} done", file=sys.stderr, flush=True)
    out = {"run": str(run_dir), "shifts": []}
    for name in NAMES:
        p = {**probs[name], "fused": fuse(probs[name]["network"], probs[name]["texture"])}
        out["shifts"].append({"shift": name, **{k: {
            "malignant_roc_auc": float(roc_auc_score(y == 2, v[:, 2])),
            "balanced_accuracy_argmax": float(balanced_accuracy_score(y, v.argmax(axis=1)))} for k, v in p.items()}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = measure(args.run)
    print("| shift | mal. AUC network | texture | fused | bal. acc. network | texture | fused |")
    print("|---|---|---|---|---|---|---|")
    for s in result["shifts"]:
        auc = [s[k]["malignant_roc_auc"] for k in ("network", "texture", "fused")]
        bal = [s[k]["balanced_accuracy_argmax"] for k in ("network", "texture", "fused")]
        print(f"| {s['shift']} | " + " | ".join(f"{v:.3f}" for v in auc + bal) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
