"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

__all__ = ["LungcadError", "first_line", "os_error_message"]


class LungcadError(Exception):
    """A user-facing problem: bad input, a missing file, an impossible request.

    The message should name the path (when there is one) and say what is wrong in one line.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message, at most `limit` characters, for a one-line error.

    Library errors (pydicom, ONNX, SQLAlchemy) carry pages of detail; an empty message gives the
    exception's type name instead.
    """
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]


def os_error_message(exc: OSError) -> str:
    """An OSError in one line: the file it concerns, if any, and the system's reason."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
