"""Baselines on the same split and the same metrics as the model, so its numbers mean something.

(a) majority class: what always answering the commonest training class scores.
(b) classical: hand-made intensity and texture features (histogram statistics, GLCM, LBP from
    scikit-image) on the *same* prepared images the network sees, with a class-balanced logistic
    regression: roughly what a hospital could build without deep learning.
(c) metadata shortcut: the audit's depth-3 decision tree on file metadata only (size, aspect,
    mode, format, file size). Anything it gets right, it gets right for the wrong reason.
(d) another run folder (e.g. ResNet-50 from random initialisation vs. an ImageNet run), loaded
    and scored on these images: the comparison reads a finished run rather than training here.

(b) and (c) choose their malignant threshold on the run's validation split for the same target
sensitivity as the model, so false positives are compared at matched sensitivity.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lungcad.data.audit import FEATURE_SETS
from lungcad.evaluation.calibration import choose_threshold
from lungcad.evaluation.metrics import malignant_index, predict_labels

__all__ = [
    "classical_model", "fit_quietly", "majority_probs", "metadata_features", "metadata_model", "out_of_fold_baseline",
    "run_feature_baselines", "texture_features",
]

log = logging.getLogger(__name__)

GLCM_LEVELS = 32  # grey levels for co-occurrence: 256 makes a sparse, noisy matrix on small images
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
LBP_POINTS, LBP_RADIUS = 8, 1  # "uniform" LBP: P + 2 = 10 histogram bins


def majority_probs(train_targets: Sequence[int], n: int, n_classes: int) -> np.ndarray:
    """Every image gets the training class frequencies; argmax is the majority class."""
    freq = np.bincount(np.asarray(train_targets, dtype=int), minlength=n_classes).astype(np.float64)
    return np.tile(freq / freq.sum(), (n, 1))


def texture_features(cache: torch.Tensor, progress: bool = False) -> np.ndarray:
    """(N, F) intensity + GLCM + LBP features of a uint8 image cache (N, C, S, S)."""
    from scipy import stats
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    grey = cache.float().mean(dim=1).numpy() if cache.shape[1] == 3 else cache[:, 0].numpy().astype(np.float32)
    rows = []
    for img in tqdm(grey, desc="texture features", unit="img", disable=not progress, leave=False):
        body = img[img > 20]  # foreground (body) pixels: air would dominate every statistic
        body = body if body.size > 10 else img.ravel()
        intensity = [body.mean(), body.std(), *np.percentile(body, [10, 25, 50, 75, 90]),
                     float(stats.skew(body)), float(stats.kurtosis(body)), body.size / img.size]
        q = np.clip(img * GLCM_LEVELS / 256.0, 0, GLCM_LEVELS - 1).astype(np.uint8)
        glcm = graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
        texture = [graycoprops(glcm, p).mean(axis=1) for p in GLCM_PROPS]  # per distance, angle-averaged
        lbp = local_binary_pattern(img.astype(np.uint8), LBP_POINTS, LBP_RADIUS, method="uniform")
        hist = np.bincount(lbp.astype(int).ravel(), minlength=LBP_POINTS + 2) / lbp.size
        rows.append(np.concatenate([intensity, *texture, hist]))
    return np.nan_to_num(np.asarray(rows, dtype=np.float64))


def metadata_features(paths: Sequence[Path]) -> np.ndarray:
    """The audit's metadata columns (width, height, aspect, mode, format, file size) from headers."""
    names = FEATURE_SETS["all"]
    modes = {"1": 0, "L": 1, "LA": 2, "P": 3, "RGB": 4, "RGBA": 5, "I;16": 6, "I": 7, "F": 8}
    formats = {"JPEG": 0, "PNG": 1, "BMP": 2, "TIFF": 3}
    rows = []
    for p in paths:
        try:
            with Image.open(p) as im:  # header only
                w, h, mode, fmt = im.width, im.height, im.mode, im.format or ""
            size = Path(p).stat().st_size
        except Exception:  # noqa: BLE001 - unreadable files were dropped earlier; keep a neutral row
            w = h = size = 0
            mode, fmt = "", ""
        cols = {"width": w, "height": h, "aspect": w / max(h, 1), "mode": modes.get(mode, 9),
                "format": formats.get(fmt, 9), "file_size": size}
        rows.append([cols[n] for n in names])
    return np.asarray(rows, dtype=np.float64)


