"""Dataset audit: what could make a classifier look better than it is, before any training.

`run_audit` builds a JSON-serialisable report (class counts, unreadable files, duplicates within
and across classes, image size/mode/format per class, inferred groups, and a metadata "shortcut"
check); `format_audit` renders it for a terminal. The CLI (`lungcad audit`) wires them up.
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.discovery import Sample
from lungcad.data.grouping import ImageInfo, connected_components, exact_duplicate_sets, near_duplicate_pairs

__all__ = ["FEATURE_SETS", "format_audit", "run_audit"]

log = logging.getLogger(__name__)

# A class this small cannot be evaluated meaningfully (a handful of test images per fold).
TINY_CLASS = 20
# Warn when metadata-only balanced accuracy beats chance by this much. With a few hundred
# images per class, fold-to-fold noise of a shallow tree on uninformative features is a few
# points; 0.10 is well clear of that.
SHORTCUT_MARGIN = 0.10
# Metadata feature sets for the shortcut check: each says what alone could give the label away.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "all": ("width", "height", "aspect", "mode", "format", "file_size"),
    "size": ("width", "height", "aspect"),
    "file_size": ("file_size",),
    "mode_format": ("mode", "format"),
}


def run_audit(
    samples: Sequence[Sample],
    infos: Sequence[ImageInfo],
    unreadable: Sequence[tuple[Path, str]],
    groups: Sequence[str],
    near_pairs: Sequence[tuple[int, int, float]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit a labelled image set; returns a JSON-serialisable report with a `warnings` list.

    `near_pairs` can be passed if already computed (it is otherwise recomputed from `infos`).
    """
    if len(groups) != len(samples):
        raise ValueError(f"{len(groups)} group ids for {len(samples)} samples")
    labels = [s.label for s in samples]
    classes = sorted(set(labels))
    warn: list[str] = []
    path = lambda i: str(samples[i].path)  # noqa: E731

    counts = Counter(labels)
    report: dict[str, Any] = {
        "n_samples": len(samples),
        "n_readable": len(infos),
        "class_counts": {c: counts[c] for c in classes},
    }
    for c in classes:
        if counts[c] < TINY_CLASS:
            warn.append(f"class {c!r} has only {counts[c]} images: too few to train or evaluate on")
    if len(classes) < 2:
        warn.append(f"only one class present ({', '.join(classes) or 'none'}): nothing to classify")

    report["unreadable"] = [{"path": str(p), "reason": r} for p, r in unreadable]
    if unreadable:
        warn.append(f"{len(unreadable)} unreadable file(s), e.g. {unreadable[0][0]}: {unreadable[0][1]}")

    # Duplicates. Exact copies first, then near copies as connected components.
    exact = exact_duplicate_sets(infos)
    if near_pairs is None:
        near_pairs = near_duplicate_pairs(infos)
    components = connected_components([(i, j) for i, j, _ in near_pairs] + [(s[0], j) for s in exact for j in s[1:]])
    cross_exact = [s for s in exact if len({labels[i] for i in s}) > 1]
    cross_near = [(i, j, v) for i, j, v in near_pairs if labels[i] != labels[j]]
    report["exact_duplicates"] = {
        "n_sets": len(exact),
        "n_images": sum(len(s) for s in exact),
        "sets": [[path(i) for i in s] for s in exact],
    }
    report["near_duplicates"] = {
        "n_pairs": len(near_pairs),
        "n_groups": len(components),
        "largest_group": max((len(c) for c in components), default=0),
    }
    report["cross_class_duplicates"] = {
        "exact": [[{"path": path(i), "label": labels[i]} for i in s] for s in cross_exact],
        "near": [
            {"a": path(i), "label_a": labels[i], "b": path(j), "label_b": labels[j], "similarity": v}
            for i, j, v in cross_near
        ],
    }
    if cross_exact:
        warn.append(f"{len(cross_exact)} exact duplicate set(s) carry different labels (label noise or leakage)")
    if cross_near:
        i, j, _ = cross_near[0]
        warn.append(
            f"{len(cross_near)} near-duplicate pair(s) cross classes, e.g. {path(i)} ({labels[i]}) ~ "
            f"{path(j)} ({labels[j]})"
        )

    # Image properties per class.
    props: dict[str, dict[str, Counter]] = {c: defaultdict(Counter) for c in classes}
    for info in infos:
        p = props[labels[info.index]]
        p["size"][f"{info.width}x{info.height}"] += 1
        p["mode"][info.mode] += 1
        p["format"][info.format] += 1
    report["properties"] = {
        c: {k: dict(props[c][k].most_common()) for k in ("size", "mode", "format")} for c in classes
    }

    report["groups"] = _group_stats(labels, groups, classes)
    if report["groups"]["n_mixed"]:
        warn.append(f"{report['groups']['n_mixed']} group(s) hold images of more than one class")

    report["shortcut"] = _shortcut(samples, infos, groups, classes, seed)
    report["size_rule"] = _size_rule(infos, labels, classes)
    sc = report["shortcut"]
    if sc.get("status") == "ok":
        for name, res in sc["results"].items():
            if res["balanced_accuracy"] >= sc["chance"] + SHORTCUT_MARGIN:
                warn.append(
                    f"metadata shortcut: {name} features alone predict the label with balanced "
                    f"accuracy {res['balanced_accuracy']:.2f} (chance {sc['chance']:.2f}, grouped CV)"
                    # JPEG file size also tracks image content, so it is a lead to check, not proof
                    + (" - file size partly reflects content; check for export differences" if name == "file_size" else "")
                )
    for rule in report["size_rule"][:5]:  # a few examples; the full list is in the report
        warn.append(
            f"image size {rule['size']} occurs only in class {rule['label']!r} ({rule['count']} images): "
            "the frame size alone gives the label away"
        )
    if len(report["size_rule"]) > 5:
        warn.append(f"... and {len(report['size_rule']) - 5} more image size(s) seen in one class only")
    report["warnings"] = warn
    return report


