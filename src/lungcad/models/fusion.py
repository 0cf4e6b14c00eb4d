"""A texture head fused with the network: `lungcad train --folds K --fusion texture`.

The CNN ranks malignant slices well, but with 15 benign patients it does not learn benign from
normal; a class-balanced logistic regression on hand-made intensity and texture features
(`lungcad.evaluation.baselines.texture_features`: histogram statistics, GLCM, LBP, computed on the
same prepared uint8 image the network sees) ranks those two better, and the two err on different
images. The fused model's probabilities are the plain mean of the two, with fixed equal weights
(nothing tuned on the images it is judged by):

    p = (1 - w) * p_network(calibrated) + w * p_texture,   w = 0.5

The network part is the calibrated ensemble of `lungcad.models.ensemble`; the malignant threshold
is fitted on the *fused* out-of-fold probabilities. The head's parameters (the scaler and the
logistic regression) live in the contract (`ModelContract.fusion`), so predict, evaluate, export
and serve apply it from model.json alone; `predict_proba` reproduces scikit-learn's pipeline.

What it does not change: the out-of-distribution score (the network's feature space) and the
heatmap (Grad-CAM of the network's part; the texture head has no spatial map). The ablation that
chose it is in docs/ablations.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TEXTURE_WEIGHT", "TextureHead", "contract_probs", "contract_texture", "fuse",
           "texture_probs"]

TEXTURE_WEIGHT = 0.5  # equal weights: the one choice that needs no data to make
FEATURES = "texture-v1"  # lungcad.evaluation.baselines.texture_features as of 0.x (intensity + GLCM + LBP)


@dataclass(frozen=True)
class TextureHead:
    """StandardScaler + LogisticRegression on texture features, as plain arrays."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (K, F); K = 1 for a two-class regression
    intercept: np.ndarray  # (K,)
    columns: np.ndarray  # output column of each class the regression saw (classes absent from training: p = 0)
    n_classes: int
    weight: float = TEXTURE_WEIGHT

    @classmethod
    def fit(cls, features: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0,
            weight: float = TEXTURE_WEIGHT) -> TextureHead:
        from lungcad.evaluation.baselines import classical_model, fit_quietly

        model = fit_quietly(classical_model(seed), features, y)
        scaler, lr = model[0], model[-1]
        return cls(mean=scaler.mean_.copy(), scale=scaler.scale_.copy(), coef=lr.coef_.copy(),
                   intercept=lr.intercept_.copy(), columns=np.asarray(lr.classes_, dtype=int), n_classes=n_classes,
                   weight=weight)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities: scikit-learn's `predict_proba` of the fitted pipeline."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # two classes seen: sigmoid of the one decision function
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            seen = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = z - z.max(axis=1, keepdims=True)
            seen = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        out = np.zeros((len(seen), self.n_classes))
        out[:, self.columns] = seen
        return out

    def to_dict(self) -> dict:
        return {"kind": "texture", "features": FEATURES, "weight": self.weight, "n_classes": self.n_classes,
                "columns": self.columns.tolist(), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TextureHead:
        from lungcad.errors import LungcadError

        if d.get("kind") != "texture" or d.get("features") != FEATURES:
            raise LungcadError(f"model.json: fusion {d.get('kind')!r} with features {d.get('features')!r} is not one "
                               f"this lungcad computes ({FEATURES})")
        return cls(mean=np.asarray(d["mean"], float), scale=np.asarray(d["scale"], float),
                   coef=np.asarray(d["coef"], float), intercept=np.asarray(d["intercept"], float),
                   columns=np.asarray(d["columns"], int), n_classes=int(d["n_classes"]), weight=float(d["weight"]))


def fuse(p_network: np.ndarray, p_texture: np.ndarray, weight: float = TEXTURE_WEIGHT) -> np.ndarray:
    return (1.0 - weight) * np.asarray(p_network, dtype=np.float64) + weight * np.asarray(p_texture, dtype=np.float64)


def texture_probs(head: TextureHead, cache: torch.Tensor) -> np.ndarray:
    """The head's probabilities for a uint8 cache (N, C, S, S) of prepared images."""
    from lungcad.evaluation.baselines import texture_features

    if not len(cache):
        return np.zeros((0, head.n_classes))
    return head.predict_proba(texture_features(cache))


def contract_texture(cache: torch.Tensor, contract, features: np.ndarray | None = None) -> np.ndarray | None:
    """The contract's texture head's probabilities for a uint8 cache; None for the network alone.
    `features`: `texture_features` of the same images, when the caller has them already."""
    if not contract.fusion:
        return None
    head = TextureHead.from_dict(contract.fusion)
    return texture_probs(head, cache) if features is None else head.predict_proba(features)


def contract_probs(logits, cache: torch.Tensor, contract, temperature: float | None = None,
                   texture: np.ndarray | None = None) -> np.ndarray:
    """The model's probabilities (N, C) for engine logits and the prepared uint8 images they came from:
    temperature (the contract's unless given) and softmax/sigmoid (`logits_to_probs`), then the
    contract's fusion if it has one (`texture`: `contract_texture` of the same images, when the
    caller needs it for more than one temperature). Every path from logits to a decision goes
    through here (predict, serve, evaluate, compare, export's checks)."""
    from lungcad.models.factory import logits_to_probs

    t = contract.temperature if temperature is None else temperature
    probs = logits_to_probs(torch.as_tensor(np.asarray(logits), dtype=torch.float32), contract.task, t).numpy()
    if not contract.fusion:
        return probs
    if texture is None:
        texture = contract_texture(cache, contract)
    return fuse(probs, texture, float(contract.fusion["weight"]))
