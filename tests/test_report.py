"""`lungcad evaluate` end to end on a tiny run: metrics.json, report.html (rendered in headless
Chromium), baselines and --compare, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lungcad.cli import main
from lungcad.evaluation.report import fmt, fmt_ci

pytestmark = pytest.mark.slow  # every test trains and evaluates a run (one opens a headless browser)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def evaluated(module_tmp):
    """A 1-epoch 32-px run whose test split holds >= 10 groups (so intervals exist), evaluated."""
    from conftest import make_dataset

    from lungcad.training.trainer import TrainConfig, train

    root = module_tmp("report")
    data = make_dataset(root / "data", patients=10, slices=2, size=48)
    run = train(TrainConfig(data=str(data), out=str(root / "run"), pretrained="none", image_size=32, epochs=1,
                            batch_size=8, val_fraction=0.25, test_fraction=0.4, progress=False))
    assert main(["evaluate", str(run), "--no-progress", "--bootstrap", "1000"]) == 0
    return data, run, json.loads((run / "metrics.json").read_text())


def test_metrics_json_holds_intervals_groups_calibration_and_baselines(evaluated):
    data, run, m = evaluated
    contract = json.loads((run / "model.json").read_text())
    assert m["subset"] == "test" and m["n_groups"] >= 10 and m["ci"]["n_boot"] == 1000
    acc = m["intervals"]["accuracy"]
    assert acc["value"] == m["accuracy"] and acc["low"] <= m["accuracy"] <= acc["high"]
    assert m["group_level"]["n"] == m["n_groups"]
    # temperature and threshold come from the contract, fitted on validation during training
    assert m["calibration"]["temperature"] == contract["temperature"] and contract["temperature"] > 0
    assert m["operating_point"]["threshold"] == contract["thresholds"]["malignant"] == m["threshold"]
    assert contract["training"]["operating_point"]["validation"]["sensitivity"] >= 0.95
    for key in ("before", "after"):
        assert 0 <= m["calibration"][key]["ece"] <= 1 and len(m["calibration"][key]["bins"]) == 15
    methods = [r["method"] for r in m["comparison"]]
    assert methods[0].startswith("lungcad") and [x[:3] for x in methods[1:]] == ["(a)", "(b)", "(c)"]
    for row in m["comparison"]:
        assert isinstance(row["false_positives"], int) and isinstance(row["false_negatives"], int)
    # (a) always answers the commonest training class: on malignant-vs-rest it flags all or nothing
    maj = m["comparison"][1]
    assert maj["false_positives"] == 0 or maj["false_negatives"] == 0
    # the training-time keys survive the rewrite, and the headline numbers agree with training
    assert m["best_epoch"] == 1
    conc = m["group_concentration"]["per_class"]
    assert sum(c["images"] for c in conc.values()) == m["n"]
    assert all(0 < c["largest_group_share"] <= 1 and c["groups"] >= 1 for c in conc.values())


def test_report_is_self_contained(evaluated):
    _, run, _ = evaluated
    html = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from a network
    assert "<script" not in html
    assert html.count('src="data:image/png;base64,') >= 5  # 4 figures + training curves + examples


def test_report_renders_in_headless_chromium(evaluated):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (scripts/install-system-deps.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (test extra)")
    _, run, m = evaluated
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto((run / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            text = page.inner_text("body")
            figures = page.eval_on_selector_all(
                "img[id^=fig-]", "els => els.map(e => [e.id, e.complete, e.naturalWidth, e.naturalHeight])")
            height = page.evaluate("document.body.scrollHeight")
        finally:
            browser.close()
    assert {f[0] for f in figures} == {"fig-training", "fig-confusion", "fig-curves", "fig-reliability"}
    assert all(complete and w > 100 and h > 100 for _, complete, w, h in figures), figures
    assert height > 2000  # a full page, not a blank one
    expected = [
        fmt(m["accuracy"]), fmt_ci(m["intervals"]["accuracy"]), fmt(m["balanced_accuracy"]),
        fmt_ci(m["intervals"]["malignant_vs_rest.sensitivity"]), fmt(m["operating_point"]["threshold"]),
        fmt(m["calibration"]["before"]["ece"]), fmt(m["calibration"]["after"]["ece"]),
        fmt(m["calibration"]["temperature"]), fmt_ci(m["group_level"]["intervals"]["balanced_accuracy"]),
        *(fmt(r["balanced_accuracy"]["value"]) for r in m["comparison"]),
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, missing
    for row in m["comparison"]:
        assert row["method"] in text


def test_compare_run_and_leak_check(evaluated, tmp_path, capsys):
    data, run, m = evaluated
    # the run compared with itself scores identically on the same images
    out = tmp_path / "cmp"
    assert main(["evaluate", str(run), "--compare", str(run), "--no-baselines", "--no-report", "--out", str(out),
                 "--bootstrap", "1000", "--no-progress"]) == 0
    cmp = json.loads((out / "metrics.json").read_text())
    own, other = cmp["comparison"][0], cmp["comparison"][1]
    assert other["method"].startswith("(d)") and other["balanced_accuracy"] == own["balanced_accuracy"]
    assert not (out / "report.html").exists()
    # a compare run that trained on our test images is refused
    leaky = tmp_path / "leaky"
    shutil.copytree(run, leaky)
    split = (leaky / "split.csv").read_text().replace(",test\n", ",train\n")
    (leaky / "split.csv").write_text(split)
    assert main(["evaluate", str(run), "--compare", str(leaky), "--no-baselines", "--no-report",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "trained or validated on" in capsys.readouterr().err


def test_external_folder_label_map_and_unknown_classes(evaluated, tmp_path, capsys):
    data, run, _ = evaluated
    ext = tmp_path / "external"
    shutil.copytree(data / "Normal cases", ext / "healthy")
    shutil.copytree(data / "Malignant cases", ext / "adenocarcinoma")
    argv = ["evaluate", str(run), "--data", str(ext), "--no-progress", "--no-baselines", "--no-report",
            "--bootstrap", "1000"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown class folder" in err and "--label-map" in err
    assert main([*argv, "--label-map", "healthy=normal,adenocarcinoma=malignant"]) == 0
    m = json.loads((run / "eval-external" / "metrics.json").read_text())
    assert m["n"] == 40 and m["per_class"]["benign"]["support"] == 0
    assert m["n_groups"] >= 10  # groups inferred for the external folder (slice runs)


def test_corrupt_and_old_run_folders(evaluated, tmp_path, capsys):
    _, run, _ = evaluated
    bad = tmp_path / "corrupt"
    shutil.copytree(run, bad)
    (bad / "model.json").write_text("{not json")
    assert main(["evaluate", str(bad), "--no-progress"]) == 1
    assert "corrupt model contract" in capsys.readouterr().err
    # an older run: no operating point in the contract -> argmax, and the report says so
    old = tmp_path / "old"
    shutil.copytree(run, old)
    contract = json.loads((old / "model.json").read_text())
    del contract["training"]["operating_point"]
    contract["thresholds"] = {"malignant": 0.5}
    (old / "model.json").write_text(json.dumps(contract))
    assert main(["evaluate", str(old), "--no-progress", "--no-baselines", "--bootstrap", "1000"]) == 0
    m = json.loads((old / "metrics.json").read_text())
    assert m["threshold"] is None and "predates" in m["operating_point"]["note"]
    assert "predates" in (old / "report.html").read_text()
    (old / "config.json").unlink()
    assert main(["evaluate", str(old), "--no-progress"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_binary_run_evaluates_with_baselines(tmp_path):
    from conftest import make_dataset

    from lungcad.evaluation.evaluate import evaluate_run
    from lungcad.training.trainer import TrainConfig, train

    data = make_dataset(tmp_path / "data", patients=10, slices=2, size=48)
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), task="binary", pretrained="none",
                            image_size=32, epochs=1, batch_size=8, val_fraction=0.25, test_fraction=0.4,
                            target_sensitivity=0.9, progress=False))
    m = evaluate_run(run, progress=False, n_boot=1000, report=False)
    contract = json.loads((run / "model.json").read_text())
    assert contract["training"]["operating_point"]["validation"]["target_sensitivity"] == 0.9
    assert m["threshold"] == contract["thresholds"]["malignant"]
    assert set(m["per_class"]) == {"not_malignant", "malignant"}
    mv = m["malignant_vs_rest"]
    assert mv["tp"] + mv["fn"] == m["per_class"]["malignant"]["support"]
    assert m["intervals"]["malignant_vs_rest.sensitivity"]["value"] == mv["sensitivity"]
    assert len(m["comparison"]) == 4 and all("false_positives" in r for r in m["comparison"])
