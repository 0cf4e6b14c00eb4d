"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class LungcadError(Exception):
    """A user-facing problem: bad input, a missing file, an impossible request.

    The message should name the path (when there is one) and say what is wrong in one line.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
