"""95 % confidence intervals by a group (cluster) bootstrap: resample patients, not images.

Slices of one patient are strongly correlated, so resampling images pretends there are far more
independent observations than there are and gives intervals that are too narrow. Here every
resample draws whole groups (patient proxies from the split) with replacement; an image enters a
resample as many times as its group was drawn.

Resampling by weights makes the bootstrap one matrix product: a (B, N) matrix of per-image
multiplicities times one-hot encodings gives B confusion matrices (and, for the AUCs, B score
histograms) at once, so 1000+ resamples of a few hundred images take well under a second. The
weighted metrics here reproduce scikit-learn's definitions exactly (checked in the tests).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import sparse

from lungcad.evaluation.metrics import malignant_index

__all__ = [
    "N_BOOT", "attach_intervals", "bootstrap_ci", "group_weights", "metrics_with_intervals", "paired_difference",
    "weighted_auc", "weighted_metrics",
]

log = logging.getLogger(__name__)

N_BOOT = 2000  # resamples; the issue asks for >= 1000, 2000 keeps percentile noise below ~0.005
LEVEL = 0.95
# Fewer groups than this and a percentile interval says more about the resampling than about the
# model (with 5 groups there are only 126 distinct resamples); report "too few" instead.
MIN_GROUPS = 10
# A metric undefined in more than this share of resamples (e.g. a class absent) gets no interval:
# percentiles over the remaining resamples would be biased towards the easy ones.
MAX_UNDEFINED = 0.05


def group_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, N) image multiplicities of `n_boot` resamples of whole groups."""
    _, gidx = np.unique(np.asarray(groups), return_inverse=True)
    g = int(gidx.max()) + 1 if len(gidx) else 0
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot)  # (B, G): times each group is drawn
    return counts[:, gidx].astype(np.float64)


def _onehot(index: np.ndarray, width: int) -> sparse.csr_matrix:
    n = len(index)
    return sparse.csr_matrix((np.ones(n), (np.arange(n), index)), shape=(n, width))


