"""Template helpers for pages that show stored records (model contract, metrics, audit details):
nested dicts as rows of a table instead of raw JSON, and no server filesystem paths on any page."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MAX_ROWS", "flatten", "nopath", "show"]

MAX_ROWS = 400
# An absolute POSIX path (/a/b, ~/a/b) or a Windows one (C:\a\b) not inside a URL or a fraction:
# the character before it is not a word character, ':' or '/'.
_PATH = re.compile(r"(?<![\w.:/~])(?:~?/(?:[^\s/'\",;()\[\]{}<>]+/)+[^\s/'\",;()\[\]{}<>]*|[A-Za-z]:\\(?:[^\s\\'\",;]+\\)*[^\s\\'\",;]*)")


def nopath(text: Any) -> str:
    """`text` with every absolute filesystem path replaced by '…/' and its last component."""
    def last(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", m.group(0)) if p]
        return "…/" + (parts[-1] if parts else "")

    return _PATH.sub(last, "" if text is None else str(text))


def show(value: Any) -> str:
    """One value as table text: numbers to 4 significant digits, lists comma-separated, paths hidden."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return ", ".join(show(v) for v in value) if value else "–"
        return f"{len(value)} items"
    return nopath(value)


def flatten(data: Any, prefix: str = "", max_rows: int = MAX_ROWS) -> list[tuple[str, str]]:
    """(dotted key, display text) rows of a nested dict; lists of dicts get their index in the key."""
    rows: list[tuple[str, str]] = []

    def walk(value: Any, key: str) -> None:
        if len(rows) >= max_rows:
            return
        if isinstance(value, dict):
            if not value and key:
                rows.append((key, "–"))
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            rows.append((key, show(value)))

    walk(data if data is not None else {}, prefix)
    if len(rows) >= max_rows:
        rows.append(("…", f"more rows left out (first {max_rows} shown)"))
    return rows
