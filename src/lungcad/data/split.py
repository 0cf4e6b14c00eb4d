"""Leakage-free train/val/test split: no group (patient proxy) is in two subsets."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lungcad.data.discovery import CLASSES, Sample
from lungcad.errors import LungcadError
from lungcad.utils import atomic_write_text

__all__ = [
    "SUBSETS", "SplitRow", "check_no_leak", "portable_path", "read_split", "split_summary",
    "stratified_group_split", "write_split",
]

SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitRow:
    path: Path
    label: str
    group: str
    subset: str


def _carve(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about `fraction` of the samples, whole groups only, stratified by label."""
    # One fold is held out, so n_splits ~ 1/fraction; but a fold can only hold every class if each
    # class has at least n_splits groups, so small datasets get a larger held-out share.
    min_groups = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    n_splits = max(2, min(round(1.0 / fraction), min_groups))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def stratified_group_split(
    samples: list[Sample], groups: list[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> list[SplitRow]:
    """Split whole groups into train/val/test with label proportions kept as far as groups allow.

    Every class needs at least 3 groups (one per subset), otherwise its test or validation
    figures would be meaningless: that is an error, not a warning.
    """
    if len(samples) != len(groups):
        raise ValueError("samples and groups differ in length")
    labels = np.array([s.label for s in samples])
    group_arr = np.array(groups)
    for label in sorted(set(labels)):
        n_groups = len(set(group_arr[labels == label]))
        if n_groups < 3:
            raise LungcadError(
                f"class {label!r} has only {int((labels == label).sum())} image(s) in {n_groups} group(s); "
                "need at least 3 groups (patients) to split into train/val/test"
            )
    _, val_frac, test_frac = fractions
    # StratifiedGroupKFold balances label proportions greedily; with few groups per class a fold
    # can still miss a class. Retry with derived seeds (deterministic for a given seed).
    for attempt in range(50):
        rows = _split_once(samples, labels, group_arr, val_frac, test_frac, seed + 7919 * attempt)
        if all(set(labels) <= {r.label for r in rows if r.subset == name} for name in SUBSETS):
            break
    else:
        raise LungcadError(
            "could not put every class in train, val and test with whole groups; "
            "too few groups per class to split (add data or change the fractions)"
        )
    check_no_leak(rows)
    return rows


def _split_once(
    samples: list[Sample], labels: np.ndarray, group_arr: np.ndarray, val_frac: float, test_frac: float, seed: int
) -> list[SplitRow]:
    test = _carve(labels, group_arr, test_frac, seed)
    rest = ~test
    val_rest = _carve(labels[rest], group_arr[rest], val_frac / (1.0 - test_frac), seed + 1)
    subset = np.full(len(samples), "train", dtype=object)
    subset[test] = "test"
    subset[np.flatnonzero(rest)[val_rest]] = "val"
    return [SplitRow(s.path, s.label, g, str(sub)) for s, g, sub in zip(samples, group_arr, subset)]


def check_no_leak(rows: list[SplitRow]) -> None:
    subsets_of: dict[str, set[str]] = {}
    for r in rows:
        subsets_of.setdefault(r.group, set()).add(r.subset)
    leaked = [g for g, subs in subsets_of.items() if len(subs) > 1]
    if leaked:
        raise LungcadError(f"split leaks {len(leaked)} group(s) across subsets, e.g. {leaked[0]!r}")


def split_summary(rows: list[SplitRow]) -> dict:
    out = {}
    for name in SUBSETS:
        sub = [r for r in rows if r.subset == name]
        counts = Counter(r.label for r in sub)
        out[name] = {
            "images": len(sub),
            "groups": len({r.group for r in sub}),
            "per_class": {c: counts[c] for c in CLASSES if counts.get(c)},
        }
    return out


def write_split(path: Path, rows: list[SplitRow], root: Path) -> None:
    """Write split.csv with paths relative to the data root where possible (portable runs)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "group", "subset"])
    for r in rows:
        w.writerow([portable_path(r.path, root), r.label, r.group, r.subset])
    atomic_write_text(path, buf.getvalue())


def portable_path(path: Path, root: Path) -> str:
    """`path` relative to the data root where possible (run folders survive a moved data folder)."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def read_split(path: Path, root: Path | None = None) -> list[SplitRow]:
    """Read a split.csv; relative paths are resolved against `root` (the data folder)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            raw = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LungcadError(f"cannot read split file ({exc})", path) from None
    if not raw or not {"path", "label", "group", "subset"} <= set(raw[0]):
        raise LungcadError("split file needs columns path,label,group,subset", path)
    rows = []
    for i, r in enumerate(raw, start=2):
        if r["subset"] not in SUBSETS or r["label"] not in CLASSES:
            raise LungcadError(f"line {i}: bad subset {r['subset']!r} or label {r['label']!r}", path)
        p = Path(r["path"])
        if not p.is_absolute() and root is not None:
            p = (root.parent if root.is_file() else root) / p
        rows.append(SplitRow(p, r["label"], r["group"], r["subset"]))
    check_no_leak(rows)
    return rows
