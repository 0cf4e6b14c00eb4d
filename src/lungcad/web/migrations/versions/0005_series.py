"""Exams, series and images: `studies` becomes the exam; per-image columns move to `images`.

Each existing study (one uploaded image, or the key slice of a series filed by `lungcad dicom-node`)
becomes an exam with one series and one image holding its columns; the series result is the image's
result (what the study showed). `exam_identifiers` holds what identifies an exam (empty for
migrated rows: nothing identifying was ever stored). Migrated exams get no `exam_key`, so later
uploads start exams of their own.

Revision ID: 0005
Revises: 0004
"""

import json
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
# the per-image columns of `studies` up to 0004, in the order they move
IMAGE_COLUMNS = ("kind", "input_sha256", "image_file", "dicom_file", "width", "height", "label", "decision",
                 "malignant_probability", "probabilities", "ood", "ood_score", "ood_reasons", "error",
                 "model_sha256", "dicom_meta")
DROPPED = [c for c in IMAGE_COLUMNS if c not in ("kind", "model_sha256")]


def _json(value, default):
    """A JSON column's value as Python (SQLite hands back text, PostgreSQL parsed values)."""
    if value is None:
        return default
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    op.create_table(
        "exam_identifiers",
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), primary_key=True),
        sa.Column("accession_number", sa.String(64), nullable=False, server_default=""),
        sa.Column("study_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("case_label", sa.String(128), nullable=False, server_default=""),
    )
    series = op.create_table(
        "series",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("series_key", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("images_count", sa.Integer, nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("malignant_probability", sa.Float, nullable=True),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("ood", sa.Boolean, nullable=False),
        sa.Column("ood_score", sa.Float, nullable=True),
        sa.Column("ood_reasons", sa.JSON, nullable=False),
        sa.Column("key_images", sa.JSON, nullable=False),
        sa.Column("slice_scores", sa.JSON, nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_series_study_id", "series", ["study_id"])
    op.create_index("ix_series_study_key", "series", ["study_id", "series_key"], unique=True)
    images = op.create_table(
        "images",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("series_id", sa.String(32), sa.ForeignKey("series.id"), nullable=False),
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("sop_key", sa.String(64), nullable=True),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("position", sa.Float, nullable=False),
        sa.Column("image_file", sa.String(128), nullable=False),
        sa.Column("dicom_file", sa.String(128), nullable=True),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("malignant_probability", sa.Float, nullable=True),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("ood", sa.Boolean, nullable=False),
        sa.Column("ood_score", sa.Float, nullable=True),
        sa.Column("ood_reasons", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("dicom_meta", sa.JSON, nullable=False),
    )
    op.create_index("ix_images_series_id", "images", ["series_id"])
    op.create_index("ix_images_study_id", "images", ["study_id"])
    op.create_index("ix_images_user_id", "images", ["user_id"])
    op.create_index("ix_images_input_sha256", "images", ["input_sha256"])
    op.create_index("ix_images_sop_key", "images", ["sop_key"], unique=True)

    conn = op.get_bind()
    # typed, so that both dialects hand back datetimes and parsed JSON
    studies = sa.table(
        "studies", sa.column("id", sa.String), sa.column("created_at", TS), sa.column("user_id", sa.Integer),
        *(sa.column(c, sa.JSON if c in ("probabilities", "ood_reasons", "dicom_meta") else
                    sa.Boolean if c == "ood" else sa.Float if c in ("malignant_probability", "ood_score") else
                    sa.Integer if c in ("width", "height") else sa.String) for c in IMAGE_COLUMNS),
    )
    old = conn.execute(sa.select(studies).order_by(studies.c.created_at, studies.c.id)).mappings().all()
    series_rows, image_rows = [], []
    for row in old:
        series_id, image_id = secrets.token_hex(12), secrets.token_hex(12)
        meta = _json(row["dicom_meta"], {})
        reasons = _json(row["ood_reasons"], None)
        probabilities = _json(row["probabilities"], {})
        p_mal = row["malignant_probability"]
        series_rows.append({
            "id": series_id, "study_id": row["id"], "created_at": row["created_at"], "series_key": "migrated",
            "number": 1, "modality": str(meta.get("modality", ""))[:16], "images_count": 1, "label": row["label"],
            "decision": row["decision"], "malignant_probability": p_mal, "probabilities": probabilities,
            "ood": bool(row["ood"]), "ood_score": row["ood_score"], "ood_reasons": list(reasons or []),
            "key_images": [image_id], "slice_scores": [[image_id, p_mal, bool(row["ood"])]],
            "model_sha256": row["model_sha256"],
        })
        image_rows.append({
            "id": image_id, "series_id": series_id, "study_id": row["id"], "created_at": row["created_at"],
            "user_id": row["user_id"], "sop_key": None, "instance_number": None, "position": 0.0,
            **{c: row[c] for c in IMAGE_COLUMNS},
            "probabilities": probabilities, "ood": bool(row["ood"]), "ood_reasons": reasons, "dicom_meta": meta,
        })
    if series_rows:
        op.bulk_insert(series, series_rows)
        op.bulk_insert(images, image_rows)

    # Plain ALTER TABLE (SQLite >= 3.35 drops columns natively): a batch copy of `studies` would have
    # to drop the table that feedback, series and images point at.
    op.drop_index("ix_studies_input_sha256", table_name="studies")
    for column in DROPPED:
        op.drop_column("studies", column)
    op.add_column("studies", sa.Column("exam_key", sa.String(64), nullable=True))
    op.create_index("uq_studies_exam_key", "studies", ["exam_key"], unique=True)


def downgrade() -> None:
    """Back to one image per study: each exam keeps its key image (the first key image of its last
    series); its other images and series are dropped (their files stay in the data folder)."""
    conn = op.get_bind()
    images = sa.table("images", *(sa.column(c, sa.JSON if c in ("probabilities", "ood_reasons", "dicom_meta") else
                                            sa.String) for c in ("id", *DROPPED)))
    keep = {}
    for study_id, key_images in conn.execute(sa.text("SELECT study_id, key_images FROM series ORDER BY number")).all():
        keys = _json(key_images, [])
        row = conn.execute(sa.select(images).where(images.c.id == keys[0])).mappings().first() if keys else None
        if row is not None:
            keep[study_id] = {c: row[c] for c in DROPPED}
    op.drop_index("uq_studies_exam_key", table_name="studies")
    op.drop_column("studies", "exam_key")
    op.drop_table("images")
    op.drop_table("series")
    op.drop_table("exam_identifiers")
    op.add_column("studies", sa.Column("input_sha256", sa.String(64), nullable=False, server_default=""))
    op.add_column("studies", sa.Column("image_file", sa.String(128), nullable=False, server_default=""))
    op.add_column("studies", sa.Column("dicom_file", sa.String(128), nullable=True))
    op.add_column("studies", sa.Column("width", sa.Integer, nullable=False, server_default="0"))
    op.add_column("studies", sa.Column("height", sa.Integer, nullable=False, server_default="0"))
    op.add_column("studies", sa.Column("label", sa.String(32), nullable=False, server_default=""))
    op.add_column("studies", sa.Column("decision", sa.String(32), nullable=False, server_default=""))
    op.add_column("studies", sa.Column("malignant_probability", sa.Float, nullable=True))
    op.add_column("studies", sa.Column("probabilities", sa.JSON, nullable=False, server_default="{}"))
    op.add_column("studies", sa.Column("ood", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("studies", sa.Column("ood_score", sa.Float, nullable=True))
    op.add_column("studies", sa.Column("ood_reasons", sa.JSON, nullable=True))
    op.add_column("studies", sa.Column("error", sa.Text, nullable=False, server_default=""))
    op.add_column("studies", sa.Column("dicom_meta", sa.JSON, nullable=False, server_default="{}"))
    studies = sa.table("studies", sa.column("id", sa.String), *(
        sa.column(c, sa.JSON if c in ("probabilities", "ood_reasons", "dicom_meta") else sa.Boolean if c == "ood"
                  else sa.Float if c in ("malignant_probability", "ood_score") else
                  sa.Integer if c in ("width", "height") else sa.String) for c in DROPPED))
    for study_id, values in keep.items():
        values["ood"] = values["ood"] in (True, 1, "1", "true", "t")
        for c in ("width", "height"):
            values[c] = int(values[c])
        for c in ("malignant_probability", "ood_score"):
            values[c] = None if values[c] is None else float(values[c])
        conn.execute(studies.update().where(studies.c.id == study_id).values(**values))
    op.create_index("ix_studies_input_sha256", "studies", ["input_sha256"])
