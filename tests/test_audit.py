"""Audit: report content, shortcut detection, robustness on tiny or broken data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungcad.data.audit import format_audit, run_audit
from lungcad.data.discovery import Sample, discover
from lungcad.data.grouping import assign_groups, scan_images


def _noise(path: Path, seed: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def _audit(samples):
    infos, bad = scan_images(samples)
    groups = assign_groups(samples, infos)
    report = run_audit(samples, infos, bad, groups)
    json.dumps(report)  # must be JSON-serialisable as is
    return report


def _make_set(tmp_path: Path, size_encodes_label: bool, per_class: int = 30) -> list[Sample]:
    samples = []
    for c, label in enumerate(("normal", "malignant")):
        for k in range(per_class):
            size = (40 + 8 * c, 32) if size_encodes_label else (32, 32)
            samples.append(Sample(_noise(tmp_path / f"{label}_{k}.png", 1000 * c + k, size), label))
    return samples


@pytest.mark.slow
def test_shortcut_flagged_when_size_encodes_label(tmp_path):
    report = _audit(_make_set(tmp_path, size_encodes_label=True))
    sc = report["shortcut"]
    assert sc["status"] == "ok" and sc["chance"] == 0.5
    assert sc["results"]["size"]["balanced_accuracy"] >= 0.95
    assert {(r["size"], r["label"], r["count"]) for r in report["size_rule"]} == {
        ("40x32", "normal", 30),
        ("48x32", "malignant", 30),
    }
    assert any("shortcut" in w and "size" in w for w in report["warnings"])
    assert any("48x32" in w and "malignant" in w for w in report["warnings"])


def test_shortcut_not_flagged_when_size_is_uninformative(tmp_path):
    report = _audit(_make_set(tmp_path, size_encodes_label=False))
    sc = report["shortcut"]
    assert sc["status"] == "ok"
    assert sc["results"]["size"]["balanced_accuracy"] < 0.6
    assert report["size_rule"] == []
    assert not any("shortcut" in w or "frame size" in w for w in report["warnings"])
    assert report["groups"]["n_groups"] == 60  # unrelated noise images are never grouped


def test_report_lists_duplicates_unreadable_and_properties(tmp_path):
    samples = _make_set(tmp_path, size_encodes_label=False, per_class=12)
    # an exact copy filed under the other class, and two broken files
    copy = tmp_path / "copy.png"
    copy.write_bytes(samples[0].path.read_bytes())
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    samples += [Sample(copy, "malignant"), Sample(tmp_path / "zero.png", "normal"), Sample(tmp_path / "bad.png", "normal")]
    report = _audit(samples)
    assert report["class_counts"] == {"malignant": 13, "normal": 14}
    assert {u["path"] for u in report["unreadable"]} == {str(tmp_path / "zero.png"), str(tmp_path / "bad.png")}
    assert report["exact_duplicates"]["n_sets"] == 1
    (cross,) = report["cross_class_duplicates"]["exact"]
    assert {m["label"] for m in cross} == {"normal", "malignant"}
    assert report["properties"]["normal"]["size"] == {"32x32": 12}
    assert report["properties"]["malignant"]["format"] == {"PNG": 13}
    assert report["groups"]["n_mixed"] == 1
    warnings = " | ".join(report["warnings"])
    assert "unreadable" in warnings and "exact duplicate" in warnings and "only 13 images" in warnings
    text = format_audit(report)
    assert "zero.png" in text and "Exact duplicates: 1 set" in text and "Warnings (" in text


@pytest.mark.parametrize("labels", [["normal"], ["normal", "normal"], ["normal", "malignant"]])
def test_too_little_data_does_not_crash(tmp_path, labels):
    samples = [Sample(_noise(tmp_path / f"{k}.png", k, (16, 16)), lab) for k, lab in enumerate(labels)]
    report = _audit(samples)
    assert report["shortcut"]["status"] == "not enough data"
    assert "not enough data" in format_audit(report)


def _shared_data() -> Path:
    env = os.environ.get("LUNGCAD_SHARED_DATA")
    return Path(env) if env else Path(__file__).parents[2] / "shared" / "data"


@pytest.mark.smoke
@pytest.mark.slow
def test_smoke_iqothnccd_size_shortcut_flagged():
    root = _shared_data() / "iqothnccd"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    report = _audit(discover(root))
    rules = {r["size"]: (r["label"], r["count"]) for r in report["size_rule"]}
    assert rules.get("623x512", ("", 0))[0] == "malignant"
    assert rules.get("801x512", ("", 0))[0] == "malignant"
    assert "512x512" not in rules
    assert any("623x512" in w and "malignant" in w for w in report["warnings"])
    assert 80 <= report["groups"]["n_groups"] <= 200  # patient proxies: neither giant nor singletons
