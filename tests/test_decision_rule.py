"""One decision rule: `lungcad predict` and `lungcad evaluate` give every image the same label, for
every contract shape (binary; multiclass with and without an operating point)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, make_run

from lungcad.cli import main
from lungcad.inference.predictor import Predictor
from lungcad.models.contract import CONTRACT_FILE

SHAPES = {
    "binary": ("binary", {"malignant": 0.3}, False),
    "multiclass-operating-point": ("multiclass", {"malignant": 0.2}, True),
    "multiclass-argmax": ("multiclass", {"malignant": 0.5}, False),  # placeholder: never applied
}


def _set_contract(run: Path, thresholds: dict, operating_point: bool) -> None:
    path = run / CONTRACT_FILE
    c = json.loads(path.read_text())
    c["thresholds"] = thresholds
    if operating_point:
        c["training"]["operating_point"] = {"threshold": thresholds["malignant"], "fitted_on": "validation"}
    path.write_text(json.dumps(c))


@pytest.mark.slow  # predict and a CLI evaluate (1000 bootstrap resamples) per contract shape
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_predict_and_evaluate_agree(shape, tmp_path):
    task, thresholds, op = SHAPES[shape]
    run = make_run(tmp_path / "run", task=task, size=32, temperature=1.5, thresholds={"malignant": 0.5})
    _set_contract(run, thresholds, op)
    data = make_dataset(tmp_path / "data", patients=2, slices=2, size=48)
    preds = list(Predictor(run).predict_paths([data], progress=False, series_rows=False))
    classes = Predictor(run).classes
    truth = {"Normal": "normal", "Bengin": "benign", "Malignant": "malignant"}
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    for p in preds:
        label = truth[Path(p.source).parent.name.split()[0]]
        t = (1 if label == "malignant" else 0) if task == "binary" else classes.index(label)
        cm[t, classes.index(p.label)] += 1
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "eval"), "--no-baselines",
                 "--no-report", "--bootstrap", "1000", "--no-progress"]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert np.array_equal(np.array(m["confusion_matrix"]["matrix"]), cm)
    if shape == "multiclass-argmax":  # the placeholder is not applied: labels are the argmax
        assert all(p.label == max(p.probabilities, key=p.probabilities.get) for p in preds)
