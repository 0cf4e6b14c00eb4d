"""Metric functions against scikit-learn and hand-computed cases; the group bootstrap's coverage."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from lungcad.evaluation.bootstrap import attach_intervals, bootstrap_ci, group_weights, weighted_auc, weighted_metrics
from lungcad.evaluation.evaluate import group_level
from lungcad.evaluation.metrics import classification_metrics, predict_labels

CLASSES = ["normal", "benign", "malignant"]


def _problem(n=240, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.2
    if ties:
        logits = np.round(logits, 1)  # ties in the scores exercise the AUC tie rule
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_hand_computed_binary_case():
    # 4 malignant, 6 not; threshold 0.5 -> TP 3, FN 1, FP 1, TN 5
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pm = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.4, 0.3, 0.1, 0.1, 0.05])
    m = classification_metrics(y, np.stack([1 - pm, pm], 1), ["not_malignant", "malignant"], "binary", 0.5)
    mv = m["malignant_vs_rest"]
    assert (mv["tp"], mv["fn"], mv["fp"], mv["tn"]) == (3, 1, 1, 5)
    assert mv["sensitivity"] == pytest.approx(0.75) and mv["specificity"] == pytest.approx(5 / 6)
    assert mv["ppv"] == pytest.approx(0.75) and mv["npv"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8)
    # AUC by counting: pairs (pos, neg) ranked correctly; 0.2 beats 0.1, 0.1, 0.05 only
    assert mv["roc_auc"] == pytest.approx((6 + 6 + 6 + 3) / 24)
    assert m["per_class"]["malignant"]["false_positive_rate"] == pytest.approx(1 / 6)


def test_multiclass_threshold_rule_only_moves_the_malignant_decision():
    probs = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.1, 0.7], [0.15, 0.5, 0.35]])
    assert predict_labels(probs, "multiclass", None, CLASSES).tolist() == [0, 1, 2, 1]
    # at 0.3 every image with p(malignant) >= 0.3 is malignant; the others keep their best other class
    assert predict_labels(probs, "multiclass", 0.3, CLASSES).tolist() == [2, 2, 2, 2]
    assert predict_labels(probs, "multiclass", 0.8, CLASSES).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        predict_labels(probs, "multiclass", 0.3)


@pytest.mark.parametrize("threshold", [None, 0.25])
def test_vectorised_metrics_equal_scikit_learn(threshold):
    y, p = _problem()
    m = classification_metrics(y, p, CLASSES, "multiclass", threshold)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["per_class"]["benign"]["pr_auc"] == pytest.approx(average_precision_score(y == 1, p[:, 1]))
    pred = predict_labels(p, "multiclass", threshold, CLASSES)
    fast = weighted_metrics(y, p, pred, CLASSES, "multiclass", np.ones((1, len(y))))
    table = attach_intervals(m, {"intervals": {k: {} for k in fast}})
    assert len(fast) > 30
    for key, values in fast.items():
        assert table[key]["value"] == pytest.approx(values[0], abs=1e-12), key


def test_weighted_auc_equals_resampled_scikit_learn():
    y, p = _problem(n=120, seed=3)
    rng = np.random.default_rng(1)
    w = rng.integers(0, 3, (5, len(y))).astype(float)
    auc, ap = weighted_auc(p[:, 2], y == 2, w)
    for b in range(5):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))  # a weight of 2 = the image twice
        assert auc[b] == pytest.approx(roc_auc_score(y[idx] == 2, p[idx, 2]))
        assert ap[b] == pytest.approx(average_precision_score(y[idx] == 2, p[idx, 2]))


def test_group_weights_resample_whole_groups():
    groups = np.repeat(np.array(["a", "b", "c", "d"]), [1, 2, 3, 4])
    w = group_weights(groups, 50, np.random.default_rng(0))
    assert w.shape == (50, 10)
    for row in w:  # members of one group always share a multiplicity; 4 groups drawn in all
        assert len(set(row[1:3])) == 1 and len(set(row[3:6])) == 1 and len(set(row[6:])) == 1
        assert row[0] + row[1] + row[3] + row[6] == 4


def test_group_bootstrap_covers_the_true_accuracy():
    # 30 patients x 10 slices; each patient's slices are right with the patient's own probability
    # (Beta(4, 1): mean 0.8), so slices are correlated and the truth is 0.8.
    rng = np.random.default_rng(0)
    hits_group = hits_image = 0
    reps, n_groups, per = 80, 30, 10
    groups = np.repeat(np.arange(n_groups), per)
    for r in range(reps):
        p_patient = rng.beta(4, 1, n_groups)
        correct = rng.random(n_groups * per) < np.repeat(p_patient, per)
        y = np.ones(len(groups), dtype=int)
        pred = np.where(correct, 1, 0)
        probs = np.stack([1 - pred, pred], 1).astype(float)
        ci = bootstrap_ci(y, probs, pred, groups, ["not_malignant", "malignant"], "binary", n_boot=1000, seed=r)
        lo, hi = ci["intervals"]["accuracy"]["low"], ci["intervals"]["accuracy"]["high"]
        hits_group += lo <= 0.8 <= hi
        ci_img = bootstrap_ci(y, probs, pred, np.arange(len(groups)), ["not_malignant", "malignant"], "binary",
                              n_boot=1000, seed=r)
        hits_image += ci_img["intervals"]["accuracy"]["low"] <= 0.8 <= ci_img["intervals"]["accuracy"]["high"]
    # nominal 95 %: with 80 repetitions the observed coverage has a standard error of ~2.5 points
    assert 0.87 <= hits_group / reps <= 1.0
    # resampling images ignores the correlation: clearly too narrow (the reason for groups)
    assert hits_image / reps < hits_group / reps - 0.1


def test_too_few_groups_gives_no_interval():
    y, p = _problem(n=30)
    pred = p.argmax(1)
    ci = bootstrap_ci(y, p, pred, np.arange(30) % 4, CLASSES, "multiclass", n_boot=1000)
    assert ci["intervals"]["accuracy"]["low"] is None
    assert "too few groups" in ci["intervals"]["accuracy"]["note"]


def test_group_level_rule():
    y = np.array([2, 2, 2, 0, 0, 1])
    probs = np.array([[0.1, 0.1, 0.8], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05], [0.7, 0.2, 0.1],
                      [0.2, 0.7, 0.1]])
    groups = np.array(["p1", "p1", "p1", "p2", "p2", "p3"])
    gy, gp, ids = group_level(y, probs, groups, CLASSES, "multiclass")
    assert ids.tolist() == ["p1", "p2", "p3"] and gy.tolist() == [2, 0, 1]
    assert gp[0] == pytest.approx([0.3, 0.4 / 3, 1.7 / 3])
    # a group mixing labels takes the most severe
    gy, _, _ = group_level(np.array([0, 2]), probs[:2], np.array(["x", "x"]), CLASSES, "multiclass")
    assert gy.tolist() == [2]


def test_group_concentration_warns_when_one_group_dominates_a_class():
    from lungcad.evaluation.evaluate import group_concentration

    # malignant: 8 of 10 images from one patient proxy; normal: 4 groups of 1; benign: 2 images, 1 group
    y = np.array([2] * 10 + [0] * 4 + [1] * 2)
    groups = np.array(["m1"] * 8 + ["m2", "m3"] + ["n1", "n2", "n3", "n4"] + ["b1", "b1"])
    out = group_concentration(y, groups, CLASSES)
    assert out["per_class"]["malignant"] == {"images": 10, "groups": 3, "largest_group_images": 8,
                                             "largest_group_share": 0.8}
    assert out["per_class"]["normal"]["largest_group_share"] == 0.25
    assert out["warnings"] == [
        "benign: all 2 images are one group; its figures measure one patient proxy",
        "malignant: 8 of 10 images (80%) are one group; its figures mostly measure that one patient proxy",
    ]
    balanced = group_concentration(np.array([0, 0, 1, 1]), np.array(["a", "b", "c", "d"]), CLASSES)
    assert balanced["warnings"] == []
