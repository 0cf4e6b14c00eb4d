"""Out-of-distribution flags: photos, blank frames and MR slices given to a CT model are flagged."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import CLASSES, make_run, synthetic_slice

from lungcad.cli import main
from lungcad.errors import LungcadError
from lungcad.inference.ood import OOD_FILE, OODDetector
from lungcad.inference.predictor import Predictor


def test_detector_on_gaussian_features(tmp_path):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))
    sample = lambda n, shift=0.0: rng.normal(size=(n, 8)) @ basis + rng.normal(0, 0.1, (n, 64)) + shift  # noqa: E731
    det = OODDetector.fit(sample(200))
    summary = det.calibrate(sample(400), quantile=0.99)
    assert summary["n"] == 400 and det.threshold > 0
    flags, scores = det.is_ood(sample(1000))
    assert flags.mean() < 0.03  # ~1 % by construction of the threshold
    off_manifold = sample(50) + rng.normal(0, 1.0, (50, 64))  # energy off the 8-d subspace: residual term
    far = sample(50, shift=0.0) * 6  # on the subspace but far out: Mahalanobis term
    assert det.is_ood(off_manifold)[0].all() and det.is_ood(far)[0].all()
    sha = det.save(tmp_path)
    entry = {"method": "pca-mahalanobis+residual", "file": OOD_FILE, "sha256": sha, "threshold": det.threshold}
    loaded = OODDetector.load(tmp_path, entry)
    np.testing.assert_allclose(loaded.score(off_manifold), det.score(off_manifold), rtol=1e-5)
    with pytest.raises(LungcadError, match="sha256"):
        OODDetector.load(tmp_path, {**entry, "sha256": "0" * 64})
    with pytest.raises(LungcadError, match="at least 3"):
        OODDetector.fit(sample(2))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(module_tmp) -> Predictor:
    """A random-init run whose detector is fitted on 48 synthetic slices (24 held out)."""
    return Predictor(make_run(module_tmp("ood") / "run", ood=(48, 24)))


@pytest.mark.slow  # a detector fitted on 72 slices, then ~30 predictions
def test_natural_images_blank_frames_and_mr_are_flagged(predictor):
    from pydicom.data import get_testdata_file

    ood_inputs = {
        "astronaut": _png(skimage.data.astronaut()),
        "coffee": _png(skimage.data.coffee()),
        "camera": _png(skimage.data.camera()),
        "black": _png(np.zeros((64, 64), np.uint8)),
        "white": _png(np.full((64, 64), 255, np.uint8)),
        "mr": open(get_testdata_file("MR_small.dcm"), "rb").read(),
    }
    preds = {k: predictor.predict(v, name=k) for k, v in ood_inputs.items()}
    assert all(p.error == "" for p in preds.values())
    assert all(p.ood for p in preds.values()), {k: p.ood_score for k, p in preds.items()}
    rng = np.random.default_rng(7)
    held_out = [predictor.predict(_png(synthetic_slice(rng, CLASSES[i % 3], 5000 + i, 1))) for i in range(12)]
    # unseen patients of the training distribution: mostly not flagged (threshold = 99th val percentile)
    assert np.mean([p.ood for p in held_out]) <= 0.25, [p.ood_score for p in held_out]
    assert min(p.ood_score for p in preds.values()) > np.median([p.ood_score for p in held_out])


@pytest.mark.slow
def test_training_stores_ood_in_contract_and_predict_reports_it(trained_run, tmp_path):
    run = trained_run.run
    contract = json.loads((run / "model.json").read_text())
    assert contract["ood"]["method"] == "pca-mahalanobis+residual" and (run / OOD_FILE).is_file()
    assert np.isfinite(contract["ood"]["threshold"])
    img = tmp_path / "photo.png"
    img.write_bytes(_png(skimage.data.astronaut()))
    out = tmp_path / "p.json"
    assert main(["predict", str(run), str(img), "--out", str(out), "--no-progress"]) == 0
    row = json.loads(out.read_text())[0]
    # a model trained one epoch on a dozen images is no judge of OOD; the wiring is what is tested here
    assert row["error"] == "" and row["ood"] == (row["ood_score"] > contract["ood"]["threshold"])
