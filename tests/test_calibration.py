"""Temperature scaling, ECE/Brier, and the validation operating point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcad.evaluation.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_operating_point,
    fit_temperature,
)
from lungcad.models.factory import logits_to_probs

CLASSES = ["normal", "benign", "malignant"]


def _overconfident(n=2000, seed=0, scale=4.0):
    """Logits from a calibrated model (true class drawn from softmax(z)), then multiplied by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    return torch.tensor(z * scale, dtype=torch.float32), y


def test_temperature_scaling_reduces_ece_of_an_overconfident_model():
    logits, y = _overconfident()
    t = fit_temperature(logits[:1000], y[:1000], "multiclass")
    assert t == pytest.approx(4.0, rel=0.15)  # recovers the over-confidence factor
    before = logits_to_probs(logits[1000:], "multiclass", 1.0).numpy()
    after = logits_to_probs(logits[1000:], "multiclass", t).numpy()
    assert expected_calibration_error(after, y[1000:]) < 0.5 * expected_calibration_error(before, y[1000:])
    assert expected_calibration_error(after, y[1000:]) < 0.05
    assert brier_score(after, y[1000:], "multiclass") < brier_score(before, y[1000:], "multiclass")


def test_binary_temperature_and_degenerate_input():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 1500)
    y = (rng.random(1500) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_temperature(torch.tensor(z * 3).reshape(-1, 1), y, "binary") == pytest.approx(3.0, rel=0.2)
    assert fit_temperature(torch.zeros(5, 3), np.zeros(5, dtype=int), "multiclass") == 1.0  # one class


def test_ece_and_brier_hand_computed():
    # two images, both predicted class 0 at 0.8 confidence, one right: ECE |0.5 - 0.8| = 0.3
    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.3)
    assert brier_score(probs, np.array([0, 1]), "binary") == pytest.approx((0.2**2 + 0.8**2) / 2)
    assert brier_score(np.array([[1.0, 0, 0]]), np.array([1]), "multiclass") == pytest.approx(2.0)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_target_sensitivity_with_fewest_flags(target):
    rng = np.random.default_rng(2)
    pos = rng.random(300) < 0.4
    p = np.clip(np.where(pos, rng.normal(0.65, 0.2, 300), rng.normal(0.35, 0.2, 300)), 0, 1)
    op = choose_threshold(p, pos, target)
    sens = (p[pos] >= op["threshold"]).mean()
    assert sens >= target and op["sensitivity"] == pytest.approx(sens)
    # any higher threshold misses the target: this is the most specific threshold that meets it
    higher = np.unique(p[p > op["threshold"]])
    if len(higher):
        assert (p[pos] >= higher[0]).mean() < target


def test_fit_operating_point_on_calibrated_probabilities():
    logits, y = _overconfident(n=600, seed=4)
    op = fit_operating_point(logits, y, "multiclass", CLASSES, 0.9)
    probs = logits_to_probs(logits, "multiclass", op["temperature"]).numpy()
    assert (probs[y == 2, 2] >= op["threshold"]).mean() >= 0.9
    assert op["validation"]["ece_after"] < op["validation"]["ece_before"]
    assert op["validation"]["target_sensitivity"] == 0.9
