"""End-to-end through `main(argv)`: train one epoch on synthetic data, evaluate, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TRAIN_FAST as FAST
from conftest import copy_run

from lungcad.cli import main
from lungcad.models import load_model


def _files(run):
    return sorted(p.name for p in run.iterdir())


@pytest.mark.slow
def test_train_writes_a_self_describing_run_folder(trained_run):  # conftest: one epoch on make_dataset's default
    data, run = trained_run
    assert _files(run) == sorted([
        "config.json", "data.json", "history.csv", "init.json", "metrics.json", "model.json",
        "model.safetensors", "ood.safetensors", "skipped.csv", "split.csv",
    ])
    contract = json.loads((run / "model.json").read_text())
    assert contract["classes"] == ["normal", "benign", "malignant"] and contract["task"] == "multiclass"
    assert contract["preprocessing"]["image_size"] == 64 and contract["preprocessing"]["colour"] == "grey"
    assert contract["init"] == {"pretrained": "none"}
    assert len(contract["training"]["data_fingerprint_sha256"]) == 64 and len(contract["model_sha256"]) == 64
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["subset"] == "test" and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_class"]) == {"normal", "benign", "malignant"}
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["n"]
    with open(run / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 45
    subsets_of_group = {}
    for r in rows:
        subsets_of_group.setdefault(r["group"], set()).add(r["subset"])
        assert not r["path"].startswith("/")  # relative to the data folder
    assert all(len(s) == 1 for s in subsets_of_group.values())
    # the synthetic slices come in runs of 3 per patient (file numbers 1-3, 7-9, ...): grouping
    # must keep each run together, and must not lump everything into a few groups
    group_of = {(r["path"].split("/")[0], (int(r["path"].split("(")[1].split(")")[0]) - 1) // 6): set() for r in rows}
    for r in rows:
        group_of[(r["path"].split("/")[0], (int(r["path"].split("(")[1].split(")")[0]) - 1) // 6)].add(r["group"])
    assert len(group_of) == 15 and all(len(g) == 1 for g in group_of.values())
    assert 12 <= len(subsets_of_group) <= 15
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 1 and float(history[0]["train_loss"]) > 0


@pytest.mark.slow
def test_evaluate_reproduces_training_metrics(trained_run, capsys, tmp_path):
    data, run = trained_run
    run = copy_run(run, tmp_path / "run")  # evaluate --data writes into the run folder
    assert main(["evaluate", str(run), "--out", str(tmp_path), "--no-progress"]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1"):
        assert again[key] == pytest.approx(saved[key])
    assert "accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(data), "--no-progress"]) == 0


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path, monkeypatch):
    from conftest import make_dataset

    import lungcad.training.trainer as trainer

    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    real_finish = trainer._finish

    def crash(*a, **k):  # simulate a crash after the last epoch's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_finish", crash)
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *FAST]) == 130
    assert (run / "checkpoint.pt").is_file() and not (run / "model.json").exists()
    monkeypatch.setattr(trainer, "_finish", real_finish)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [h["epoch"] for h in history] == ["1", "2"]
    assert not (run / "checkpoint.pt").exists()
    model, contract = load_model(run)
    assert isinstance(model, torch.nn.Module) and contract.preprocessing.image_size == 64
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 1  # finished: nothing to resume


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["to-the-process", "to-the-group"])
def test_sigterm_stops_training_like_ctrl_c(tmp_path, group):
    """`kill PID` (a scheduler's stop), or SIGTERM to the whole process group with its DataLoader
    worker (systemd, docker), during a single-process `lungcad train`: the resume hint and exit 130,
    the last epoch's checkpoint kept, no traceback. Before, the process died at the signal's default
    action (exit -15) without a word."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lungcad", "train", "--data", str(data), "--out", str(run), "--pretrained", "none",
           "--image-size", "32", "--epochs", "200", "--batch-size", "8", "--workers", "1", "--no-progress",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not (run / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be stopped"
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert f"lungcad train: interrupted; resume with: lungcad train --resume --out {run}" in err
    assert (run / "checkpoint.pt").is_file() and not (run / "model.json").exists()


@pytest.mark.slow
def test_binary_task(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    run = tmp_path / "runs" / "nested" / "run"  # missing parent folders are created
    # (with both batch mixings on: the binary loss takes their two-class soft labels)
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--task", "binary",
                 "--mixup", "0.4", "--cutmix", "1", *FAST]) == 0
    contract = json.loads((run / "model.json").read_text())
    assert contract["classes"] == ["not_malignant", "malignant"]
    assert (contract["training"]["recipe"]["mixup"], contract["training"]["recipe"]["cutmix"]) == (0.4, 1.0)
    _, c = load_model(run)
    assert c.outputs == 1


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nope", "--pretrained", "none"], "nope: data path does not exist"),
    (["--data", "{data}", "--pretrained", "none", "--out", "/proc/lungcad-run"], "/proc: cannot write"),
    (["--data", "{data}", "--weights", "{tmp}/w.pth"], "w.pth: weights file not found"),
    (["--data", "{data}", "--pretrained", "imagenet"], "ImageNet weights.*--weights FILE.*--pretrained none"),
    (["--data", "{tmp}/data/Normal cases", "--pretrained", "none"], "Normal cases: no class folders found"),
    (["--data", "{data}", "--pretrained", "none", "--mixup", "-1"], "--mixup and --cutmix .* not -1"),
])
def test_bad_inputs_give_one_line_errors_and_no_run_folder(tmp_path, capsys, monkeypatch, args, message):
    import re
    import urllib.error

    from conftest import make_dataset

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ImageNet weights

    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    data = make_dataset(tmp_path / "data")
    argv = ["train", *(a.format(tmp=tmp_path, data=data) for a in args), "--epochs", "1", "--image-size", "64",
            "--no-progress"]
    out = tmp_path / "run"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()
    assert not list((tmp_path / "torch").rglob("*.pth"))  # no partial download left behind


