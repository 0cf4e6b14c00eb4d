"""Grad-CAM: points at the evidence on a model trained where only a blob decides; API shapes; hooks released."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("pytorch_grad_cam")

from conftest import make_run, synthetic_slice  # noqa: E402

from lungcad.errors import LungcadError  # noqa: E402
from lungcad.inference.explain import grad_cam  # noqa: E402
from lungcad.inference.predictor import Predictor  # noqa: E402

SIZE = 64


def blob_image(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noisy background + a dim rectangle in every image (a decoy); positives add a bright disc.

    Returns (uint8 image, boolean mask of the disc).
    """
    img = rng.normal(60, 15, (SIZE, SIZE))
    y0, x0 = rng.integers(4, SIZE - 20, 2)
    img[y0 : y0 + 14, x0 : x0 + 10] += 60  # decoy: present whatever the class
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.integers(10, SIZE - 10, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
    if positive:
        img[disc] += 150
    return np.clip(img, 0, 255).astype(np.uint8), disc


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),  # 16 x 16 map: Grad-CAM's layer
        )
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.features(x).amax(dim=(2, 3)))


def _batch(rng, n):
    labels = rng.integers(0, 2, n)
    images, masks = zip(*(blob_image(rng, bool(y)) for y in labels))
    x = torch.from_numpy(np.stack(images)).float().div(255).sub(0.3).unsqueeze(1)
    return x, torch.from_numpy(labels), np.stack(images), np.stack(masks)


@pytest.mark.slow
def test_grad_cam_points_at_the_blob():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):  # the blob is easy: 25 steps reach ~100 %
        x, y, _, _ = _batch(rng, 32)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, images, masks = _batch(np.random.default_rng(1), 64)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.95, f"the tiny model did not learn the blob (accuracy {accuracy:.2f})"

    fractions, chance = [], []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in np.flatnonzero(y.numpy() == 1)[:12]:
        exp = grad_cam(model, x[i], images[i], ["normal", "malignant"], "multiclass", "malignant",
                       layers=[model.features[-2]])
        assert exp.heatmap.shape == (SIZE, SIZE) and 0 <= exp.heatmap.min() and exp.heatmap.max() <= 1
        cy, cx = np.argwhere(masks[i]).mean(axis=0)
        near = (yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2  # the disc plus the CAM's 4-pixel blur
        fractions.append(exp.heatmap[near].sum() / exp.heatmap.sum())
        chance.append(near.mean())
    # ~8 % of the image, but most of the heatmap's mass
    assert np.mean(fractions) > 0.5 and np.mean(fractions) > 4 * np.mean(chance), (fractions, chance)
    assert not model.features[-2]._forward_hooks  # pytorch-grad-cam's hooks were released


@pytest.fixture(scope="module")
def predictor(module_tmp):
    return Predictor(make_run(module_tmp("explain") / "run", task="binary", size=SIZE))


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_predictor_explain_api(predictor, tmp_path):
    data = _png(synthetic_slice(np.random.default_rng(0), "malignant", 0, 0, size=96))
    exp = predictor.explain(data)
    pred = predictor.predict(data)
    assert exp.target == pred.label  # default target: the predicted class
    assert exp.heatmap.shape == (SIZE, SIZE) and exp.heatmap.dtype == np.float32
    assert np.isfinite(exp.heatmap).all() and 0 <= exp.heatmap.min() and exp.heatmap.max() <= 1
    assert exp.overlay.shape == (SIZE, SIZE, 3) and exp.overlay.dtype == np.uint8
    assert exp.image.shape == (SIZE, SIZE) and exp.image.dtype == np.uint8
    assert exp.probabilities == pytest.approx(pred.probabilities, abs=1e-4)
    # binary model: both targets work, and they explain opposite evidence
    pos, neg = predictor.explain(data, target="malignant"), predictor.explain(data, target="not_malignant")
    assert not np.allclose(pos.heatmap, neg.heatmap)
    path = exp.save_overlay(tmp_path / "cam.png")
    assert Image.open(path).size == (SIZE, SIZE) and Image.open(path).mode == "RGB"
    assert not any(m._forward_hooks or m._backward_hooks for m in predictor.model.modules())
    with pytest.raises(LungcadError, match="unknown Grad-CAM target 'benign'"):
        predictor.explain(data, target="benign")
    with pytest.raises(LungcadError, match="empty file"):
        predictor.explain(b"")
