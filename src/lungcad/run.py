"""A run folder is an object: `RunFolder` owns the layout that `lungcad train` writes and gives
typed access to it. Everything that reads a run folder reads it through here.

A single run (`lungcad train`):
    config.json        the resolved TrainConfig (every default filled in)
    init.json          what the backbone started from (+ sha256 of a weights file)
    data.json          counts, groups, split summary, skipped files, training-data fingerprint
    split.csv          path,label,group,subset (paths relative to the data folder)
    skipped.csv        unreadable images left out, with the reason
    history.csv        one row per epoch
    model.safetensors  the weights
    model.json         the model contract (lungcad.models.contract)
    ood.safetensors    the out-of-distribution detector's parameters
    metrics.json       test-split metrics (rewritten by `lungcad evaluate` with intervals)
    report.html        written by `lungcad evaluate`
    checkpoint.pt, best.safetensors   only while training
A fold ensemble (`lungcad train --folds K`) has config.json, data.json, split.csv (every image,
subset "train"), model.json (listing its members), metrics.json, plus
    fold-k/            member run folders, as above
    fold-k.split.csv   each member's split (its test fold = the images it never saw)
    oof.csv            out-of-fold predictions
    crossval.json      per-fold and pooled out-of-fold metrics
Either kind may also hold what `lungcad check RUNDIR DATA` writes (lungcad.inference.site_check):
    check-<site>/      check.json + check.html: one site's images against the model
    site-check-reference.json   the reference images' OOD scores, cached for checks away from the data
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lungcad.data.split import SplitRow, read_split
from lungcad.errors import LungcadError
from lungcad.training.config import TrainConfig

__all__ = ["OutOfFold", "RunFolder"]

CONFIG, DATA, SPLIT, HISTORY, METRICS, OOF, CROSSVAL = (
    "config.json", "data.json", "split.csv", "history.csv", "metrics.json", "oof.csv", "crossval.json")


@dataclass
class OutOfFold:
    """The pooled out-of-fold predictions of a fold ensemble (oof.csv)."""

    paths: list[Path]
    labels: list[str]
    groups: list[str]
    folds: np.ndarray  # (N,) fold number of each image
    probs: np.ndarray  # (N, C) calibrated with the temperature fitted on the *other* folds
    logits: np.ndarray  # (N, O) raw logits of the member that never saw the image
    predicted: list[str]  # the decision at the threshold fitted on the other folds
    # (N, C) the texture head's out-of-fold probabilities (a `--fusion texture` run), else None
    texture: np.ndarray | None = None


class RunFolder:
    """Typed, read-only access to a run folder (layout in the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def _json(self, name: str, required: bool = True) -> dict | None:
        path = self.path / name
        if not path.is_file():
            if required:
                raise LungcadError(f"no {name} in the run folder (not a complete lungcad run?)", self.path)
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LungcadError(f"unreadable {name} ({exc})", path) from None

    @cached_property
    def config(self) -> dict:
        return self._json(CONFIG)

    def train_config(self) -> TrainConfig:
        """config.json as the TrainConfig it was written from (a fold ensemble's `folds` left out)."""
        try:
            return TrainConfig.from_dict(self.config)
        except (TypeError, ValueError, AttributeError) as exc:  # a missing field, or not an object
            raise LungcadError(f"unreadable {CONFIG} ({exc})", self.file(CONFIG)) from None

    @property
    def folds(self) -> int:
        """K of a fold ensemble (`lungcad train --folds K`), 0 for a single run."""
        try:
            return int(self.config.get("folds") or 0)
        except (TypeError, ValueError) as exc:
            raise LungcadError(f"unreadable {CONFIG}: 'folds' is not a number ({exc})", self.file(CONFIG)) from None

    @property
    def data_root(self) -> Path:
        if "data" not in self.config:
            raise LungcadError("config.json has no 'data' entry (run from an older lungcad?)", self.file(CONFIG))
        return Path(self.config["data"])

    @property
    def is_ensemble(self) -> bool:
        return bool(self.config.get("folds")) and (self.path / OOF).is_file()

    def split(self, subset: str | None = None) -> list[SplitRow]:
        """Rows of split.csv (paths resolved against the run's data folder), optionally one subset."""
        if not self.file(SPLIT).is_file():
            raise LungcadError("no split.csv in the run folder (older or incomplete run)", self.path)
        rows = read_split(self.file(SPLIT), root=self.data_root)
        return rows if subset is None else [r for r in rows if r.subset == subset]

    def contract(self):
        from lungcad.models.contract import read_contract

        return read_contract(self.path)

    def metrics(self) -> dict | None:
        return self._json(METRICS, required=False)

    def data_summary(self) -> dict | None:
        return self._json(DATA, required=False)

    def crossval(self) -> dict | None:
        return self._json(CROSSVAL, required=False)

    def site_checks(self) -> list[dict]:
        """The latest `lungcad check` of each site (RUNDIR/check-*/check.json), sorted by site.

        Flat summaries: site, date, verdict, flagged_share, p_value, images, folder. Unreadable or
        foreign files are skipped.
        """
        latest: dict[str, dict] = {}
        for path in sorted(self.path.glob("check-*/check.json")):
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                summary = {
                    "site": str(d.get("site") or path.parent.name.removeprefix("check-")),
                    "date": str(d.get("date", "")), "verdict": str(d["verdict"]),
                    "flagged_share": (d.get("flagged") or {}).get("share"),
                    "p_value": (d.get("shift") or {}).get("p_value"), "images": d.get("images"),
                    "reasons": list(d.get("reasons") or []), "folder": path.parent.name,
                }
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if summary["site"] not in latest or summary["date"] > latest[summary["site"]]["date"]:
                latest[summary["site"]] = summary
        return [latest[site] for site in sorted(latest)]

    def history(self) -> list[dict]:
        try:
            with open(self.file(HISTORY), newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        except OSError:
            return []

    def members(self) -> list[RunFolder]:
        """A fold ensemble's member run folders (empty for a single run)."""
        return [RunFolder(self.path / f"fold-{i}") for i in range(1, self.folds + 1)]

    def out_of_fold(self) -> OutOfFold:
        path = self.file(OOF)
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise LungcadError(f"cannot read oof.csv ({exc.strerror or exc})", path) from None
        if not rows:
            raise LungcadError("oof.csv is empty", path)
        p_cols = [c for c in rows[0] if c.startswith("p_")]
        z_cols = [c for c in rows[0] if c.startswith("logit_")]
        t_cols = [c for c in rows[0] if c.startswith("texture_p_")]
        root = self.data_root
        return OutOfFold(
            paths=[p if (p := Path(r["path"])).is_absolute() else root / p for r in rows],
            labels=[r["label"] for r in rows], groups=[r["group"] for r in rows],
            folds=np.array([int(r["fold"]) for r in rows]),
            probs=np.array([[float(r[c]) for c in p_cols] for r in rows]),
            logits=np.array([[float(r[c]) for c in z_cols] for r in rows]),
            predicted=[r["predicted"] for r in rows],
            texture=np.array([[float(r[c]) for c in t_cols] for r in rows]) if t_cols else None,
        )
