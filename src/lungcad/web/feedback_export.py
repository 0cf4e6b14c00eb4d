"""`lungcad feedback export`: clinician-labelled studies as a de-identified training-data folder.

Layout (read by `lungcad train --extra-data DIR`):
    DIR/<label>/<study id>.png      the stored (de-identified, DICOM-windowed) pixels
    DIR/manifest.csv                path,label,group,feedback_id  (path relative to DIR)
`group` is the keyed hash of the DICOM study UID (or of the upload batch for PNG/JPEG), so slices
of one study stay on one side of any split. One row per study: the label is the readers' final
(aided) decision (`reads.final_label`, the latest revision of each reader's read; unaided reads
are never training labels); a study whose readers' final decisions differ is left out (counted in
the summary). `feedback_id` is the id of the chosen read (reads replaced feedback rows in migration
0006, which copied every old row). Nothing identifying leaves: random study ids, keyed group hashes,
the stored de-identified pixels; no user names, comments or timestamps.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from tqdm.auto import tqdm

from lungcad.errors import LungcadError
from lungcad.utils import atomic_write_text
from lungcad.web.db import Read, Study, audit

__all__ = ["COLUMNS", "MANIFEST", "consensus", "export_feedback"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.csv"
COLUMNS = ["path", "label", "group", "feedback_id"]


def consensus(reads: list[Read]) -> Read | None:
    """The most recently updated read if every reader's final label is the same, else None."""
    final = [r for r in reads if r.final_label]
    if not final or len({r.final_label for r in final}) != 1:
        return None
    return max(final, key=lambda r: (r.updated_at, r.id))


def export_feedback(session: Session, data_dir: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Write the dataset folder; returns a summary {exported, conflicting, missing, per_label}."""
    data_dir, out = Path(data_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LungcadError("output folder exists and is not empty", out)
    studies = list(session.scalars(
        select(Study).where(Study.id.in_(select(Read.study_id).where(Read.final_label.is_not(None))))
        .options(selectinload(Study.reads))
        .order_by(Study.created_at, Study.id)
    ))
    out.mkdir(parents=True, exist_ok=True)
    rows, conflicting, missing, used = [], 0, 0, []
    for study in tqdm(studies, desc="export", unit="study", disable=not progress):
        chosen = consensus(study.reads)
        if chosen is None:
            conflicting += 1
            continue
        src = data_dir / study.image_file
        if not src.is_file():
            missing += 1
            log.warning("stored image of study %s is missing; skipped", study.id)
            continue
        label = str(chosen.final_label)
        rel = Path(label) / f"{study.id}.png"
        (out / label).mkdir(exist_ok=True)
        shutil.copyfile(src, out / rel)
        rows.append([rel.as_posix(), label, study.group_key, chosen.id])
        used.append(chosen.id)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    atomic_write_text(out / MANIFEST, buf.getvalue())  # written last: a folder with a manifest is complete
    per_label: dict[str, int] = {}
    for r in rows:
        per_label[r[1]] = per_label.get(r[1], 0) + 1
    summary = {"exported": len(rows), "conflicting": conflicting, "missing": missing, "per_label": per_label}
    audit(session, "export", None, username="cli", target="feedback-dataset", read_ids=used[:10000], **summary)
    session.commit()
    return summary
