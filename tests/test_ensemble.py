"""The fold ensemble: `train --folds K` writes one run folder that every consumer loads as one model.

One tiny cross-validation (2 folds, 32 px, 2 epochs, random init) is trained once for the module;
the tests check its contract, that its probabilities are the mean of its members' calibrated
probabilities, that the operating point stored is the one fitted on the pooled out-of-fold
predictions, and that predict / evaluate / export / the web app's predictor load it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_dataset

from lungcad.cli import main
from lungcad.data.dataset import load_cache
from lungcad.evaluation.calibration import fit_operating_point
from lungcad.inference.forward import infer_logits
from lungcad.inference.ood import EnsembleOODDetector, load_ood_detector
from lungcad.inference.predictor import Predictor
from lungcad.models.contract import load_model
from lungcad.models.ensemble import Ensemble, combine_member_logits
from lungcad.models.factory import logits_to_probs
from lungcad.run import RunFolder
from lungcad.training.crossval import cross_fitted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cv_run(module_tmp) -> Path:
    root = module_tmp("ensemble")
    data = make_dataset(root / "data", patients=4, slices=3, size=48)
    out = root / "cv"
    assert main(["train", "--data", str(data), "--out", str(out), "--pretrained", "none", "--image-size", "32",
                 "--epochs", "2", "--folds", "2", "--batch-size", "8", "--no-progress"]) == 0
    return out


def test_fold_seed_trains_a_replicate_on_the_same_folds(cv_run, tmp_path):
    """Another --seed with --fold-seed 0: the same folds as cv_run (seed 0), other members."""
    out = tmp_path / "replicate"
    data = json.loads((cv_run / "config.json").read_text())["data"]
    assert main(["train", "--data", data, "--out", str(out), "--pretrained", "none", "--image-size", "32",
                 "--epochs", "1", "--folds", "2", "--batch-size", "8", "--seed", "5", "--fold-seed", "0",
                 "--no-progress"]) == 0
    for k in (1, 2):
        assert (out / f"fold-{k}.split.csv").read_text() == (cv_run / f"fold-{k}.split.csv").read_text()
    ours, theirs = RunFolder(out).contract(), RunFolder(cv_run).contract()
    assert ours.training["seed"] == 5 and ours.training["fold_seed"] == 0 == theirs.training["fold_seed"]
    assert (out / "fold-1" / "model.safetensors").read_bytes() != (cv_run / "fold-1" / "model.safetensors").read_bytes()
    assert main(["train", "--data", data, "--out", str(tmp_path / "other"), "--fold-seed", "1"]) == 1  # needs --folds


def test_contract_lists_members_and_loads_as_one_model(cv_run):
    run = RunFolder(cv_run)
    contract = run.contract()
    assert run.is_ensemble and [m["path"] for m in contract.ensemble["members"]] == ["fold-1", "fold-2"]
    for entry in contract.ensemble["members"]:
        member = RunFolder(cv_run / entry["path"]).contract()
        assert member.model_sha256 == entry["model_sha256"]
        assert "operating_point" not in member.training  # members are calibrated only as an ensemble
    model, _ = load_model(cv_run)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert isinstance(load_ood_detector(cv_run, contract.ood), EnsembleOODDetector)
    assert contract.temperature == 1.0 and contract.decision_threshold() == contract.thresholds["malignant"]


def test_ensemble_probabilities_are_the_mean_of_calibrated_member_probabilities(cv_run):
    model, contract = load_model(cv_run)
    t = contract.ensemble["member_temperature"]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        ensemble = logits_to_probs(model(x), contract.task, contract.temperature)
        members = torch.stack([logits_to_probs(m(x), contract.task, t) for m in model.members]).mean(0)
    assert torch.allclose(ensemble, members, atol=1e-5)


def test_binary_combination_is_the_mean_of_sigmoids():
    z = torch.tensor([[[2.0], [-1.0]], [[0.0], [3.0]]])  # (K=2, N=2, 1)
    p = logits_to_probs(combine_member_logits(z, "binary", 2.0), "binary")[:, 1]
    expected = torch.sigmoid(z / 2.0).mean(0).reshape(-1)
    assert torch.allclose(p, expected, atol=1e-6)


def test_stored_operating_point_is_fitted_on_the_pooled_out_of_fold_logits(cv_run):
    contract = RunFolder(cv_run).contract()
    oof = RunFolder(cv_run).out_of_fold()
    y = np.array([contract.classes.index(lab) for lab in oof.labels])
    op = fit_operating_point(torch.as_tensor(oof.logits), y, contract.task, contract.classes)
    assert contract.thresholds["malignant"] == pytest.approx(op["threshold"], abs=1e-5)
    assert contract.ensemble["member_temperature"] == pytest.approx(op["temperature"], rel=1e-3)
    assert contract.training["operating_point"]["fitted_on"] == "pooled out-of-fold predictions"
    assert sorted(set(oof.folds)) == [1, 2] and len(oof.paths) == 36  # every image once


def test_out_of_fold_logits_come_from_the_member_that_never_saw_the_image(cv_run):
    oof = RunFolder(cv_run).out_of_fold()
    k = int(oof.folds[0])
    member, contract = load_model(cv_run / f"fold-{k}")
    cache, bad = load_cache([oof.paths[0]], contract.preprocessing, progress=False)
    assert not bad
    z = infer_logits(member, cache, contract.preprocessing)[0].numpy()
    np.testing.assert_allclose(z, oof.logits[0], atol=1e-4)
    split = {r["path"]: r["subset"] for r in csv.DictReader(open(cv_run / f"fold-{k}.split.csv"))}
    assert split[oof.paths[0].relative_to(RunFolder(cv_run).data_root).as_posix()] == "test"


def test_cross_fitted_operating_point_never_uses_the_images_own_fold():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = torch.as_tensor(rng.normal(size=(60, 3)) + 3 * np.eye(3)[y], dtype=torch.float32)
    folds = np.tile([1, 2], 30)
    probs, pred, ops = cross_fitted(logits, y, folds, "multiclass", ["normal", "benign", "malignant"], 0.95)
    changed = logits.clone()
    changed[folds == 1, 2] += 10.0  # fold 1's own scores move; its threshold must not
    _, _, ops2 = cross_fitted(changed, y, folds, "multiclass", ["normal", "benign", "malignant"], 0.95)
    assert ops2[1] == ops[1] and ops2[2] != ops[2]
    assert probs.shape == (60, 3) and np.allclose(probs.sum(1), 1)


def test_predict_evaluate_and_export_load_the_ensemble(cv_run, tmp_path):
    out_csv = tmp_path / "p.csv"
    malignant = RunFolder(cv_run).data_root / "Malignant cases"
    assert main(["predict", str(cv_run), str(malignant), "--out", str(out_csv), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 12 and all(r["error"] == "" for r in rows)
    assert {r["model_sha256"] for r in rows} == {RunFolder(cv_run).contract().model_sha256}

    assert main(["evaluate", str(cv_run), "--out", str(tmp_path / "eval"), "--no-report", "--bootstrap", "1000",
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["subset"] == "out-of-fold" and m["n"] == 36
    texture = next(r for r in m["comparison"] if r["method"].startswith("(b)"))
    assert "model_minus_this" in texture and texture["model_minus_this"]["metric"] == "balanced_accuracy"

    pytest.importorskip("onnxruntime")
    assert main(["export", str(cv_run), "--format", "onnx", "--no-progress"]) == 0
    torch_rows = Predictor(cv_run).predict_paths([malignant], progress=False)
    onnx_rows = Predictor(cv_run, engine="onnx").predict_paths([malignant], progress=False)
    for a, b in zip(torch_rows, onnx_rows):
        assert a.label == b.label and abs(a.malignant_probability - b.malignant_probability) < 1e-3


def test_evaluate_on_new_data_thresholds_baselines_out_of_fold(cv_run, tmp_path):
    """A fold ensemble has no validation split: the baselines' thresholds come from their own
    out-of-fold probabilities on the development images (this used to crash on the empty split)."""
    data = RunFolder(cv_run).data_root
    assert main(["evaluate", str(cv_run), "--data", str(data), "--out", str(tmp_path / "eval"), "--no-report",
                 "--bootstrap", "200", "--no-progress"]) == 0
    rows = {r["method"][:3]: r for r in json.loads((tmp_path / "eval" / "metrics.json").read_text())["comparison"]}
    assert rows["(b)"]["threshold"] is not None and rows["(c)"]["threshold"] is not None


def test_web_app_serves_the_ensemble(cv_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from test_web import png_bytes, site_with_token

    from lungcad.web.app import create_app

    data, token = site_with_token(tmp_path)
    contract = RunFolder(cv_run).contract()
    with TestClient(create_app(cv_run, data_dir=data)) as client:
        r = client.post("/api/predict", files={"file": ("x.png", png_bytes(90, size=64), "image/png")},
                        headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["model_sha256"] == contract.model_sha256
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_an_interrupted_cross_validation_resumes_and_scans_its_data_once(tmp_path, monkeypatch):
    """--resume keeps the finished member, retrains the one that died before its first checkpoint
    and finishes the ensemble; the images are scanned once for all folds (not once per fold)."""
    import shutil

    import lungcad.data.grouping as grouping

    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    out = tmp_path / "cv"
    argv = ["--out", str(out), "--pretrained", "none", "--image-size", "32", "--epochs", "1", "--folds", "2",
            "--batch-size", "8", "--no-progress"]
    decoded = []
    real_decode = grouping.decode_image
    monkeypatch.setattr(grouping, "decode_image", lambda raw, *a, **k: decoded.append(1) or real_decode(raw, *a, **k))
    assert main(["train", "--data", str(data), *argv]) == 0
    assert len(decoded) == 36  # 3 classes x 4 patients x 3 slices, each scanned once
    kept = (out / "fold-1" / "model.safetensors").stat().st_mtime_ns
    for name in ("model.json", "oof.csv", "crossval.json", "metrics.json"):
        (out / name).unlink()
    shutil.rmtree(out / "fold-2")  # died before its first checkpoint
    decoded.clear()
    assert main(["train", "--resume", *argv]) == 0
    assert len(decoded) == 36
    assert (out / "fold-1" / "model.safetensors").stat().st_mtime_ns == kept
    model, contract = load_model(out)
    assert isinstance(model, Ensemble) and [m["path"] for m in contract.ensemble["members"]] == ["fold-1", "fold-2"]
    assert RunFolder(out).out_of_fold().folds.tolist().count(2) == 18


def test_ood_threshold_is_the_quantile_of_pooled_out_of_fold_scores(cv_run):
    """The ensemble's OOD threshold comes from every held-out image's score (normalised by its
    member's held-out median), not from one fold; the detector loads with those scales."""
    contract = RunFolder(cv_run).contract()
    entry = contract.ood
    oof = RunFolder(cv_run).out_of_fold()
    raw, folds = [], []
    for k, member in enumerate(entry["members"], start=1):
        model, member_contract = load_model(cv_run / member["path"])
        paths = [p for p, f in zip(oof.paths, oof.folds) if f == k]
        cache, bad = load_cache(paths, member_contract.preprocessing)
        assert not bad
        feats = infer_features(model, cache, member_contract.preprocessing)
        raw.append(load_ood_detector(cv_run / member["path"], member_contract.ood).score(feats))
        folds.append(np.full(len(paths), k))
        assert member["scale"] == pytest.approx(float(np.median(raw[-1])), rel=1e-4)
    z = np.concatenate([r / m["scale"] for r, m in zip(raw, entry["members"])])
    assert entry["threshold"] == pytest.approx(float(np.quantile(z, entry["quantile"])), rel=1e-4)
    rates = entry["calibration"]["cross_fitted_false_flags"]
    assert entry["calibration"]["n"] == len(z)
    assert 0.0 <= rates["either"]["rate"] <= 1.0 and rates["either"]["rate"] >= rates["feature"]["rate"]

    detector = load_ood_detector(cv_run, entry)
    assert detector.scales == [m["scale"] for m in entry["members"]]
    model, _ = load_model(cv_run)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    feats = infer_features(model, x, contract.preprocessing)
    chunks = np.split(feats, 2, axis=1)
    expected = np.mean([d.score(f) / s for d, f, s in zip(detector.members, chunks, detector.scales)], axis=0)
    assert np.allclose(detector.score(feats), expected)


def infer_features(model, cache, pp):
    from lungcad.inference.engines import TorchEngine
    from lungcad.inference.forward import run_engine

    return run_engine(TorchEngine(model), cache, pp)[1]


def test_cross_fitted_false_flags_use_the_other_folds_threshold():
    from lungcad.inference.ood import OutOfFoldScores, cross_fitted_false_flags

    # fold 1: scores 1..100, fold 2: 101..200 (normalised scores as given). Fold 1 judged by fold 2's
    # 0.9 quantile (190.1): none flagged; fold 2 by fold 1's (90.1): 100 flagged. Appearance: 3 images.
    z = np.arange(1, 201, dtype=float)
    folds = np.repeat([1, 2], 100)
    appearance = np.zeros(200, dtype=bool)
    appearance[[0, 1, 150]] = True
    oof = OutOfFoldScores(z, folds, np.array([f"g{i // 10}" for i in range(200)]), appearance)
    rates = cross_fitted_false_flags(z, oof, 0.9, n_boot=200)
    assert rates["feature"]["rate"] == 0.5
    assert rates["appearance"]["rate"] == 0.015
    assert rates["either"]["rate"] == 0.51
    lo, hi = rates["either"]["ci95"]
    assert lo <= 0.51 <= hi and hi - lo > 0.05  # 20 groups: a wide interval


def test_old_ensemble_contract_without_scales_normalises_by_member_thresholds():
    from lungcad.inference.ood import OODDetector

    rng = np.random.default_rng(0)
    dets = []
    for t in (2.0, 4.0):
        d = OODDetector.fit(rng.normal(size=(20, 6)), components=2)
        d.threshold = t
        dets.append(d)
    feats = rng.normal(size=(5, 12))
    old = EnsembleOODDetector(dets, 1.0)
    expected = (dets[0].score(feats[:, :6]) / 2.0 + dets[1].score(feats[:, 6:]) / 4.0) / 2
    assert np.allclose(old.score(feats), expected)