def fit_quietly(model, x_train: np.ndarray, y_train: np.ndarray):
    """`model.fit` without scikit-learn's convergence chatter (tiny synthetic sets); returns the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x_train, y_train)


def _fit_predict(model, x_train: np.ndarray, y_train: np.ndarray, xs: list[np.ndarray], n_classes: int) -> list[np.ndarray]:
    fit_quietly(model, x_train, y_train)
    out = []
    for x in xs:
        p = np.zeros((len(x), n_classes))
        p[:, model.classes_] = model.predict_proba(x)  # classes absent from training get p = 0
        out.append(p)
    return out


def classical_model(seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000,
                                                              random_state=seed))


def metadata_model(seed: int = 0):
    from sklearn.tree import DecisionTreeClassifier

    # the audit's shortcut model, unchanged (lungcad.data.audit._shortcut)
    return DecisionTreeClassifier(max_depth=3, min_samples_leaf=3, class_weight="balanced", random_state=seed)


def run_feature_baselines(
    features: dict[str, np.ndarray], targets: dict[str, np.ndarray], classes: list[str], task: str,
    target_sensitivity: float, which: str, seed: int = 0, folds: np.ndarray | None = None,
) -> tuple[np.ndarray, float | None, dict]:
    """Fit on train, choose the malignant threshold on val, return (eval probabilities, threshold, info).

    `features`/`targets` hold "train", "val" and "eval" arrays; `which` is "classical" or "metadata".
    A fold ensemble has no validation split: with `folds` (the training images' folds), the
    threshold is chosen on the baseline's out-of-fold probabilities instead, as the ensemble's is.
    """
    model = classical_model(seed) if which == "classical" else metadata_model(seed)
    n_classes = len(classes)
    if folds is not None:
        (eval_p,) = _fit_predict(model, features["train"], targets["train"], [features["eval"]], n_classes)
        val_p, _ = out_of_fold_baseline(features["train"], targets["train"], folds, classes, task, target_sensitivity,
                                        which, seed)
        targets = {**targets, "val": targets["train"]}
    else:
        val_p, eval_p = _fit_predict(model, features["train"], targets["train"], [features["val"], features["eval"]],
                                     n_classes)
    m = malignant_index(classes)
    threshold, info = None, {}
    if m is not None and len(val_p):
        info = choose_threshold(val_p[:, m], targets["val"] == m, target_sensitivity)
        threshold = info["threshold"]
    if task == "binary" and threshold is None:
        threshold = 0.5
    return eval_p, threshold, info


def out_of_fold_baseline(features: np.ndarray, y: np.ndarray, folds: np.ndarray, classes: list[str], task: str,
                         target_sensitivity: float, which: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A baseline cross-validated on the model's own folds: (probabilities, decisions) per image.

    Fold k's images are predicted by a baseline fitted on the other folds (as the fold member was);
    their malignant threshold is chosen for `target_sensitivity` on the other folds' out-of-fold
    probabilities, exactly as the ensemble's cross-fitted operating point, so false positives are
    compared at matched sensitivity and nothing is tuned on the images it is scored on.
    """
    n_classes, m = len(classes), malignant_index(classes)
    probs = np.zeros((len(y), n_classes))
    for k in np.unique(folds):
        mine = folds == k
        model = classical_model(seed) if which == "classical" else metadata_model(seed)
        (probs[mine],) = _fit_predict(model, features[~mine], y[~mine], [features[mine]], n_classes)
    pred = probs.argmax(axis=1)
    if m is None:
        return probs, pred
    for k in np.unique(folds):
        mine = folds == k
        threshold = choose_threshold(probs[~mine, m], y[~mine] == m, target_sensitivity)["threshold"]
        pred[mine] = predict_labels(probs[mine], task, threshold, classes)  # the one decision rule
    return probs, pred
