"""The one-line error helper every `LungcadError` built from a library exception goes through."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from lungcad.errors import LungcadError, first_line, os_error_message
from lungcad.utils import atomic_path


@pytest.mark.parametrize("exc, expected", [
    (ValueError(""), "ValueError"),  # an empty message: the type, never an IndexError
    (OSError(), "OSError"),
    (RuntimeError("  \n\n  "), "RuntimeError"),  # whitespace only
    (RuntimeError("\n  first\nsecond\nthird"), "first"),  # leading blank lines skipped
    (KeyError("k"), "'k'"),
])
def test_first_line(exc, expected):
    assert first_line(exc) == expected


def test_first_line_limit():
    exc = RuntimeError("x" * 500 + "\nmore")
    assert first_line(exc) == "x" * 200
    assert first_line(exc, 120) == "x" * 120
    assert first_line(exc, limit=None) == "x" * 500
    assert first_line(LungcadError("bad", "f.png")) == "f.png: bad"


@pytest.mark.parametrize("free", [0, 10 << 30])
def test_a_writer_failing_on_a_full_disk_is_reported_as_an_os_error(tmp_path, monkeypatch, free):
    """torch.save fails on a full disk with a RuntimeError ("unexpected pos ..."): on a full disk it
    becomes ENOSPC naming the target file, with plenty of space it stays what it was; no file either way."""
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    target = tmp_path / "checkpoint.pt"
    with pytest.raises((OSError, RuntimeError)) as caught:
        with atomic_path(target) as tmp:
            torch.save({"w": torch.zeros(4)}, tmp)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 219499904 vs 219499796")
    if free:
        assert type(caught.value) is RuntimeError
    else:
        assert caught.value.errno == errno.ENOSPC
        assert os_error_message(caught.value) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []
