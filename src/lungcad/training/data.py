"""Training data: discover -> scan -> group -> split (the plan, decided once) -> decoded caches.

The plan is made before anything is written (on rank 0 under torchrun) and contains everything a
run folder records about its data; the caches are the per-process, decoded-once images.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lungcad.data.dataset import load_cache
from lungcad.data.discovery import CLASSES, Sample, discover, parse_label_map
from lungcad.data.grouping import ImageInfo, assign_groups, scan_images
from lungcad.data.split import SplitRow, read_split, split_summary, stratified_group_split
from lungcad.data.transforms import AUGMENT_POLICIES, Preprocessing
from lungcad.errors import LungcadError
from lungcad.models.factory import target_index
from lungcad.training.config import TrainConfig

__all__ = [
    "BINARY_CLASSES", "DataPlan", "PreparedData", "check_two_classes", "load_data", "output_classes", "plan_data",
]

log = logging.getLogger(__name__)

BINARY_CLASSES = ["not_malignant", "malignant"]


@dataclass
class DataPlan:
    """What to train on, decided once (on rank 0 under torchrun) before any file is written."""

    rows: list[SplitRow]
    colour: str
    skipped: list[tuple[Path, str]]
    summary: dict


@dataclass
class PreparedData:
    rows: list[SplitRow]
    pp: Preprocessing
    caches: dict[str, torch.Tensor]  # subset -> uint8 cache
    targets: dict[str, list[int]]
    skipped: list[tuple[Path, str]]
    summary: dict


def output_classes(task: str) -> list[str]:
    return list(BINARY_CLASSES) if task == "binary" else list(CLASSES)


def check_two_classes(labels: list[str], task: str, where: str | Path) -> None:
    """Refuse training data that holds one class of the task only: such a model could only ever answer that class."""
    present = sorted({"malignant" if label == "malignant" else "not_malignant" for label in labels}
                     if task == "binary" else set(labels))
    if len(present) < 2:
        raise LungcadError(
            f"the training images hold one class only ({', '.join(present) or 'none'}); a {task} model needs "
            f"at least two of {', '.join(output_classes(task))}", where)


def plan_data(cfg: TrainConfig, split_file: Path | None, known: Mapping[Path, ImageInfo | str] | None = None) -> DataPlan:
    """Discover, scan, group and split. Raises LungcadError before anything is written.

    `known`: an earlier scan of these images (`grouping.scan_results`), reused instead of a new one.
    """
    if cfg.augment_policy not in AUGMENT_POLICIES:
        raise LungcadError(f"unknown --augment-policy {cfg.augment_policy!r} (choose {', '.join(AUGMENT_POLICIES)})")
    data = Path(cfg.data)
    label_map = parse_label_map(cfg.label_map)
    if split_file is not None:
        rows = read_split(split_file, root=data)
        samples = [Sample(r.path, r.label, r.group) for r in rows]
    else:
        samples = discover(data, label_map)
    infos, unreadable = scan_images(samples, progress=cfg.progress, known=known)
    bad_paths = {Path(p) for p, _ in unreadable}
    for path, reason in unreadable:
        log.warning("skipping unreadable image: %s", reason if str(path) in reason else f"{path}: {reason}")
    if split_file is not None:
        rows = [r for r in rows if r.path not in bad_paths]
    else:
        groups = assign_groups(samples, infos)
        keep = [i for i, s in enumerate(samples) if s.path not in bad_paths]
        if not keep:
            raise LungcadError("no readable images", data)
        rows = stratified_group_split(
            [samples[i] for i in keep],
            [groups[i] for i in keep],
            fractions=(1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction),
            seed=cfg.seed,
        )
    modes = [info.mode for info in infos]
    sha_of = {str(samples[i.index].path): i.sha256 for i in infos}
    extra_summary = None
    if cfg.extra_data:
        extra_rows, extra_modes, extra_sha, extra_bad, feedback_ids = _plan_extra_data(cfg, label_map)
        present = {str(r.path) for r in rows}  # a resumed run's split.csv already lists them
        extra_rows = [r for r in extra_rows if str(r.path) not in present]
        rows, unreadable, modes = rows + extra_rows, list(unreadable) + extra_bad, modes + extra_modes
        sha_of.update(extra_sha)
        extra_summary = {"path": cfg.extra_data, "images": len(extra_rows), "feedback_ids": feedback_ids}
    colour = cfg.colour
    if colour == "auto":
        grey_modes = {"L", "I;16", "I;16B", "I;16L", "I", "1", "LA"}
        colour = "grey" if all(m in grey_modes for m in modes) else "rgb"
    for subset in ("train", "test"):
        if not any(r.subset == subset for r in rows):
            raise LungcadError(f"the {subset} subset is empty", split_file or data)
    check_two_classes([r.label for r in rows if r.subset == "train"], cfg.task, split_file or data)
    if not any(r.subset == "val" for r in rows):  # cross-validation folds: the recipe fixes the epochs
        log.info("no validation subset: fixed %d epochs, no early stopping, no calibration in this run", cfg.epochs)
    fingerprint = hashlib.sha256()
    for r in sorted(rows, key=lambda r: str(r.path)):
        fingerprint.update(f"{r.path.name},{r.label},{r.subset},{sha_of.get(str(r.path), '')}\n".encode())
    summary = {
        "data": str(data),
        "images": len(rows),
        "skipped": len(unreadable),
        "colour": colour,
        "groups": len({r.group for r in rows}),
        "split": split_summary(rows),
        "fingerprint_sha256": fingerprint.hexdigest(),
    }
    if extra_summary is not None:
        summary["extra_data"] = extra_summary
    return DataPlan(rows, colour, list(unreadable), summary)


def _plan_extra_data(
    cfg: TrainConfig, label_map: dict[str, str]
) -> tuple[list[SplitRow], list[str], dict[str, str], list[tuple[Path, str]], list[str]]:
    """Extra training-only images (e.g. from `lungcad feedback export`), never in val or test so
    that evaluation stays comparable with runs without them.

    Returns (rows, image modes, sha256 by path, unreadable, feedback ids from the manifest).
    """
    extra = Path(cfg.extra_data)
    source = extra / "manifest.csv" if (extra / "manifest.csv").is_file() else extra
    samples = discover(source, label_map)
    infos, unreadable = scan_images(samples, progress=False)
    rows = [
        SplitRow(samples[i.index].path, samples[i.index].label,
                 f"extra:{samples[i.index].group or samples[i.index].path.stem}", "train")
        for i in infos
    ]
    feedback_ids: list[str] = []
    if source.is_file():
        with open(source, newline="", encoding="utf-8") as fh:
            feedback_ids = [r["feedback_id"] for r in csv.DictReader(fh) if r.get("feedback_id")]
    log.info("extra training data: %d images from %s (%d feedback rows)", len(rows), extra, len(feedback_ids))
    sha_of = {str(samples[i.index].path): i.sha256 for i in infos}
    return rows, [i.mode for i in infos], sha_of, list(unreadable), feedback_ids


def load_data(plan: DataPlan, cfg: TrainConfig, progress: bool) -> PreparedData:
    """Decode every image of the plan once into uint8 caches (the expensive, per-process part)."""
    pp = Preprocessing(image_size=cfg.image_size, colour=plan.colour, augment=dict(AUGMENT_POLICIES[cfg.augment_policy]))
    pp = pp.with_window(cfg.window)  # declared by `train --window`: the contract's DICOM window
    caches, targets = {}, {}
    for subset in ("train", "val", "test"):
        sub = [r for r in plan.rows if r.subset == subset]
        caches[subset], bad = load_cache([r.path for r in sub], pp, progress=progress, desc=f"decoding {subset}")
        if bad:  # scanned fine but failed now (changed on disk): refuse rather than train on zeros
            raise LungcadError(f"image became unreadable during loading: {bad[0][1]}")
        targets[subset] = [target_index(r.label, output_classes(cfg.task), cfg.task) for r in sub]
    return PreparedData(plan.rows, pp, caches, targets, plan.skipped, plan.summary)
