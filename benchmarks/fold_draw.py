"""How much the fold draw moves a grouped cross-validation figure (the texture baseline, re-run on many draws).

A group-bootstrap interval says how far a pooled out-of-fold figure could move with other test
patients; it does not say how far it moves with another assignment of the same patients to folds,
which changes what each fold's model is trained on. With 15 benign patients that second source is
large, and one draw can flatter or sink a comparison. The network costs an hour or more per draw;
the texture baseline (the fused model's head, scored as `ablation_table.py --texture` scores it:
out of fold, malignant threshold cross-fitted) costs seconds, so it is re-run here on N fold draws
(`--fold-seed` 0..N-1 of `lungcad train --folds K`) for each K, on the run's own prepared images.

    python benchmarks/fold_draw.py RUNDIR [--folds 3 5] [--draws 20] [--json FILE]

Reported per K: mean, standard deviation, range, and where the run's own draw falls among them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from lungcad.data.dataset import load_cache
from lungcad.evaluation.baselines import out_of_fold_baseline, texture_features
from lungcad.models.factory import target_index
from lungcad.run import RunFolder
from lungcad.training.crossval import fold_splits


def fold_numbers(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's test fold (1..K) for the draw `lungcad train --folds K --fold-seed seed` makes."""
    out = np.zeros(len(labels), dtype=int)
    for k, subset in enumerate(fold_splits(labels, groups, folds, 0.0, seed), start=1):
        out[subset == "test"] = k
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `lungcad train --folds K` run folder (its images, preprocessing, folds)")
    ap.add_argument("--folds", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    run = RunFolder(args.run)
    contract, oof = run.contract(), run.out_of_fold()
    classes, task = contract.classes, contract.task
    target = contract.training["operating_point"]["validation"]["target_sensitivity"]
    labels, groups = np.asarray(oof.labels), np.asarray(oof.groups)
    y = np.array([target_index(lab, classes, task) for lab in labels])
    fold_seed = run.config.get("fold_seed")  # None: the folds were drawn with the training seed (TrainConfig)
    own_k, own_seed = len(set(oof.folds.tolist())), int(run.config.get("seed", 0) if fold_seed is None else fold_seed)
    if not np.array_equal(fold_numbers(labels, groups, own_k, own_seed), oof.folds):
        raise SystemExit(f"{args.run}: its folds are not fold_splits(seed={own_seed}); was the data changed?")
    cache, bad = load_cache(oof.paths, contract.preprocessing, progress=False)
    if bad:
        raise SystemExit(f"{bad[0][0]}: {bad[0][1]}")
    features = texture_features(cache)
    out = {"run": str(args.run), "image_size": contract.preprocessing.image_size, "own": {"folds": own_k, "seed": own_seed}}
    for k in args.folds:
        scores = []
        for seed in range(args.draws):
            _, pred = out_of_fold_baseline(features, y, fold_numbers(labels, groups, k, seed), classes, task, target,
                                           "classical")
            scores.append(balanced_accuracy_score(y, pred))
        s = np.asarray(scores)
        own = f"; the run's draw (seed {own_seed}) {s[own_seed]:.3f}, rank {int((s > s[own_seed]).sum()) + 1} of {len(s)}" \
            if k == own_k and own_seed < len(s) else ""
        print(f"K={k}: texture baseline balanced accuracy over {len(s)} fold draws: mean {s.mean():.3f}, "
              f"sd {s.std(ddof=1):.3f}, range {s.min():.3f}-{s.max():.3f}{own}")
        out[f"K={k}"] = {"balanced_accuracy": s.tolist(), "mean": s.mean(), "sd": s.std(ddof=1)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
