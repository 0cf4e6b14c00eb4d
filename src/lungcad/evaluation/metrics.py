"""Classification metrics from scikit-learn, gathered into one JSON-ready dict.

Decision rule (used everywhere a label is predicted: training, evaluation, baselines, reports):
- binary task: malignant when p(malignant) >= threshold (default 0.5);
- multiclass task without a threshold: argmax;
- multiclass task with a malignant threshold (the operating point chosen on validation for a
  target sensitivity): malignant when p(malignant) >= threshold, otherwise the most probable of
  the remaining classes. The threshold therefore moves only the malignant-vs-rest decision; it
  never swaps normal for benign.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "MALIGNANT", "classification_metrics", "format_metrics", "malignant_index", "malignant_vs_rest",
    "predict_labels",
]

MALIGNANT = "malignant"


def malignant_index(classes: list[str]) -> int | None:
    """Column of p(malignant) in a probability matrix, or None if the model has no such class."""
    return classes.index(MALIGNANT) if MALIGNANT in classes else None


def predict_labels(probs: np.ndarray, task: str, threshold: float | None = None,
                   classes: list[str] | None = None) -> np.ndarray:
    """Column index of the predicted class under the decision rule in the module docstring."""
    probs = np.asarray(probs)
    if task == "binary":
        return (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(int)
    pred = probs.argmax(axis=1)
    if threshold is None:
        return pred
    if classes is None:
        raise ValueError("a multiclass threshold needs the class names (which column is malignant)")
    m = malignant_index(list(classes))
    if m is None:
        return pred
    rest = probs.copy()
    rest[:, m] = -np.inf
    return np.where(probs[:, m] >= threshold, m, rest.argmax(axis=1))


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], task: str = "multiclass",
    threshold: float | None = None, y_pred: np.ndarray | None = None,
) -> dict:
    """Accuracy, balanced accuracy, per-class precision / recall (sensitivity) / specificity / F1 /
    false-positive rate / one-vs-rest ROC-AUC and PR-AUC, macro-F1, macro ROC-AUC and PR-AUC, the
    malignant-vs-rest view at the decision threshold, and the confusion matrix."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    # y_pred: decisions made elsewhere (e.g. cross-fitted thresholds); by default the rule at `threshold`
    y_pred = predict_labels(probs, task, threshold, classes) if y_pred is None else np.asarray(y_pred, dtype=int)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        # an external set may lack a class the model predicts: the per-class values say so already
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        present = [c for c in labels if (y_true == c).any()]
        out = {
            "n": int(len(y_true)),
            "threshold": threshold,
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(present) > 1 else None,
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "roc_auc": _roc_auc(y_true, probs, task, labels),
        }
        ovr_roc = {c: _ovr(roc_auc_score, y_true, probs, c) for c in labels}
        ovr_pr = {c: _ovr(average_precision_score, y_true, probs, c) for c in labels}
    pr_values = [v for v in ovr_pr.values() if v is not None]
    if task == "binary":  # the positive class's average precision is the one that matters
        out["pr_auc"] = ovr_pr[1]
    else:
        out["pr_auc"] = float(np.mean(pr_values)) if len(present) > 1 and pr_values else None
    total = cm.sum()
    per_class = {}
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        tn = total - tp - fp - fn
        per_class[name] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]),  # = sensitivity
            "specificity": float(tn / (tn + fp)) if (tn + fp) else None,
            "false_positive_rate": float(fp / (tn + fp)) if (tn + fp) else None,
            "f1": float(f1[c]),
            "roc_auc": ovr_roc[c],
            "pr_auc": ovr_pr[c],
            "support": int(support[c]),
            "false_positives": int(fp),
            "false_negatives": int(fn),
        }
    out["per_class"] = per_class
    out["malignant_vs_rest"] = malignant_vs_rest(y_true, probs, y_pred, classes)
    out["confusion_matrix"] = {"labels": list(classes), "matrix": cm.tolist()}  # rows: true, cols: predicted
    return out


def malignant_vs_rest(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict | None:
    """The binary question a radiologist asks of any model: malignant or not, from p(malignant)."""
    m = malignant_index(classes)
    if m is None:
        return None
    pos, flagged = np.asarray(y_true) == m, np.asarray(y_pred) == m
    tp, fp = int((pos & flagged).sum()), int((~pos & flagged).sum())
    fn, tn = int((pos & ~flagged).sum()), int((~pos & ~flagged).sum())
    both = pos.any() and (~pos).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return {
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None,
            "roc_auc": float(roc_auc_score(pos, probs[:, m])) if both else None,
            "pr_auc": float(average_precision_score(pos, probs[:, m])) if both else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        }


def _ovr(score, y_true: np.ndarray, probs: np.ndarray, c: int) -> float | None:
    pos = y_true == c
    if not pos.any() or pos.all():
        return None  # undefined without both positives and negatives
    return float(score(pos, probs[:, c]))


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, task: str, labels: list[int]) -> float | None:
    present = np.unique(y_true)
    if len(present) < 2:
        return None  # AUC is undefined with one class
    if task == "binary":
        return float(roc_auc_score(y_true, probs[:, 1]))
    if len(present) < len(labels):
        # one-vs-rest over the classes that occur; renormalise their probabilities
        sub = probs[:, present]
        sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
        remap = {c: i for i, c in enumerate(present)}
        yt = np.array([remap[c] for c in y_true])
        if len(present) == 2:
            return float(roc_auc_score(yt, sub[:, 1]))
        return float(roc_auc_score(yt, sub, multi_class="ovr", average="macro"))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))


def format_metrics(m: dict) -> str:
    """A compact human-readable table."""

    def f(v):
        return "  n/a" if v is None else f"{v:.3f}"

    lines = [
        f"images {m['n']}  accuracy {f(m['accuracy'])}  balanced accuracy {f(m['balanced_accuracy'])}  "
        f"macro-F1 {f(m['macro_f1'])}  ROC-AUC {f(m['roc_auc'])}",
        f"{'class':<14}{'precision':>10}{'recall':>8}{'specif.':>9}{'F1':>7}{'n':>6}",
    ]
    for name, c in m["per_class"].items():
        lines.append(
            f"{name:<14}{f(c['precision']):>10}{f(c['recall']):>8}{f(c['specificity']):>9}{f(c['f1']):>7}{c['support']:>6}"
        )
    mv = m.get("malignant_vs_rest")
    if mv:
        thr = m.get("threshold")
        lines.append(
            f"malignant vs rest{'' if thr is None else f' (threshold {thr:.3f})'}: sensitivity {f(mv['sensitivity'])}  "
            f"specificity {f(mv['specificity'])}  PPV {f(mv['ppv'])}  ROC-AUC {f(mv['roc_auc'])}  "
            f"PR-AUC {f(mv['pr_auc'])}  FP {mv['fp']}  FN {mv['fn']}"
        )
    cm = m["confusion_matrix"]
    lines.append("confusion (rows true, cols predicted): " + " | ".join(
        f"{lab}: {row}" for lab, row in zip(cm["labels"], cm["matrix"])
    ))
    return "\n".join(lines)
