"""`lungcad train --folds K --jobs N`: fold members trained side by side in their own processes.

The members must be the same models the one-at-a-time loop trains (same seed, same folds, same
thread count: identical weights), a member that fails must stop the others and name itself in a
one-line error, and --jobs is refused where it cannot work.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_dataset

from lungcad.cli import main
from lungcad.data.discovery import discover
from lungcad.data.split import SplitRow, write_split
from lungcad.errors import LungcadError
from lungcad.run import RunFolder
from lungcad.training.config import TrainConfig
from lungcad.training.parallel import Member, check_jobs, member_threads, train_in_parallel


@pytest.mark.slow
def test_members_trained_side_by_side_equal_members_trained_one_at_a_time(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    argv = ["train", "--data", str(data), "--pretrained", "none", "--image-size", "32", "--epochs", "2",
            "--folds", "2", "--batch-size", "8", "--no-progress", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = RunFolder(tmp_path / "one").contract(), RunFolder(tmp_path / "two").contract()
    assert [m["model_sha256"] for m in two.ensemble["members"]] == [m["model_sha256"] for m in one.ensemble["members"]]
    assert two.thresholds == one.thresholds
    assert "training 2 fold members, 2 at a time, 1 torch thread(s) each" in caplog.text
    assert not multiprocessing.active_children()


@pytest.mark.slow  # spawns two member processes (6-9 s)
def test_a_failing_member_stops_the_others_and_names_itself(tmp_path):
    data = make_dataset(tmp_path / "data", patients=2, slices=2, size=40)
    samples = discover(data)
    split = tmp_path / "split.csv"  # every image trains, as in a fold member with one test patient per class
    write_split(split, [SplitRow(s.path, s.label, f"{s.label}{i % 2}", "test" if i % 2 else "train")
                        for i, s in enumerate(samples)], data)
    common = dict(pretrained="none", image_size=32, batch_size=4, val_fraction=0.0, progress=False, workers=0)
    long = TrainConfig(data=str(data), out=str(tmp_path / "long"), split=str(split), epochs=100_000, **common)
    bad = TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "bad"), epochs=1, **common)
    with pytest.raises(LungcadError) as err:
        train_in_parallel([Member(1, long), Member(2, bad)], jobs=2, resume_command="RESUME")
    message = str(err.value)
    assert message.startswith("fold 2 failed: ") and str(tmp_path / "missing") in message and "RESUME" in message
    assert "\n" not in message
    assert not multiprocessing.active_children()  # the long member was stopped, not left running
    assert not (tmp_path / "long" / "model.json").exists()


def test_threads_are_shared_between_members_unless_given():
    cfg = TrainConfig(data="d", out="o")
    cores = member_threads(cfg, 1)  # a member running alone gets every core
    assert cores == len(os.sched_getaffinity(0))
    assert member_threads(cfg, 2) == max(1, cores // 2)
    assert member_threads(cfg, 10 * cores) == 1
    cfg.threads = 3
    assert member_threads(cfg, 2) == 3


@pytest.mark.parametrize("extra, expected", [
    (["--jobs", "2"], "--jobs trains the members of a cross-validation side by side: it needs --folds K"),
    (["--jobs", "0", "--folds", "2"], "--jobs must be at least 1, not 0"),
])
def test_jobs_refused_where_it_cannot_work(tmp_path, capsys, extra, expected):
    data = make_dataset(tmp_path / "data", patients=2, slices=1, size=40)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--pretrained", "none", *extra]) == 1
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_jobs_fall_back_to_one_at_a_time_on_a_gpu(caplog):
    assert check_jobs(2, "cpu") == 2
    assert check_jobs(2, "cuda:0") == 1
    assert "the members train one at a time" in caplog.text


@pytest.mark.slow
def test_ctrl_c_stops_the_members_cleanly_and_resume_continues_them(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once both members have a
    checkpoint: one line and exit 130, no traceback from any member, and --resume finishes both."""
    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "lungcad", "train", "--data", str(data), "--out", str(out), "--pretrained", "none",
           "--image-size", "32", "--epochs", "60", "--folds", "2", "--jobs", "2", "--batch-size", "8",
           "--no-progress", "--threads", "1"]
    # SIGINT at its default even where this test runs with it ignored (a background job of a
    # non-interactive shell, as CI may start it): a terminal's Ctrl-C is what is tested
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = [out / f"fold-{k}" / "checkpoint.pt" for k in (1, 2)]
    while not all(c.exists() for c in checkpoints) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "leaked" not in err
    assert f"interrupted; resume with: lungcad train --resume --folds 2 --out {out}" in err
    assert all(c.exists() for c in checkpoints) and not (out / "model.json").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fold 1: resuming after epoch" in resumed.stderr and "fold 2: resuming after epoch" in resumed.stderr
    assert [m["path"] for m in RunFolder(out).contract().ensemble["members"]] == ["fold-1", "fold-2"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(c) for c in fh.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux's /proc/PID/task/PID/children to find the members")
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGKILL", "SIGTERM-to-the-group"])
def test_the_members_never_outlive_the_parent(tmp_path, sig, group):
    """SIGTERM to the parent alone (a scheduler's stop, `kill PID`) stops the members as Ctrl-C does;
    after SIGKILL, which the parent cannot handle, each member notices and stops itself, keeping its
    checkpoint. Before, both left two orphaned members training on every core. SIGTERM to the whole
    group (systemd, docker: every process of the service) also reaches the members' DataLoader
    workers; the members still stop cleanly, where a worker killed by the signal made its member die
    with a traceback."""
    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "lungcad", "train", "--data", str(data), "--out", str(out), "--pretrained", "none",
           "--image-size", "32", "--epochs", "200", "--folds", "2", "--jobs", "2", "--batch-size", "8",
           "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = [out / f"fold-{k}" / "checkpoint.pt" for k in (1, 2)]
    while not all(c.exists() for c in checkpoints) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be stopped"
    members = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
    assert len(members) == 2
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(_alive(m) for m in members) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(m) for m in members), "a member outlived its parent"
    finally:
        for m in members:  # (an orphan would hold the pipes open, and train on)
            if _alive(m):
                os.kill(m, signal.SIGKILL)
    err = proc.stderr.read()
    assert all(c.exists() for c in checkpoints) and not (out / "model.json").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "Traceback" not in err and "killed by signal" not in err, err[-3000:]
        assert f"interrupted; resume with: lungcad train --resume --folds 2 --out {out}" in err
    else:
        assert proc.returncode == -signal.SIGKILL
