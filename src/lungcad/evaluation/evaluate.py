"""`lungcad evaluate`: a run's model on its own test split or on any labelled folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lungcad.data.dataset import load_cache
from lungcad.data.discovery import discover, parse_label_map
from lungcad.data.split import read_split
from lungcad.errors import LungcadError
from lungcad.evaluation.metrics import classification_metrics
from lungcad.inference.engine import infer_logits
from lungcad.models.contract import load_model
from lungcad.models.factory import logits_to_probs
from lungcad.utils import atomic_write_json

log = logging.getLogger(__name__)


def _target(label: str, classes: list[str], task: str, source: Path) -> int:
    if task == "binary":
        return int(label == "malignant")
    if label not in classes:
        raise LungcadError(f"label {label!r} is not one of the model's classes ({', '.join(classes)}); use --label-map", source)
    return classes.index(label)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    label_map: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of the run's model on its test split (default) or on the labelled folder `data`."""
    run_dir = Path(run_dir)
    model, contract = load_model(run_dir)
    model = model.to(memory_format=torch.channels_last)
    if data is None:
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise LungcadError(f"cannot read config.json ({exc})", run_dir) from None
        rows = [r for r in read_split(run_dir / "split.csv", root=Path(config["data"])) if r.subset == "test"]
        paths, labels, source = [r.path for r in rows], [r.label for r in rows], run_dir / "split.csv"
        subset = "test"
    else:
        samples = discover(data, parse_label_map(label_map))
        paths, labels, source = [s.path for s in samples], [s.label for s in samples], Path(data)
        subset = str(data)
    targets = [_target(lab, contract.classes, contract.task, source) for lab in labels]
    cache, bad = load_cache(paths, contract.preprocessing, progress=progress, desc="decoding")
    if bad:
        for path, reason in bad:
            log.warning("skipping unreadable image: %s", reason)
        bad_set = {p for p, _ in bad}
        keep = [i for i, p in enumerate(paths) if Path(p) not in bad_set]
        cache, targets = cache[keep], [targets[i] for i in keep]
    if not targets:
        raise LungcadError("no readable images to evaluate", source)
    logits = infer_logits(model, cache, contract.preprocessing)
    probs = logits_to_probs(logits, contract.task, contract.temperature).numpy()
    threshold = contract.thresholds.get("malignant", 0.5)
    metrics = {"subset": subset, "skipped": len(bad), **classification_metrics(
        targets, probs, contract.classes, contract.task, threshold)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
