"""Prediction over large archives: resumable, and sharded across ranks under torchrun.

Every rank streams its rows into its own part file (`OUT.part<rank>.jsonl`, flushed each batch),
so an interrupted run loses at most one batch; `--resume` skips every input already in a part
file. Under `torchrun --nproc-per-node N -m lungcad predict ...` rank r takes inputs r, r+N, ...
of the sorted input listing (a disjoint shard), and rank 0 merges the parts into one output in
input order once all ranks are done. Series rows are computed at merge time from all slices, so a
series split across ranks or across a resume is aggregated exactly as in a single run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from lungcad.distributed import barrier, broadcast_from_main, init_distributed, shutdown
from lungcad.errors import LungcadError
from lungcad.inference.inputs import iter_inputs
from lungcad.inference.predictor import Predictor
from lungcad.inference.results import Prediction, add_to_series, write_predictions

__all__ = ["part_files", "predict_archive"]

log = logging.getLogger(__name__)


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*.jsonl"))


def _read_parts(out: Path) -> list[dict]:
    rows = []
    for part in part_files(out):
        with open(part, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):  # a line cut short by a crash is dropped (and redone)
                    rows.append(json.loads(line))
    return rows


def predict_archive(
    predictor: Predictor,
    inputs: Iterable[str | Path],
    out: str | Path,
    batch_size: int = 16,
    workers: int = 0,
    cam_dir: str | Path | None = None,
    dicom_out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[int, int]:
    """Predict every input into `out` (.csv/.json); returns (rows, failed) on rank 0."""
    out = Path(out)
    ctx = init_distributed("cpu")  # inference engines here run on the CPU; gloo is enough
    try:
        listing = list(iter_inputs(inputs))  # paths only: cheap even for 100 000 files
        order = {str(path): i for i, (path, _) in enumerate(listing)}
        # Rank 0 looks at earlier part files before any rank creates its own (a peer's fresh part
        # file must not look like an interrupted run); the broadcast doubles as the barrier.
        verdict: set[str] | LungcadError = set()
        if ctx.is_main:
            existing = part_files(out)
            if existing and not resume:
                verdict = LungcadError(f"partial results from an interrupted run exist ({existing[0].name}); "
                                       "pass --resume to continue them, or delete them", out.parent)
            elif resume:
                verdict = {row["source"].split("#")[0] for row in _read_parts(out)}
                log.info("resuming: %d input(s) already done, %d to go", len(verdict), len(listing) - len(verdict))
        done = broadcast_from_main(ctx, verdict)
        mine = [path for i, (path, _) in enumerate(listing)
                if i % ctx.world_size == ctx.rank and str(path) not in done]
        part = out.parent / f"{out.name}.part{ctx.rank}.jsonl"
        with open(part, "a", encoding="utf-8") as fh:
            rows = predictor.predict_paths(mine, batch_size=batch_size, progress=progress and ctx.is_main,
                                           cam_dir=cam_dir, workers=workers, series_rows=False, total=len(mine),
                                           dicom_out=dicom_out)
            for pred in rows:
                fh.write(json.dumps(pred.to_row()) + "\n")
                fh.flush()  # every row as it is produced: a crash or a kill loses none of them
        barrier(ctx)
        if not ctx.is_main:
            return 0, 0
        merged = _read_parts(out)

        def position(row: dict) -> tuple[int, int]:
            base, _, frame = row["source"].partition("#")
            return order.get(base, len(order)), int(frame) if frame.isdigit() else -1

        merged.sort(key=position)
        predictions = [Prediction.from_row(row, predictor.classes) for row in merged]
        predictions += list(predictor.series_predictions(_series_groups(predictions)))
        counts = write_predictions(predictions, out, predictor.columns)
        for p in part_files(out):
            p.unlink()
        return counts
    finally:
        shutdown(ctx)


def _series_groups(predictions: list[Prediction]) -> list[dict]:
    groups: dict[str, dict] = {}
    for p in predictions:
        add_to_series(groups, p)
    return list(groups.values())
