"""The one-line error helper every `LungcadError` built from a library exception goes through."""

from __future__ import annotations

import pytest

from lungcad.errors import LungcadError, first_line


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