@pytest.mark.parametrize("config, folds, message", [
    (None, [], "cannot resume: run folder not found"),
    ("{not json", [], "cannot resume: .*config.json: unreadable config.json"),
    ({"out": "x"}, [], "cannot resume: .*config.json: unreadable config.json .*'data'"),
    ({"data": "d", "out": "x"}, [], "cannot resume: no checkpoint.pt"),
    ({"data": "d", "out": "x"}, ["--folds", "2"], "cannot resume cross-validation: config.json has no 'folds'"),
    ({"data": "d", "out": "x", "folds": "two"}, ["--folds", "2"], "cannot resume cross-validation: .*'folds' is not"),
])
def test_resume_errors_are_one_line(tmp_path, capsys, config, folds, message):
    """--resume reads the run folder through RunFolder: a missing, corrupt or incomplete one is a one-line error."""
    import re

    run = tmp_path / "run"
    if config is not None:
        run.mkdir()
        (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert main(["train", "--resume", "--out", str(run), *folds, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_existing_out_is_refused(tmp_path, capsys):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "exists"), *FAST]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_listed(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    (data / "Normal cases" / "Normal case (99).png").write_bytes(b"")
    (data / "Normal cases" / "Normal case (98).jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *FAST]) == 0
    skipped = list(csv.DictReader(open(run / "skipped.csv")))
    assert sorted(r["path"].rsplit("/", 1)[1] for r in skipped) == ["Normal case (98).jpg", "Normal case (99).png"]
    assert len(list(csv.DictReader(open(run / "split.csv")))) == 45


def test_audit_command(tmp_path, capsys):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    assert main(["audit", str(data), "--json", str(tmp_path / "a.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report  # structure is tested in test_audit.py
    assert "malignant" in capsys.readouterr().out


@pytest.mark.slow
def test_extra_data_goes_to_training_only_and_is_recorded(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import make_dataset, synthetic_slice

    data = make_dataset(tmp_path / "data")
    extra = tmp_path / "feedback"
    (extra / "malignant").mkdir(parents=True)
    rng = np.random.default_rng(5)
    lines = ["path,label,group,feedback_id"]
    for i in range(3):
        Image.fromarray(synthetic_slice(rng, "malignant", 999 + i, 0)).save(extra / "malignant" / f"f{i}.png")
        lines.append(f"malignant/f{i}.png,malignant,study{i},fb-{i}")
    (extra / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--extra-data", str(extra),
                 *FAST]) == 0
    rows = list(csv.DictReader(open(run / "split.csv")))
    extra_rows = [r for r in rows if r["group"].startswith("extra:")]
    assert len(rows) == 48 and len(extra_rows) == 3
    assert {r["subset"] for r in extra_rows} == {"train"}
    summary = json.loads((run / "data.json").read_text())
    assert summary["extra_data"]["feedback_ids"] == ["fb-0", "fb-1", "fb-2"]
    assert summary["extra_data"]["images"] == 3


@pytest.mark.smoke
@pytest.mark.slow
def test_smoke_train_and_evaluate_on_a_slice_of_iqothnccd(tmp_path):
    """The real CLI on real CT slices: every 12th image of each class (some non-square, all JPEG)."""
    from conftest import IQOTH

    from lungcad.data.discovery import discover

    if not IQOTH.is_dir():
        pytest.skip(f"shared data not found at {IQOTH} (set LUNGCAD_SHARED_DATA)")
    samples = discover(IQOTH)
    picked = [s for label in ("normal", "benign", "malignant") for s in [x for x in samples if x.label == label][::12]]
    manifest = tmp_path / "slice.csv"
    manifest.write_text("path,label\n" + "".join(f"{s.path},{s.label}\n" for s in picked))
    run = tmp_path / "run"
    assert main(["train", "--data", str(manifest), "--out", str(run), "--epochs", "1", *FAST]) == 0
    rows = list(csv.DictReader(open(run / "split.csv")))
    assert len(rows) == len(picked) and {r["subset"] for r in rows} == {"train", "val", "test"}
    contract = json.loads((run / "model.json").read_text())
    assert contract["preprocessing"]["colour"] == "grey" and 0 < contract["thresholds"]["malignant"] <= 1
    assert main(["evaluate", str(run), "--no-progress", "--no-baselines", "--bootstrap", "1000"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == sum(r["subset"] == "test" for r in rows)