def _size_hist(sizes: Sequence[int]) -> dict[str, int]:
    # Buckets that stay readable for 1-image groups and 100-slice scans alike.
    edges = [(1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 10**9)]
    out = {}
    for lo, hi in edges:
        name = str(lo) if lo == hi else (f"{lo}+" if hi == 10**9 else f"{lo}-{hi}")
        out[name] = sum(lo <= s <= hi for s in sizes)
    return out


def _group_stats(labels: Sequence[str], groups: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    members: dict[str, list[str]] = defaultdict(list)
    for g, lab in zip(groups, labels):
        members[g].append(lab)
    sizes = [len(m) for m in members.values()]
    per_class = {}
    for c in classes:
        # size of each group counted in images of this class, over groups that contain the class
        cs = [m.count(c) for m in members.values() if c in m]
        per_class[c] = {"n_groups": len(cs), "largest": max(cs, default=0), "sizes": _size_hist(cs)}
    return {
        "n_groups": len(members),
        "largest": max(sizes, default=0),
        "median_size": float(np.median(sizes)) if sizes else 0.0,
        "sizes": _size_hist(sizes),
        "n_mixed": sum(len(set(m)) > 1 for m in members.values()),
        "per_class": per_class,
    }


def _features(infos: Sequence[ImageInfo], names: Sequence[str]) -> np.ndarray:
    # Categorical mode/format become integer codes: a tree only needs them to be separable.
    modes = {m: k for k, m in enumerate(sorted({i.mode for i in infos}))}
    formats = {f: k for k, f in enumerate(sorted({i.format for i in infos}))}
    cols = {
        "width": [i.width for i in infos],
        "height": [i.height for i in infos],
        "aspect": [i.width / max(i.height, 1) for i in infos],
        "mode": [modes[i.mode] for i in infos],
        "format": [formats[i.format] for i in infos],
        "file_size": [i.file_size for i in infos],
    }
    return np.array([cols[n] for n in names], dtype=np.float64).T


def _shortcut(
    samples: Sequence[Sample], infos: Sequence[ImageInfo], groups: Sequence[str], classes: Sequence[str], seed: int
) -> dict[str, Any]:
    """How well metadata alone predicts the label, cross-validated over groups."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    y = np.array([samples[i.index].label for i in infos])
    g = np.array([groups[i.index] for i in infos])
    present = sorted(set(y))
    # Each fold needs every class in its test part, so the fold count is limited by the class
    # with the fewest groups; below 2 folds there is no honest estimate.
    groups_per_class = [len(set(g[y == c])) for c in present]
    n_splits = min(5, min(groups_per_class, default=0))
    if len(present) < 2 or n_splits < 2:
        return {
            "status": "not enough data",
            "detail": f"{len(present)} class(es), fewest groups in a class: {min(groups_per_class, default=0)}",
        }
    chance = 1.0 / len(present)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    results = {}
    for name, cols in FEATURE_SETS.items():
        X = _features(infos, cols)
        # A shallow, class-balanced tree: enough to find "this frame size means malignant",
        # too small to memorise individual files.
        model = DecisionTreeClassifier(max_depth=3, min_samples_leaf=3, class_weight="balanced", random_state=seed)
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")  # sklearn warns about uneven folds on tiny sets
            scores = cross_val_score(model, X, y, groups=g, cv=cv, scoring="balanced_accuracy")
        results[name] = {
            "features": list(cols),
            "balanced_accuracy": round(float(np.mean(scores)), 4),
            "std": round(float(np.std(scores)), 4),
        }
    return {"status": "ok", "model": "decision tree (depth 3)", "cv": f"StratifiedGroupKFold({n_splits})",
            "chance": round(chance, 4), "results": results}


def _size_rule(infos: Sequence[ImageInfo], labels: Sequence[str], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Image sizes (WxH) whose images all come from one class, largest count first."""
    if len(classes) < 2:
        return []
    by_size: dict[str, Counter] = defaultdict(Counter)
    for info in infos:
        by_size[f"{info.width}x{info.height}"][labels[info.index]] += 1
    rules = [
        {"size": size, "label": next(iter(c)), "count": sum(c.values())}
        for size, c in by_size.items()
        if len(c) == 1
    ]
    # Only meaningful when sizes vary at all: if every image has one size, that size spans classes.
    return sorted(rules, key=lambda r: (-r["count"], r["size"]))


def format_audit(report: dict[str, Any]) -> str:
    """Human-readable, multi-line rendering of a `run_audit` report."""
    lines = [f"Images: {report['n_samples']} ({report['n_readable']} readable)"]
    lines.append("Classes: " + ", ".join(f"{c} {n}" for c, n in report["class_counts"].items()))
    if report["unreadable"]:
        lines.append(f"Unreadable ({len(report['unreadable'])}):")
        lines += [f"  {u['path']}: {u['reason']}" for u in report["unreadable"]]
    ex, nd = report["exact_duplicates"], report["near_duplicates"]
    lines.append(f"Exact duplicates: {ex['n_sets']} set(s), {ex['n_images']} images")
    lines.append(
        f"Near duplicates: {nd['n_pairs']} pair(s) in {nd['n_groups']} group(s), largest {nd['largest_group']}"
    )
    cross = report["cross_class_duplicates"]
    for s in cross["exact"]:
        lines.append("  cross-class exact: " + " = ".join(f"{m['path']} ({m['label']})" for m in s))
    for p in cross["near"]:
        lines.append(f"  cross-class near: {p['a']} ({p['label_a']}) ~ {p['b']} ({p['label_b']}) [{p['similarity']:.3f}]")
    lines.append("Image properties per class:")
    for c, props in report["properties"].items():
        parts = [f"{k} " + ", ".join(f"{v} x{n}" for v, n in props[k].items()) for k in ("size", "mode", "format")]
        lines.append(f"  {c}: " + "; ".join(parts))
    gr = report["groups"]
    lines.append(
        f"Groups: {gr['n_groups']} (largest {gr['largest']}, median {gr['median_size']:g}, "
        f"{gr['n_mixed']} mixed-class); sizes " + _fmt_hist(gr["sizes"])
    )
    for c, st in gr["per_class"].items():
        lines.append(f"  {c}: {st['n_groups']} groups, largest {st['largest']}; sizes " + _fmt_hist(st["sizes"]))
    sc = report["shortcut"]
    if sc.get("status") == "ok":
        lines.append(f"Metadata shortcut ({sc['model']}, {sc['cv']}, chance {sc['chance']:.2f}):")
        for name, r in sc["results"].items():
            lines.append(f"  {name:<12} balanced accuracy {r['balanced_accuracy']:.2f} +- {r['std']:.2f}")
    else:
        lines.append(f"Metadata shortcut: {sc.get('status')} ({sc.get('detail', '')})")
    if report["size_rule"]:
        lines.append("Sizes seen in one class only:")
        lines += [f"  {r['size']}: {r['count']} image(s), all {r['label']}" for r in report["size_rule"]]
    lines.append(f"Warnings ({len(report['warnings'])}):" if report["warnings"] else "Warnings: none")
    lines += [f"  ! {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _fmt_hist(hist: dict[str, int]) -> str:
    return " ".join(f"[{k}]:{v}" for k, v in hist.items() if v) or "-"
