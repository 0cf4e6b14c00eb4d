"""torchrun + DDP on CPU (gloo, 2 processes): same result as one process, clean failure, resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.models import resnet50

from lungcad.cli import main

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # torchrun: trains and predicts in 2 processes


@pytest.fixture(scope="module")
def setup(module_tmp):
    from conftest import make_dataset

    root = module_tmp("ddp")
    data = make_dataset(root / "data", patients=6)
    torch.manual_seed(0)
    weights = root / "w.pth"
    torch.save(resnet50(weights=None).state_dict(), weights)  # stands in for ImageNet weights
    # fc fine-tuning on a "pretrained" trunk keeps BatchNorm in eval mode, so the per-rank batch
    # size cannot change BN statistics and the two runs must agree to float precision.
    args = ["--data", str(data), "--weights", str(weights), "--finetune", "fc", "--image-size", "64",
            "--batch-size", "8", "--no-augment", "--no-progress", "--seed", "1",
            "--amp", "off"]  # exact equivalence is an fp32 property (bf16 autocast rounds per shard)
    return root, args


def torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lungcad", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_ddp_two_processes_match_single_process(setup):
    root, args = setup
    single, ddp = root / "single", root / "ddp"
    assert main(["train", "--out", str(single), "--epochs", "2", *args]) == 0
    proc = torchrun(["--out", str(ddp), "--epochs", "2", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    h1, h2 = history(single), history(ddp)
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):  # stated tolerance: 1e-4 on losses and exact on accuracies
        for key in ("train_loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key
        for key in ("train_accuracy", "val_accuracy", "val_macro_f1"):
            assert a[key] == b[key], key
    w1, w2 = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert torch.allclose(w1["fc.weight"], w2["fc.weight"], atol=1e-5)
    # only rank 0 wrote: one set of files, no per-rank leftovers
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())


def test_killed_rank_fails_cleanly_and_resume_recovers_with_other_world_size(setup):
    root, args = setup
    run = root / "killed"
    proc = torchrun(["--out", str(run), "--epochs", "3", *args], env={"LUNGCAD_FAULT_KILL_RANK": "1:1"})
    assert proc.returncode != 0
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr
    assert not (run / "model.json").exists()  # no half-finished model pretending to be a result
    assert [h["epoch"] for h in history(run)] == ["1"]
    # resume in a single process (world size 1 instead of 2)
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert [h["epoch"] for h in history(run)] == ["1", "2", "3"]
    assert (run / "model.json").is_file() and not (run / "checkpoint.pt").exists()


def test_batch_not_divisible_by_ranks_is_refused(setup):
    root, args = setup
    bad = [a if a != "8" else "7" for a in args]
    proc = torchrun(["--out", str(root / "odd"), "--epochs", "1", *bad])
    assert proc.returncode != 0
    assert "must be divisible" in proc.stderr
    assert not (root / "odd").exists()


@pytest.fixture(scope="module")
def predict_run(trained_run):
    """A trained run to predict with: conftest's session-scoped one (read-only)."""
    return trained_run.run


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_sharded_prediction_covers_every_input_once(setup, predict_run):
    root, _ = setup
    data = root / "data"
    inputs = sorted(str(p) for p in data.rglob("*.png"))
    (root / "bad.png").write_bytes(b"")  # one failing input is reported, once
    single, sharded = root / "single.csv", root / "sharded.csv"
    assert main(["predict", str(predict_run), str(data), str(root / "bad.png"), "--out", str(single),
                 "--no-progress"]) == 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lungcad",
           "predict", str(predict_run), str(data), str(root / "bad.png"), "--out", str(sharded), "--no-progress",
           "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0  # the bad input fails the run after everything is reported
    assert sharded.is_file(), proc.stderr[-3000:]
    a, b = _rows(single), _rows(sharded)
    assert [r["source"] for r in b] == inputs + [str(root / "bad.png")]  # every input once, in input order
    assert [r["source"] for r in a] == [r["source"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["label"] == rb["label"] and ra["error"] == rb["error"]
        if not ra["error"]:
            assert float(ra["malignant_probability"]) == pytest.approx(float(rb["malignant_probability"]), abs=1e-5)
    assert not list(root.glob("sharded.csv.part*"))


def test_interrupted_prediction_resumes_without_redoing_inputs(setup, predict_run, monkeypatch):
    from lungcad.inference import predictor as predictor_mod

    root, _ = setup
    data = root / "data"
    out = root / "resumed.csv"
    real = predictor_mod.Predictor._items
    calls: list[str] = []

    def crash_after_20(self, data_, name):
        calls.append(str(data_))
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(self, data_, name)

    monkeypatch.setattr(predictor_mod.Predictor, "_items", crash_after_20)
    assert main(["predict", str(predict_run), str(data), "--out", str(out), "--no-progress",
                 "--batch-size", "4"]) == 130
    assert not out.exists() and list(root.glob("resumed.csv.part*.jsonl"))
    assert main(["predict", str(predict_run), str(data), "--out", str(out), "--no-progress"]) == 1  # needs --resume
    calls.clear()
    monkeypatch.setattr(predictor_mod.Predictor, "_items", lambda self, d, n: (calls.append(str(d)), real(self, d, n))[1])
    assert main(["predict", str(predict_run), str(data), "--out", str(out), "--no-progress", "--resume"]) == 0
    total = len(list(data.rglob("*.png")))
    assert len(calls) <= total - 20 + 4  # only what the crash lost (at most one batch) is redone
    rows = _rows(out)
    assert sorted(r["source"] for r in rows) == sorted(str(p) for p in data.rglob("*.png"))
