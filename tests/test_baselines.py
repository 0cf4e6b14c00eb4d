"""Baselines: features are finite and informative, the metadata model finds a size shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lungcad.evaluation.baselines import majority_probs, metadata_features, run_feature_baselines, texture_features

CLASSES = ["normal", "benign", "malignant"]


def _blob_images(n, label, rng, size=48):
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        img = np.where(((yy - 24) / 16) ** 2 + ((xx - 24) / 20) ** 2 <= 1, 90, 0) + rng.normal(0, 20, (size, size))
        if label:  # malignant: a bright, smooth blob
            img += np.where((yy - rng.integers(18, 30)) ** 2 + (xx - rng.integers(18, 30)) ** 2 <= 36, 140, 0)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out))[:, None]


def test_majority_probs():
    p = majority_probs([2, 2, 0, 1, 2], 4, 3)
    assert p.shape == (4, 3) and p[0].tolist() == pytest.approx([0.2, 0.2, 0.6]) and (p.argmax(1) == 2).all()


def test_texture_features_are_finite_and_classical_model_learns_blobs():
    rng = np.random.default_rng(0)
    feats, targets = {}, {}
    for name, n in (("train", 30), ("val", 15), ("eval", 15)):
        x = torch.cat([_blob_images(n, 0, rng), _blob_images(n, 1, rng)])
        feats[name] = texture_features(x)
        targets[name] = np.array([0] * n + [2] * n)
    assert feats["train"].shape == (60, 35) and np.isfinite(feats["train"]).all()
    probs, thr, info = run_feature_baselines(feats, targets, CLASSES, "multiclass", 0.95, "classical")
    assert probs.shape == (30, 3) and probs[:, 1].max() == 0  # benign never seen in training: p = 0
    assert info["sensitivity"] >= 0.95  # threshold chosen on validation for the target
    pred_malignant = probs[:, 2] >= thr
    assert (pred_malignant == (targets["eval"] == 2)).mean() >= 0.8


def test_metadata_model_finds_the_frame_size_shortcut(tmp_path):
    # like IQ-OTH/NCCD: every wide image is malignant, so metadata alone gives the label away
    paths, labels = [], []
    for i in range(40):
        label = i % 2
        w = 80 if label else 64
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((64, w), 100, np.uint8)).save(p)
        paths.append(p)
        labels.append(2 if label else 0)
    x = metadata_features(paths)
    assert x.shape == (40, 6) and set(x[:, 0]) == {64.0, 80.0}
    y = np.array(labels)
    feats = {"train": x[:20], "val": x[20:30], "eval": x[30:]}
    targets = {"train": y[:20], "val": y[20:30], "eval": y[30:]}
    probs, thr, _ = run_feature_baselines(feats, targets, CLASSES, "multiclass", 0.95, "metadata")
    assert ((probs[:, 2] >= thr) == (targets["eval"] == 2)).all()
