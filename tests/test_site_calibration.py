"""`lungcad calibrate RUNDIR DATA --out RUNDIR2`: the operating point re-fitted on a site's labelled cases.

Single runs are random-init `make_run` models at 32 px (their probabilities still differ per
image, which is all a threshold needs); the fold ensemble is one real `lungcad train --folds 2`
(marked slow). The site is make_dataset's synthetic patients: 6 per class, 3 slices each.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, make_run

from lungcad.cli import main
from lungcad.data.transforms import Preprocessing
from lungcad.evaluation.calibration import choose_threshold
from lungcad.evaluation.evaluate import eval_set
from lungcad.evaluation.site_calibration import MIN_PER_CLASS
from lungcad.inference.predictor import Predictor
from lungcad.models.contract import read_contract

PP = Preprocessing(image_size=32)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _site_probabilities(run: Path, site: Path) -> tuple[np.ndarray, np.ndarray]:
    """p(malignant) of every site image as the deployed run gives it, and which are malignant."""
    predictor = Predictor(run)
    files = sorted(site.rglob("*.png"))
    p = np.array([predictor.predict(f).malignant_probability for f in files])
    return p, np.array(["Malignant" in f.parent.name for f in files])


@pytest.fixture(scope="module")
def site(module_tmp) -> Path:
    return make_dataset(module_tmp("calibrate") / "site", patients=6, slices=3, size=48, seed=5)


@pytest.fixture(scope="module")
def source(module_tmp) -> Path:
    """A random-init single run with an operating point of its own (threshold 0.9, temperature 2)."""
    return make_run(module_tmp("calibrate-src") / "run", pp=PP, temperature=2.0, thresholds={"malignant": 0.9},
                    training={"operating_point": {"temperature": 2.0, "threshold": 0.9, "fitted_on": "validation",
                                                  "validation": {"target_sensitivity": 0.95}}})


def test_the_stored_threshold_is_the_one_the_site_cases_give_and_the_source_is_untouched(source, site, tmp_path,
                                                                                           capsys):
    before = _digest(source)
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(source), str(site), "--out", str(out), "--no-progress"]) == 0
    assert _digest(source) == before
    new, old = read_contract(out), read_contract(source)
    assert new.model_sha256 == old.model_sha256  # the weights are not touched
    op = new.training["operating_point"]
    assert op["fitted_on"] == f"labelled site cases: {site.resolve()}"
    assert new.temperature == op["temperature"] != 2.0 and new.thresholds["malignant"] == op["threshold"]
    # what the deployed copy now gives on the site cases is what the threshold was chosen on
    p, malignant = _site_probabilities(out, site)
    assert new.decision_threshold() == pytest.approx(choose_threshold(p, malignant, 0.95)["threshold"], abs=1e-6)
    assert (p[malignant] >= new.decision_threshold()).mean() >= 0.95
    report = json.loads((out / "calibration.json").read_text())
    assert report["images"] == 54 and report["classes"] == {"malignant": 18, "other": 36}
    assert report["groups"] == len(set(eval_set(source, site, [], False).groups))  # patients, as evaluate groups them
    assert report["source_operating_point"] == {"temperature": 2.0, "threshold": 0.9, "fitted_on": "validation"}
    assert report["cross_fitted"]["folds"] == 5
    sens = report["cross_fitted"]["metrics"]["malignant_vs_rest.sensitivity"]
    assert 0.0 <= sens["low"] <= sens["value"] <= sens["high"] <= 1.0
    assert new.training["site_calibration"]["data_fingerprint_sha256"] == report["data_fingerprint_sha256"]
    printed = capsys.readouterr().out
    assert "source operating point: temperature 2.000, threshold 0.900" in printed
    assert "re-fitted, cross-fitted over 5 folds of the site's patients: sensitivity" in printed


def test_a_higher_target_sensitivity_gives_a_threshold_no_higher(source, site, tmp_path):
    for target in ("0.8", "1.0"):
        assert main(["calibrate", str(source), str(site), "--out", str(tmp_path / target), "--target-sensitivity",
                     target, "--no-progress"]) == 0
    assert read_contract(tmp_path / "1.0").decision_threshold() <= read_contract(tmp_path / "0.8").decision_threshold()
    p, malignant = _site_probabilities(tmp_path / "1.0", site)
    assert p[malignant].min() >= read_contract(tmp_path / "1.0").decision_threshold()  # no cancer of the site missed


def test_a_binary_model_is_calibrated_on_its_malignant_probability(module_tmp, site, tmp_path):
    source = make_run(module_tmp("calibrate-binary") / "run", task="binary", pp=PP, seed=1)
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(source), str(site), "--out", str(out), "--no-progress"]) == 0
    new = read_contract(out)
    assert new.task == "binary" and new.temperature == new.training["operating_point"]["temperature"]
    p, malignant = _site_probabilities(out, site)
    assert new.decision_threshold() == pytest.approx(choose_threshold(p, malignant, 0.95)["threshold"], abs=1e-6)


@pytest.mark.parametrize("case", ["one class", "too few malignant", "out inside source", "out not empty",
                                  "no data", "bad target", "zero target"])
def test_bad_input_is_one_line_and_writes_nothing(source, site, tmp_path, capsys, case):
    data, out, extra = site, tmp_path / "out", []
    if case in ("one class", "too few malignant"):
        data = tmp_path / "site"
        shutil.copytree(site, data)
        keep = 0 if case == "one class" else MIN_PER_CLASS - 1
        for f in sorted((data / "Malignant cases").glob("*.png"))[keep:]:
            f.unlink()
    elif case == "out inside source":
        out = source / "calibrated"
    elif case == "out not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "no data":
        data = tmp_path / "missing"
    else:
        extra = ["--target-sensitivity", "1.5" if case == "bad target" else "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["calibrate", str(source), str(data), "--out", str(out), "--no-progress", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungcad calibrate: error: ") and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no RUNDIR2, no temporary folder left
    assert not (source / "calibrated").exists()
    if case == "one class":
        assert "0 malignant and 36 other readable image(s)" in err  # 6 patients x 3 slices, benign and normal


@pytest.mark.slow
def test_a_fold_ensemble_is_calibrated_as_deployed(module_tmp, site, tmp_path):
    """Every member scores every site image; the member temperature (applied before the mean, as
    train --folds stores it) and the threshold are fitted on the ensemble's own probabilities."""
    root = module_tmp("calibrate-cv")
    data = make_dataset(root / "data", patients=4, slices=3, size=48)
    cv = root / "cv"
    assert main(["train", "--data", str(data), "--out", str(cv), "--pretrained", "none", "--image-size", "32",
                 "--epochs", "1", "--folds", "2", "--batch-size", "8", "--no-progress"]) == 0
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(cv), str(site), "--out", str(out), "--no-progress"]) == 0
    new, old = read_contract(out), read_contract(cv)
    assert new.temperature == 1.0 and new.ensemble["members"] == old.ensemble["members"]
    assert new.ensemble["member_temperature"] == new.training["operating_point"]["temperature"]
    p, malignant = _site_probabilities(out, site)
    assert new.decision_threshold() == pytest.approx(choose_threshold(p, malignant, 0.95)["threshold"], abs=1e-6)
    assert json.loads((out / "calibration.json").read_text())["source_operating_point"]["temperature"] == \
        old.ensemble["member_temperature"]
