"""Fold members trained side by side (`lungcad train --folds K --jobs N`).

The K members of a cross-validation are independent, so on a CPU they can train at the same
time, each in its own process with its share of the cores. Where one process does not scale
across threads this is faster than training the members one after another on every core: on 2
cores (Intel Xeon, AMX-BF16), a 224 px bf16 training step ran at 12.0 img/s with two threads in
one process and at 9.7 + 9.2 img/s in two one-thread processes (benchmarks/bench_train.py --jobs 2
--bf16), and the main job took 61.5 minutes instead of about 70 (README).

Each member is an ordinary `train` call in a spawned process (`multiprocessing`'s "spawn": a
fresh interpreter, no forked torch thread pools), logging with a "fold k:" prefix and without a
progress bar. When a member fails, the others are stopped: every member keeps its last epoch's
checkpoint, and `lungcad train --resume --folds K --out RUNDIR` continues them all. The members
never outlive this process: Ctrl-C or SIGTERM here stops them the same way, and a member whose
parent is gone (killed with SIGKILL) stops itself within seconds, keeping its checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lungcad.errors import LungcadError, os_error_message
from lungcad.training.config import TrainConfig
from lungcad.utils import JsonLogFormatter, raise_keyboard_interrupt, sigterm_as_ctrl_c

__all__ = ["Member", "check_jobs", "member_threads", "train_in_parallel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One fold member to train: its fold number, its config (out = the member's folder), and
    whether it continues from a checkpoint."""

    fold: int
    cfg: TrainConfig
    resume: bool = False


def check_jobs(jobs: int, device: str) -> int:
    """The number of members to train at once for --jobs: refused where it cannot work (before any
    folder is written); 1 on a GPU, where the members share the device one after another."""
    if jobs < 1:
        raise LungcadError(f"--jobs must be at least 1, not {jobs}")
    if jobs == 1:
        return 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LungcadError("--jobs trains fold members in separate processes on one machine; under torchrun "
                           "the ranks already share each member: leave --jobs at 1")
    if device != "cpu" and (device != "auto" or _cuda_available()):
        log.warning("--jobs %d shares CPU cores between fold members; training on %s, the members train one at "
                    "a time", jobs, "the GPU" if device == "auto" else device)
        return 1
    return jobs


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def member_threads(cfg: TrainConfig, concurrent: int) -> int:
    """Torch threads for a member that will run beside `concurrent` - 1 others: --threads if given,
    else an even share of the cores this process may run on."""
    from lungcad.inference.engines import default_threads

    if cfg.threads:
        return cfg.threads
    return max(1, default_threads() // max(1, concurrent))


def train_in_parallel(members: list[Member], jobs: int, known: Mapping | None = None,
                      resume_command: str = "lungcad train --resume") -> None:
    """Train `members`, at most `jobs` at a time; returns when all have finished.

    Raises LungcadError naming the first member that failed (with its own one-line error); the
    members still running are then stopped, keeping their checkpoints for `resume_command`.
    """
    with tempfile.TemporaryDirectory(prefix="lungcad-members-") as tmp:
        # the data scan goes to the members as a file: a large argument written down a spawned
        # process's start-up pipe would block this process if the member died while starting
        scan = Path(tmp) / "scan.pickle"
        with open(scan, "wb") as fh:
            pickle.dump(dict(known or {}), fh, protocol=pickle.HIGHEST_PROTOCOL)
        _run(members, jobs, scan, resume_command)


def _run(members: list[Member], jobs: int, scan: Path, resume_command: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    root = logging.getLogger()
    logging_setup = (root.getEffectiveLevel(), any(isinstance(h.formatter, JsonLogFormatter) for h in root.handlers))
    log.info("training %d fold members, %d at a time, %d torch thread(s) each", len(members), jobs,
             member_threads(members[0].cfg, jobs))
    waiting = list(members)
    running: dict[int, tuple[Member, multiprocessing.process.BaseProcess]] = {}
    failed: tuple[Member, int] | None = None
    # SIGTERM (a scheduler's or `kill`'s stop) unwinds like Ctrl-C, so that the members are stopped below
    with sigterm_as_ctrl_c():
        try:
            while running or (waiting and failed is None):
                while waiting and failed is None and len(running) < jobs:
                    # a member that will run alone (the last of an odd number) gets every core
                    threads = member_threads(waiting[0].cfg, min(jobs, len(running) + len(waiting)))
                    member = waiting.pop(0)
                    proc = ctx.Process(target=_member_main, name=f"lungcad-fold-{member.fold}",
                                       args=(member, threads, scan, logging_setup, errors))
                    # Ctrl-C reaches every process of the terminal's group. The members start with SIGINT
                    # ignored (inherited through exec, so even while they import): this process takes it
                    # and stops them with SIGTERM, which each member turns into a clean interruption.
                    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                    try:
                        proc.start()
                    finally:
                        signal.signal(signal.SIGINT, previous)
                    running[proc.sentinel] = (member, proc)
                for sentinel in multiprocessing.connection.wait(list(running)):
                    member, proc = running.pop(sentinel)
                    proc.join()
                    if proc.exitcode != 0 and failed is None:
                        failed = (member, proc.exitcode)
                        for _, other in running.values():  # stop the others; their checkpoints stay
                            other.terminate()
        finally:
            for _, proc in running.values():
                proc.terminate()
                proc.join()
    if failed is not None:
        member, code = failed
        reasons = {}
        while not errors.empty():
            fold, message = errors.get()
            reasons[fold] = message
        reason = reasons.get(member.fold, f"its process was killed by signal {-code}" if code < 0
                             else f"its process exited with status {code}")
        raise LungcadError(f"fold {member.fold} failed: {reason}; the other members were stopped (their "
                           f"checkpoints are kept: `{resume_command}` continues them)")


class _FoldPrefix(logging.Filter):
    def __init__(self, fold: int):
        super().__init__()
        self.prefix = f"fold {fold}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _member_main(member: Member, threads: int, scan: Path, logging_setup: tuple[int, bool], errors) -> None:
    """A member's process: log like the parent (with the fold as prefix), train, report a failure
    as one line on `errors` and a non-zero exit status."""
    import torch

    from lungcad.training.trainer import train
    from lungcad.utils import setup_logging

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # stopped by the parent: unwind like Ctrl-C
    threading.Thread(target=_stop_with_parent, args=(os.getppid(),), name="lungcad-parent-watch", daemon=True).start()
    level, json_lines = logging_setup
    setup_logging(level <= logging.DEBUG, "json" if json_lines else "text")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FoldPrefix(member.fold))
    torch.set_num_threads(threads)
    try:
        with open(scan, "rb") as fh:
            known = pickle.load(fh) or None
        train(replace(member.cfg, progress=False), resume=member.resume, known=known)
    except LungcadError as exc:
        errors.put((member.fold, str(exc)))
        sys.exit(1)
    except OSError as exc:
        errors.put((member.fold, os_error_message(exc)))
        sys.exit(1)
    except KeyboardInterrupt:  # stopped by the parent (SIGTERM): it reports why
        sys.exit(130)


def _stop_with_parent(parent: int, every: float = 1.0) -> None:
    """A member's watch on its parent: once the parent is gone (killed outright, so it could not
    stop the members), SIGTERM to this process, which stops training cleanly (`raise_keyboard_interrupt`)."""
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGTERM)
