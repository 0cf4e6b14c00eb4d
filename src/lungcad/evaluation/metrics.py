"""Classification metrics from scikit-learn, gathered into one JSON-ready dict."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def predict_labels(probs: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Column index of the predicted class: argmax, or p(malignant) >= threshold for binary."""
    if task == "binary":
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], task: str = "multiclass", threshold: float = 0.5
) -> dict:
    """Accuracy, balanced accuracy, per-class precision / recall (sensitivity) / specificity / F1,
    macro-F1, ROC-AUC (one-vs-rest macro for multiclass) and the confusion matrix."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = predict_labels(probs, task, threshold)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        present = [c for c in labels if (y_true == c).any()]
        out = {
            "n": int(len(y_true)),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(present) > 1 else None,
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "roc_auc": _roc_auc(y_true, probs, task, labels),
        }
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
            "f1": float(f1[c]),
            "support": int(support[c]),
            "false_positives": int(fp),
            "false_negatives": int(fn),
        }
    out["per_class"] = per_class
    out["confusion_matrix"] = {"labels": list(classes), "matrix": cm.tolist()}  # rows: true, cols: predicted
    return out


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
    cm = m["confusion_matrix"]
    lines.append("confusion (rows true, cols predicted): " + " | ".join(
        f"{lab}: {row}" for lab, row in zip(cm["labels"], cm["matrix"])
    ))
    return "\n".join(lines)
