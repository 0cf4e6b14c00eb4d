"""Grouped K-fold: folds never share a group, every image is tested once, and the summary pools."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.errors import LungcadError
from lungcad.training.crossval import fold_splits, format_summary, summarise

CLASSES = ["normal", "benign", "malignant"]


def _data(groups_per_class=8, per_group=3):
    labels, groups = [], []
    for c in CLASSES:
        for g in range(groups_per_class):
            labels += [c] * per_group
            groups += [f"{c}-{g}"] * per_group
    return np.array(labels), np.array(groups)


def test_fold_splits_are_grouped_stratified_and_cover_every_image_once():
    labels, groups = _data()
    splits = fold_splits(labels, groups, folds=4, val_fraction=0.15, seed=0)
    assert len(splits) == 4
    tested = np.zeros(len(labels), dtype=int)
    for subset in splits:
        tested += subset == "test"
        for name in ("train", "val", "test"):
            assert set(labels[subset == name]) == set(CLASSES)  # every class in every part
        for g in np.unique(groups):  # a group sits in exactly one part of a fold
            assert len(set(subset[groups == g])) == 1
    assert (tested == 1).all()


def test_too_few_groups_for_k_folds_is_a_clear_error():
    labels, groups = _data(groups_per_class=3)
    with pytest.raises(LungcadError, match="need at least 5 groups"):
        fold_splits(labels, groups, folds=4, val_fraction=0.15, seed=0)


def test_summary_mean_sd_and_pooled_out_of_fold():
    per_fold = [{"accuracy": a, "balanced_accuracy": a, "macro_f1": a, "roc_auc": None, "pr_auc": a, "n": 10,
                 "malignant_vs_rest": {"sensitivity": 1.0, "specificity": a, "ppv": a, "roc_auc": a}}
                for a in (0.6, 0.8)]
    oof = []
    for i in range(60):
        y = i % 3
        p = np.full(3, 0.1)
        p[y if i % 4 else (y + 1) % 3] = 0.8  # 3 in 4 right
        oof.append({"y": y, "pred": int(p.argmax()), "probs": p, "group": f"g{i // 2}", "fold": 1 + i % 2,
                    "classes": CLASSES, "path": f"{i}.png", "label": CLASSES[y]})
    s = summarise(per_fold, oof, "multiclass", CLASSES)
    assert s["mean_sd"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["mean_sd"]["accuracy"]["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert s["mean_sd"]["roc_auc"]["mean"] is None
    pooled = s["pooled_out_of_fold"]["intervals"]["accuracy"]
    assert pooled["value"] == pytest.approx(45 / 60) and pooled["low"] < 0.75 < pooled["high"]
    assert "pooled" in format_summary(s)
