"""The texture head fused with the network (`train --folds K --fusion texture`, lungcad.models.fusion).

Fast: the head reproduces scikit-learn's pipeline from the arrays stored in the contract; the
fused probabilities are the fixed-weight mean; cross-fitting keeps each fold's threshold away from
its own images. Slow: a tiny fused cross-validation whose contract, oof.csv, predict, evaluate and
ONNX engine all apply the same head.
"""

from __future__ import annotations

import csv
import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_dataset

from lungcad.cli import main
from lungcad.errors import LungcadError
from lungcad.evaluation.baselines import classical_model, fit_quietly, texture_features
from lungcad.evaluation.calibration import expected_calibration_error, fit_operating_point, fit_temperature
from lungcad.inference.predictor import Predictor
from lungcad.models.factory import logits_to_probs
from lungcad.models.fusion import TEXTURE_WEIGHT, TextureHead, contract_probs, fuse
from lungcad.run import RunFolder
from lungcad.training.crossval import cross_fitted, fused_operating_point, out_of_fold_texture

CLASSES = ["normal", "benign", "malignant"]


def _features(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return rng.normal(size=(n, 6)) + 1.5 * np.eye(3, 6)[y] * rng.uniform(1, 5, size=6), y


@pytest.mark.parametrize("labels", [[0, 1, 2], [0, 1], [0, 2]])
def test_head_reproduces_the_scikit_learn_pipeline(labels):
    x, y = _features(90)
    keep = np.isin(y, labels)
    head = TextureHead.fit(x[keep], y[keep], n_classes=3)
    reference = fit_quietly(classical_model(0), x[keep], y[keep])
    expected = np.zeros((len(x), 3))
    expected[:, reference.classes_] = reference.predict_proba(x)
    np.testing.assert_allclose(head.predict_proba(x), expected, atol=1e-10)
    # an unseen class gets probability 0, the others sum to 1
    unseen = sorted(set(range(3)) - set(labels))
    assert np.all(head.predict_proba(x)[:, unseen] == 0) and np.allclose(head.predict_proba(x).sum(1), 1)


def test_head_round_trips_through_the_contract_and_refuses_other_features():
    x, y = _features(60)
    head = TextureHead.fit(x, y, 3)
    again = TextureHead.from_dict(json.loads(json.dumps(head.to_dict())))
    np.testing.assert_array_equal(again.predict_proba(x), head.predict_proba(x))
    with pytest.raises(LungcadError, match="texture-v0"):
        TextureHead.from_dict({**head.to_dict(), "features": "texture-v0"})


def test_contract_probs_fuse_the_calibrated_network_with_the_head():
    rng = np.random.default_rng(1)
    cache = torch.as_tensor(rng.integers(0, 256, size=(6, 1, 32, 32)), dtype=torch.uint8)
    feats = texture_features(cache)
    head = TextureHead.fit(feats, np.array([0, 1, 2, 0, 1, 2]), 3)
    logits = torch.as_tensor(rng.normal(size=(6, 3)), dtype=torch.float32)
    plain = SimpleNamespace(task="multiclass", temperature=1.7, fusion={})
    fused = SimpleNamespace(task="multiclass", temperature=1.7, fusion=head.to_dict())
    network = logits_to_probs(logits, "multiclass", 1.7).numpy()
    np.testing.assert_allclose(contract_probs(logits, cache, plain), network, atol=1e-7)
    expected = (1 - TEXTURE_WEIGHT) * network + TEXTURE_WEIGHT * head.predict_proba(feats)
    np.testing.assert_allclose(contract_probs(logits, cache, fused), expected, atol=1e-6)
    assert not np.allclose(expected, network)


def test_cross_fitted_fusion_keeps_each_fold_away_from_its_own_images():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    folds = np.tile([1, 2], 30)
    logits = torch.as_tensor(rng.normal(size=(60, 3)) + 2 * np.eye(3)[y], dtype=torch.float32)
    texture = rng.dirichlet(np.ones(3), size=60)
    probs, _, ops = cross_fitted(logits, y, folds, "multiclass", CLASSES, 0.95, texture)
    moved = texture.copy()
    moved[folds == 1] = np.eye(3)[2]  # fold 1's own texture votes change; its threshold must not
    _, _, ops2 = cross_fitted(logits, y, folds, "multiclass", CLASSES, 0.95, moved)
    assert ops2[1] == ops[1] and ops2[2] != ops[2]
    # fold 1's probabilities: its operating point's temperature on the network, then the mean
    network = logits_to_probs(logits[folds == 1], "multiclass", ops[1]["temperature"]).numpy()
    np.testing.assert_allclose(probs[folds == 1], fuse(network, texture[folds == 1]), atol=1e-6)
    # the fused threshold gives the target sensitivity on the fused probabilities it was chosen on
    op = fused_operating_point(logits, y, "multiclass", CLASSES, 0.95, "all", texture)
    fused = fuse(logits_to_probs(logits, "multiclass", op["temperature"]).numpy(), texture)
    assert (fused[y == 2, 2] >= op["threshold"]).mean() >= 0.95 and "fusion" in op


def test_a_fused_model_is_calibrated_as_fused():
    """The temperature minimises the likelihood of the fused probabilities (what inference
    produces), not the network's alone: for an overconfident network fused with a soft head, the
    network's own temperature over-softens the mean."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 100)
    right = rng.random(300) < 0.8  # the network is right 80 % of the time, and sure of itself either way
    shown = np.where(right, y, (y + 1) % 3)
    logits = torch.as_tensor(4.0 * np.eye(3)[shown] + rng.normal(size=(300, 3)), dtype=torch.float32)
    texture = 0.25 + 0.25 * np.eye(3)[y]  # a soft head that leans the right way

    def nll(t):
        p = fuse(logits_to_probs(logits, "multiclass", t).numpy(), texture)
        return -np.log(p[np.arange(300), y]).mean()

    alone = fit_operating_point(logits, y, "multiclass", CLASSES, 0.95)["temperature"]
    fused = fused_operating_point(logits, y, "multiclass", CLASSES, 0.95, "all", texture)
    assert fused["temperature"] == pytest.approx(fit_temperature(logits, y, "multiclass", partial(fuse, p_texture=texture)))
    assert fused["temperature"] < alone  # the head already softens; the network needs less
    assert nll(fused["temperature"]) < nll(alone) - 0.01
    for t in (0.5 * fused["temperature"], 2.0 * fused["temperature"]):
        assert nll(fused["temperature"]) <= nll(t) + 1e-9
    assert fused["validation"]["ece_after"] == pytest.approx(
        expected_calibration_error(fuse(logits_to_probs(logits, "multiclass", fused["temperature"]).numpy(), texture), y))


def test_out_of_fold_texture_never_fits_on_the_fold_it_predicts():
    x, y = _features(60)
    folds = np.tile([1, 2, 3], 20)
    probs = out_of_fold_texture(x, y, folds, 3)
    mine = folds == 2
    np.testing.assert_allclose(probs[mine], TextureHead.fit(x[~mine], y[~mine], 3).predict_proba(x[mine]))


def test_fusion_needs_folds(tmp_path):
    data = make_dataset(tmp_path / "data", patients=2, slices=1, size=32)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--fusion", "texture"]) == 1
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def fused_run(module_tmp):
    root = module_tmp("fusion")
    data = make_dataset(root / "data", patients=4, slices=3, size=48)
    out = root / "cv"
    assert main(["train", "--data", str(data), "--out", str(out), "--pretrained", "none", "--image-size", "32",
                 "--epochs", "1", "--folds", "2", "--batch-size", "8", "--fusion", "texture", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_fused_run_stores_its_head_and_fused_operating_point(fused_run):
    run = RunFolder(fused_run)
    contract, oof = run.contract(), run.out_of_fold()
    assert contract.format_version == 2 and contract.fusion["kind"] == "texture"
    assert contract.training["recipe"]["fusion"] == "texture"
    assert RunFolder(fused_run / "fold-1").contract().fusion == {}  # a member alone is the network alone
    y = np.array([contract.classes.index(lab) for lab in oof.labels])
    assert oof.texture is not None and oof.texture.shape == (36, 3)
    op = fused_operating_point(torch.as_tensor(oof.logits, dtype=torch.float32), y, contract.task, contract.classes,
                               0.95, "pooled", oof.texture)
    assert contract.thresholds["malignant"] == pytest.approx(op["threshold"], abs=1e-5)
    probs, _, _ = cross_fitted(torch.as_tensor(oof.logits, dtype=torch.float32), y, oof.folds, contract.task,
                               contract.classes, 0.95, oof.texture)
    np.testing.assert_allclose(oof.probs, probs, atol=2e-6)  # oof.csv holds the cross-fitted fused figures


@pytest.mark.slow
def test_predict_evaluate_and_onnx_apply_the_same_head(fused_run, tmp_path, monkeypatch):
    run = RunFolder(fused_run)
    contract = run.contract()
    malignant = run.data_root / "Malignant cases"
    predictor = Predictor(fused_run)
    rows = list(predictor.predict_paths([malignant], progress=False))
    head = TextureHead.from_dict(contract.fusion)
    from lungcad.data.dataset import load_cache
    from lungcad.inference.forward import infer_logits

    files = sorted(p for p in malignant.iterdir())
    cache, bad = load_cache(files, contract.preprocessing, progress=False)
    assert not bad
    network = logits_to_probs(infer_logits(predictor.model, cache, contract.preprocessing), contract.task,
                              contract.temperature).numpy()
    expected = fuse(network, head.predict_proba(texture_features(cache)))
    got = {r.source: [r.probabilities[c] for c in contract.classes] for r in rows}
    np.testing.assert_allclose([got[str(f)] for f in files], expected, atol=1e-5)

    import lungcad.evaluation.baselines as baselines_module
    import lungcad.evaluation.compare as compare_module
    import lungcad.evaluation.evaluate as evaluate_module

    computed = []

    def counted(cache, progress=False):
        computed.append(len(cache))
        return texture_features(cache, progress)

    for module in (baselines_module, compare_module, evaluate_module):
        monkeypatch.setattr(module, "texture_features", counted)
    assert main(["evaluate", str(fused_run), "--data", str(run.data_root), "--out", str(tmp_path / "eval"),
                 "--no-report", "--bootstrap", "200", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 36
    # the evaluation images' features once (fusion head and baseline (b)), the training images' once
    assert computed == [36, 36]
    assert any(row["method"].startswith("(b)") and "balanced_accuracy" in row for row in metrics["comparison"])
    monkeypatch.undo()

    pytest.importorskip("onnxruntime")
    assert main(["export", str(fused_run), "--format", "onnx", "--no-progress"]) == 0
    exported = json.loads(next((fused_run / "export").glob("*.onnx.json")).read_text())
    assert exported["fusion"] == contract.fusion
    onnx_rows = list(Predictor(fused_run, engine="onnx").predict_paths([malignant], progress=False))
    for a, b in zip(rows, onnx_rows):
        assert a.label == b.label and abs(a.malignant_probability - b.malignant_probability) < 1e-3
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(fused_run), str(malignant), "--out", str(out_csv), "--no-progress"]) == 0
    assert [round(float(r["malignant_probability"]), 4) for r in csv.DictReader(open(out_csv))] == \
        [round(r.malignant_probability, 4) for r in rows]
