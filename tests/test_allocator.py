"""The CLI's allocator re-exec (lungcad/allocator.py)."""

from __future__ import annotations

import pytest

from lungcad import allocator


@pytest.fixture
def fake_lib(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "CANDIDATES", (str(lib),))
    for var in ("LUNGCAD_MALLOC", allocator.MARKER, "LD_PRELOAD", "MALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    return lib, calls


def test_reexec_preloads_jemalloc_once(fake_lib, monkeypatch):
    lib, calls = fake_lib
    allocator.reexec_with_fast_allocator(["train", "--data", "d"])
    (exe, args, env), = calls
    assert args[1:] == ["-m", "lungcad", "train", "--data", "d"]
    assert env["LD_PRELOAD"].startswith(str(lib)) and env[allocator.MARKER] == str(lib)
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    monkeypatch.setenv(allocator.MARKER, str(lib))  # the re-executed process does not loop
    allocator.reexec_with_fast_allocator(["train"])
    assert len(calls) == 1


def test_opt_out_and_no_library(fake_lib, monkeypatch):
    lib, calls = fake_lib
    monkeypatch.setenv("LUNGCAD_MALLOC", "system")
    allocator.reexec_with_fast_allocator(["x"])
    monkeypatch.delenv("LUNGCAD_MALLOC")
    lib.unlink()
    allocator.reexec_with_fast_allocator(["x"])
    assert calls == []


def test_only_torch_only_jobs_are_reexecuted(fake_lib):
    """OpenVINO aborts under a preloaded jemalloc: predict, export and serve keep glibc malloc."""
    _, calls = fake_lib
    for argv in (["predict", "run", "x.png", "--engine", "openvino"], ["export", "run"], ["serve", "run"], []):
        allocator.reexec_with_fast_allocator(argv)
    assert calls == []
    allocator.reexec_with_fast_allocator(["--verbose", "evaluate", "run"])
    assert len(calls) == 1
