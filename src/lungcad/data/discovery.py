"""Finding labelled images: class folders (ImageFolder convention) or a CSV manifest.

Folder names are mapped to the canonical labels `normal`, `benign`, `malignant` through known
aliases (IQ-OTH/NCCD, LC25000) and user-supplied `--label-map` entries.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lungcad.data.images import IMAGE_SUFFIXES
from lungcad.errors import LungcadError

__all__ = ["ALIASES", "CLASSES", "Sample", "canonical_label", "class_counts", "discover", "parse_label_map"]

CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")

# Known folder names, compared after lower-casing and squeezing non-letters to single spaces.
ALIASES: dict[str, str] = {
    "normal": "normal",
    "normal cases": "normal",
    "normal case": "normal",
    "benign": "benign",
    "benign cases": "benign",
    "bengin cases": "benign",  # IQ-OTH/NCCD's spelling
    "bengin case": "benign",
    "malignant": "malignant",
    "malignant cases": "malignant",
    "malignant case": "malignant",
    "cancer": "malignant",
    # LC25000 lung subset: benign tissue, adenocarcinoma, squamous cell carcinoma
    "lung n": "benign",
    "lung aca": "malignant",
    "lung scc": "malignant",
}


@dataclass(frozen=True)
class Sample:
    """One labelled image. `group` is a patient (proxy) id when the source provides one."""

    path: Path
    label: str
    group: str | None = None


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]+", " ", name.lower()).strip()


def parse_label_map(items: list[str] | None) -> dict[str, str]:
    """Parse `--label-map` entries `FOLDER=LABEL` (several allowed) into a lookup table."""
    mapping: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise LungcadError(f"--label-map entry {part!r} is not of the form FOLDER=LABEL")
            src, dst = (s.strip() for s in part.split("=", 1))
            if dst not in CLASSES:
                raise LungcadError(f"--label-map target {dst!r} is not one of {', '.join(CLASSES)}")
            mapping[_norm(src)] = dst
    return mapping


def canonical_label(name: str, label_map: dict[str, str] | None = None) -> str | None:
    key = _norm(name)
    if label_map and key in label_map:
        return label_map[key]
    return ALIASES.get(key)


def discover(data: str | Path, label_map: dict[str, str] | None = None) -> list[Sample]:
    """List labelled images under `data`: a folder of class folders, or a CSV manifest file.

    Order is deterministic (sorted paths). Raises LungcadError for a missing or empty source,
    or for class folders whose names map to no known label.
    """
    data = Path(data)
    if not data.exists():
        raise LungcadError("data path does not exist", data)
    if data.is_file():
        samples = _from_manifest(data, label_map)
    else:
        samples = _from_folders(data, label_map)
    if not samples:
        raise LungcadError("no images found (expected class folders or a CSV manifest)", data)
    return samples


def _from_folders(root: Path, label_map: dict[str, str] | None) -> list[Sample]:
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise LungcadError(f"cannot list folder ({exc.strerror})", root) from None
    if not class_dirs:
        raise LungcadError("no class folders found (expected e.g. normal/, benign/, malignant/)", root)
    unknown = [d.name for d in class_dirs if canonical_label(d.name, label_map) is None]
    if unknown:
        raise LungcadError(
            f"unknown class folder(s) {', '.join(repr(u) for u in unknown)}; "
            f"map them with --label-map 'FOLDER=LABEL' (labels: {', '.join(CLASSES)})",
            root,
        )
    samples = []
    for d in class_dirs:
        label = canonical_label(d.name, label_map)
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                samples.append(Sample(p, label))
    return samples


def _from_manifest(path: Path, label_map: dict[str, str] | None) -> list[Sample]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LungcadError(f"cannot read CSV manifest ({exc})", path) from None
    if not rows:
        raise LungcadError("manifest has no rows", path)
    missing = {"path", "label"} - set(rows[0])
    if missing:
        raise LungcadError(f"manifest lacks column(s) {', '.join(sorted(missing))} (need path,label[,group])", path)
    samples = []
    for i, row in enumerate(rows, start=2):
        label = canonical_label(row["label"] or "", label_map)
        if label is None:
            raise LungcadError(f"line {i}: unknown label {row['label']!r}; use --label-map", path)
        p = Path(row["path"])
        if not p.is_absolute():
            p = path.parent / p
        group = (row.get("group") or "").strip() or None
        samples.append(Sample(p, label, group))
    return sorted(samples, key=lambda s: str(s.path))


def class_counts(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(c, 0) for c in CLASSES if counts.get(c, 0)}
