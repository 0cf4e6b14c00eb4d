"""`lungcad feedback export`: clinician-labelled studies as a de-identified training-data folder.

Layout (read by `lungcad train --extra-data DIR`):
    DIR/<label>/<study id>.png      the stored (de-identified, DICOM-windowed) pixels
    DIR/manifest.csv                path,label,group,feedback_id  (path relative to DIR)
`group` is the keyed hash of the DICOM study UID (or of the upload batch for PNG/JPEG), so slices
of one study stay on one side of any split. One row per study: the clinicians' latest labels; a
study whose clinicians disagree with each other is left out (counted in the summary).
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
from lungcad.web.db import Feedback, Study, audit

__all__ = ["COLUMNS", "MANIFEST", "consensus", "export_feedback"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.csv"
COLUMNS = ["path", "label", "group", "feedback_id"]


def consensus(feedback: list[Feedback]) -> Feedback | None:
    """The latest feedback row if every clinician's latest label agrees, else None."""
    latest: dict[int, Feedback] = {}
    for f in sorted(feedback, key=lambda f: f.id):
        latest[f.user_id] = f
    if not latest or len({f.label for f in latest.values()}) != 1:
        return None
    return max(latest.values(), key=lambda f: f.id)


def export_feedback(session: Session, data_dir: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Write the dataset folder; returns a summary {exported, conflicting, missing, per_label}."""
    data_dir, out = Path(data_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LungcadError("output folder exists and is not empty", out)
    studies = list(session.scalars(
        select(Study).where(Study.id.in_(select(Feedback.study_id))).options(selectinload(Study.feedback))
        .order_by(Study.created_at, Study.id)
    ))
    out.mkdir(parents=True, exist_ok=True)
    rows, conflicting, missing, used = [], 0, 0, []
    for study in tqdm(studies, desc="export", unit="study", disable=not progress):
        chosen = consensus(study.feedback)
        if chosen is None:
            conflicting += 1
            continue
        src = data_dir / study.image_file
        if not src.is_file():
            missing += 1
            log.warning("stored image of study %s is missing; skipped", study.id)
            continue
        rel = Path(chosen.label) / f"{study.id}.png"
        (out / chosen.label).mkdir(exist_ok=True)
        shutil.copyfile(src, out / rel)
        rows.append([rel.as_posix(), chosen.label, study.group_key, chosen.id])
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
    audit(session, "export", None, username="cli", target="feedback-dataset", feedback_ids=used[:10000], **summary)
    session.commit()
    return summary