def _hist(weights: np.ndarray, onehot: sparse.csr_matrix, mask: np.ndarray) -> np.ndarray:
    """(B, U) summed weights of the masked images per score bin."""
    return np.asarray((onehot[mask].T @ weights[:, mask].T).T)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ROC-AUC, average precision) per weight row, as scikit-learn computes them (ties count half
    for the AUC; average precision steps at every distinct score). NaN where a row lacks positives
    or negatives."""
    uniq, inv = np.unique(scores, return_inverse=True)  # ascending scores
    onehot = _onehot(inv, len(uniq))
    pos = _hist(weights, onehot, positive)
    neg = _hist(weights, onehot, ~positive)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(neg, axis=1) - neg  # negatives scoring strictly lower
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        tp = np.cumsum(pos[:, ::-1], axis=1)  # thresholds from the highest score down
        fp = np.cumsum(neg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        ap = (pos[:, ::-1] * precision).sum(axis=1) / n_pos
    undefined = (n_pos == 0) | (n_neg == 0)
    auc[undefined] = np.nan
    ap[undefined] = np.nan
    return auc, ap


def weighted_metrics(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, classes: list[str], task: str, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Headline metrics for every row of `weights` (B, N); keys are dotted paths into the dict of
    `classification_metrics` (e.g. "per_class.malignant.recall"). NaN marks an undefined value."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    k = len(classes)
    cm = np.asarray((_onehot(y_true * k + y_pred, k * k).T @ weights.T).T).reshape(-1, k, k)
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    fp, fn = predicted - tp, support - tp
    tn = total[:, None] - tp - fp - fn
    present = support > 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN rows -> NaN, on purpose
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)  # scikit-learn's zero_division=0
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        out["accuracy"] = np.trace(cm, axis1=1, axis2=2) / total
        out["balanced_accuracy"] = np.where(present.sum(axis=1) > 1, np.nanmean(recall, axis=1), np.nan)
        out["macro_f1"] = np.where(present, f1, np.nan)
        out["macro_f1"] = np.nanmean(out["macro_f1"], axis=1)
        rocs, prs = [], []
        for c, name in enumerate(classes):
            auc, ap = weighted_auc(probs[:, c], y_true == c, weights)
            rocs.append(auc)
            prs.append(ap)
            out[f"per_class.{name}.precision"] = precision[:, c]
            out[f"per_class.{name}.recall"] = recall[:, c]
            out[f"per_class.{name}.specificity"] = specificity[:, c]
            out[f"per_class.{name}.false_positive_rate"] = 1.0 - specificity[:, c]
            out[f"per_class.{name}.f1"] = f1[:, c]
            out[f"per_class.{name}.roc_auc"] = auc
            out[f"per_class.{name}.pr_auc"] = ap
        if task == "binary":
            out["roc_auc"], out["pr_auc"] = rocs[1], prs[1]
        else:
            # scikit-learn's macro one-vs-rest needs every class present; NaN otherwise
            out["roc_auc"] = np.where(present.all(axis=1), np.mean(np.stack(rocs), axis=0), np.nan)
            out["pr_auc"] = np.where(present.sum(axis=1) > 1, np.nanmean(np.stack(prs), axis=0), np.nan)
        m = malignant_index(classes)
        if m is not None:
            mtp, mfp, mfn, mtn = tp[:, m], fp[:, m], fn[:, m], tn[:, m]
            out["malignant_vs_rest.sensitivity"] = np.where(mtp + mfn > 0, mtp / (mtp + mfn), np.nan)
            out["malignant_vs_rest.specificity"] = np.where(mtn + mfp > 0, mtn / (mtn + mfp), np.nan)
            out["malignant_vs_rest.ppv"] = np.where(mtp + mfp > 0, mtp / (mtp + mfp), np.nan)
            out["malignant_vs_rest.npv"] = np.where(mtn + mfn > 0, mtn / (mtn + mfn), np.nan)
            out["malignant_vs_rest.roc_auc"], out["malignant_vs_rest.pr_auc"] = rocs[m], prs[m]
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    task: str,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    chunk: int = 250,
) -> dict:
    """Percentile intervals of every headline metric under a group bootstrap.

    Returns {"method", "n_boot", "level", "n_groups", "intervals": {dotted metric: {"low", "high"}
    or {"low": None, "high": None, "note": why not}}}.
    """
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    info = {"method": "percentile, group (cluster) bootstrap: whole groups resampled with replacement",
            "n_boot": int(n_boot), "level": level, "n_groups": n_groups, "n_images": int(len(groups))}
    if n_groups < MIN_GROUPS:
        note = f"too few groups for an interval ({n_groups} < {MIN_GROUPS})"
        log.info("no bootstrap intervals: %s", note)
        names = weighted_metrics(y_true, probs, y_pred, classes, task, np.ones((1, len(groups))))
        return {**info, "note": note, "intervals": {k: {"low": None, "high": None, "note": note} for k in names}}
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        w = group_weights(groups, min(chunk, n_boot - start), rng)
        for k, v in weighted_metrics(y_true, probs, y_pred, classes, task, w).items():
            parts.setdefault(k, []).append(v)
    alpha = (1.0 - level) / 2
    intervals = {}
    for k, chunks in parts.items():
        values = np.concatenate(chunks)
        undefined = float(np.isnan(values).mean())
        if undefined > MAX_UNDEFINED:
            intervals[k] = {"low": None, "high": None,
                            "note": f"undefined in {undefined:.0%} of resamples (too few cases of a class)"}
            continue
        lo, hi = np.nanquantile(values, [alpha, 1.0 - alpha])
        intervals[k] = {"low": float(lo), "high": float(hi)}
    return {**info, "intervals": intervals}


def attach_intervals(metrics: dict, ci: dict) -> dict:
    """A flat {dotted metric: {"value", "low", "high"[, "note"]}} table of estimates with intervals."""
    table = {}
    for key, interval in ci["intervals"].items():
        node = metrics
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        table[key] = {"value": node, **interval}
    return table


def paired_difference(y_true: np.ndarray, probs_a: np.ndarray, pred_a: np.ndarray, probs_b: np.ndarray,
                      pred_b: np.ndarray, groups: np.ndarray, classes: list[str], task: str,
                      key: str = "balanced_accuracy", n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> dict:
    """A's metric minus B's on the same images, with a paired group-bootstrap interval: both are
    scored on the very same resamples of patients, so what the two share cancels out."""
    rng = np.random.default_rng(seed)
    w = group_weights(np.asarray(groups), n_boot, rng)
    a = weighted_metrics(y_true, probs_a, pred_a, classes, task, w)[key]
    b = weighted_metrics(y_true, probs_b, pred_b, classes, task, w)[key]
    one = np.ones((1, len(y_true)))
    point = float(weighted_metrics(y_true, probs_a, pred_a, classes, task, one)[key][0]
                  - weighted_metrics(y_true, probs_b, pred_b, classes, task, one)[key][0])
    d = a - b
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(d, [alpha, 1.0 - alpha])
    return {"metric": key, "difference": point, "low": float(lo), "high": float(hi), "n_boot": int(n_boot),
            "share_above_zero": float(np.nanmean(d > 0))}


def metrics_with_intervals(y, probs, threshold, groups, classes, task, n_boot: int = N_BOOT, seed: int = 0,
                           pred=None) -> dict:
    """`classification_metrics` plus group-bootstrap intervals ("ci", "intervals"); `pred` overrides the
    decisions of the rule at `threshold` (e.g. cross-fitted thresholds)."""
    from lungcad.evaluation.metrics import classification_metrics, predict_labels

    pred = predict_labels(probs, task, threshold, classes) if pred is None else pred
    metrics = classification_metrics(y, probs, classes, task, threshold, y_pred=pred)
    ci = bootstrap_ci(y, probs, pred, groups, classes, task, n_boot=n_boot, seed=seed)
    metrics["ci"] = {k: v for k, v in ci.items() if k != "intervals"}
    metrics["intervals"] = attach_intervals(metrics, ci)
    return metrics
