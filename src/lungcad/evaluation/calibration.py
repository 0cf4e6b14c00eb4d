"""Calibration (temperature scaling, ECE, Brier, reliability diagram) and the operating point.

Both are fitted on the validation split at the end of training and stored in the model contract
(`temperature`, `thresholds["malignant"]`, and the details under `training["operating_point"]`),
so inference, evaluation and the web app apply exactly what was chosen on data the test split
never saw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from lungcad.evaluation.metrics import malignant_index
from lungcad.models.factory import logits_to_probs

__all__ = [
    "TARGET_SENSITIVITY", "brier_score", "calibration_summary", "choose_threshold", "expected_calibration_error",
    "fit_operating_point", "fit_temperature", "minimise_over_temperature", "probs_nll", "reliability_bins",
    "scaled_probs", "top_label",
]

log = logging.getLogger(__name__)

Then = Callable[[np.ndarray], np.ndarray] | None  # what a model does to its calibrated probabilities

N_BINS = 15  # reliability bins: the usual choice (Guo et al., 2017); fewer would hide miscalibration
TARGET_SENSITIVITY = 0.95  # default malignant operating point: miss at most 1 in 20 cancers on validation
# Temperatures outside this range mean the validation set is too small or degenerate to fit one.
T_RANGE = (0.05, 20.0)


def _nll(logits: torch.Tensor, targets: torch.Tensor, task: str, temperature: float, then: Then = None) -> float:
    if then is not None:  # the model's own probabilities (e.g. fused): what inference produces
        return probs_nll(scaled_probs(logits, task, temperature, then), targets.numpy())
    z = logits / temperature
    if task == "binary":
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z.reshape(-1), targets.float()))
    return float(torch.nn.functional.cross_entropy(z, targets))


def scaled_probs(logits, task: str, temperature: float, then: Then = None) -> np.ndarray:
    """Probabilities at `temperature`, passed through `then` when the model transforms them further
    (a fused model's mean with its texture head: `lungcad.models.fusion`), as inference does."""
    probs = logits_to_probs(torch.as_tensor(logits), task, temperature).double().numpy()
    return probs if then is None else then(probs)


def fit_temperature(logits: torch.Tensor | np.ndarray, targets, task: str, then: Then = None) -> float:
    """The temperature minimising validation negative log-likelihood (Guo et al., 2017).

    One scalar: it changes confidence, never the ranking of a binary model or the argmax of a
    multiclass one. Returns 1.0 when there is nothing to fit (fewer than 2 samples or one class).
    With `then` (e.g. the mean with a fused texture head's probabilities for the same images), the
    likelihood is that of `then`'s probabilities, the ones inference produces: a network alone is
    overconfident, the fused mean much less so, and a temperature fitted on the network alone
    over-softens the fused output (out of fold in six runs: ECE 0.039-0.113 instead of 0.050-0.119,
    docs/ablations.md). There the temperature also sets how much the network weighs in the mean.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(y) < 2 or len(torch.unique(y)) < 2:
        log.warning("temperature scaling skipped: validation has %d image(s), %d class(es)", len(y),
                    len(torch.unique(y)))
        return 1.0
    return minimise_over_temperature(lambda t: _nll(logits, y, task, t, then))


def probs_nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes under probabilities (N, C)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(targets)), np.asarray(targets, dtype=int)]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def minimise_over_temperature(nll: Callable[[float], float]) -> float:
    """The temperature in T_RANGE minimising `nll(temperature)` (bounded search on log T). Shared by
    the fits on validation or out-of-fold predictions and `lungcad calibrate`'s fit on site cases."""
    res = minimize_scalar(lambda log_t: nll(math.exp(log_t)), bounds=tuple(math.log(t) for t in T_RANGE),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def top_label(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence of the most probable class, whether that class is right)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Equal-width confidence bins of the top label: count, mean confidence, accuracy per bin."""
    conf, correct = top_label(probs, y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        n = int(mask.sum())
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": float(conf[mask].mean()) if n else None,
                     "accuracy": float(correct[mask].mean()) if n else None})
    return bins


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE: bin-size-weighted mean |accuracy - confidence| over equal-width bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / max(n, 1))


def brier_score(probs: np.ndarray, y_true: np.ndarray, task: str) -> float:
    """Binary: mean (p(malignant) - y)^2. Multiclass: mean over images of sum_k (p_k - [y = k])^2."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)
    if task == "binary":
        return float(np.mean((probs[:, 1] - y) ** 2))
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def calibration_summary(probs: np.ndarray, y_true: np.ndarray, task: str, n_bins: int = N_BINS) -> dict:
    return {"ece": expected_calibration_error(probs, y_true, n_bins), "brier": brier_score(probs, y_true, task),
            "n_bins": n_bins, "bins": reliability_bins(probs, y_true, n_bins)}


def choose_threshold(p_malignant: np.ndarray, is_malignant: np.ndarray, target_sensitivity: float) -> dict:
    """The highest threshold on p(malignant) whose sensitivity reaches the target.

    Highest, because among all thresholds meeting the sensitivity target it flags the fewest
    images: the fewest false positives. Calling malignant when p >= threshold, the k-th largest
    malignant score with k = ceil(target * positives) is exactly that threshold.
    """
    p = np.asarray(p_malignant, dtype=np.float64)
    pos = np.asarray(is_malignant, dtype=bool)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    if not pos.any():
        log.warning("no malignant images in validation: keeping the default threshold 0.5")
        return {"threshold": 0.5, "target_sensitivity": target_sensitivity, "sensitivity": None,
                "specificity": None, "n_malignant": 0, "n_other": int((~pos).sum()),
                "note": "no malignant images in validation; default threshold 0.5"}
    k = math.ceil(target_sensitivity * pos.sum() - 1e-9)
    threshold = float(np.sort(p[pos])[::-1][k - 1])
    flagged = p >= threshold
    neg = ~pos
    return {
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(flagged[pos].mean()),
        "specificity": float((~flagged[neg]).mean()) if neg.any() else None,
        "n_malignant": int(pos.sum()),
        "n_other": int(neg.sum()),
    }


def fit_operating_point(val_logits: torch.Tensor, val_targets, task: str, classes: list[str],
                        target_sensitivity: float = TARGET_SENSITIVITY, fitted_on: str = "validation",
                        then: Then = None) -> dict:
    """Temperature, then the malignant threshold on the *calibrated* validation probabilities.

    The order matters for multiclass: the temperature can reorder p(malignant) between images,
    and the stored threshold must live on the probabilities inference will produce. With `then`
    (what the model does to its calibrated probabilities, e.g. fuse them with a texture head's)
    both are fitted on the transformed probabilities, for the same reason.
    """
    y = np.asarray(val_targets, dtype=int)
    temperature = fit_temperature(val_logits, y, task, then)
    before = scaled_probs(val_logits, task, 1.0, then)
    after = scaled_probs(val_logits, task, temperature, then)
    m = malignant_index(classes)
    op = choose_threshold(after[:, m], y == m, target_sensitivity) if m is not None else {"threshold": 0.5}
    result = {
        "temperature": temperature,
        "threshold": op["threshold"],
        "fitted_on": fitted_on,
        "validation": {
            "n": int(len(y)),
            "ece_before": expected_calibration_error(before, y) if len(y) else None,
            "ece_after": expected_calibration_error(after, y) if len(y) else None,
            **{k: v for k, v in op.items() if k != "threshold"},
        },
    }
    log.info("calibration on %s: temperature %.3f (ECE %.3f -> %.3f); malignant threshold %.3f "
             "(sensitivity %s at target %.2f)", fitted_on, temperature, result["validation"]["ece_before"] or 0.0,
             result["validation"]["ece_after"] or 0.0, op["threshold"], op.get("sensitivity"), target_sensitivity)
    return result
