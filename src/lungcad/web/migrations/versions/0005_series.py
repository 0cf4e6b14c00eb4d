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
    old = conn.execute(sa.text(
        "SELECT id, created_at, user_id, " + ", ".join(IMAGE_COLUMNS) + " FROM studies ORDER BY created_at, id"
    )).mappings().all()
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

    op.drop_index("ix_studies_input_sha256", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        for column in DROPPED:
            batch.drop_column(column)
        batch.add_column(sa.Column("exam_key", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_studies_exam_key", ["exam_key"])


def downgrade() -> None:
    """Back to one image per study: each exam keeps its key image (the series' first key image);
    its other images and series are dropped (their files stay in the data folder)."""
    with op.batch_alter_table("studies") as batch:
        batch.drop_constraint("uq_studies_exam_key", type_="unique")
        batch.drop_column("exam_key")
        batch.add_column(sa.Column("input_sha256", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("image_file", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("dicom_file", sa.String(128), nullable=True))
        batch.add_column(sa.Column("width", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("height", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("label", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("decision", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("malignant_probability", sa.Float, nullable=True))
        batch.add_column(sa.Column("probabilities", sa.JSON, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("ood", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("ood_score", sa.Float, nullable=True))
        batch.add_column(sa.Column("ood_reasons", sa.JSON, nullable=True))
        batch.add_column(sa.Column("error", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("dicom_meta", sa.JSON, nullable=False, server_default="{}"))
    conn = op.get_bind()
    for study_id, key_images in conn.execute(sa.text(
            "SELECT study_id, key_images FROM series ORDER BY number DESC")).all():
        keys = _json(key_images, [])
        if not keys:
            continue
        img = conn.execute(sa.text("SELECT * FROM images WHERE id = :i"), {"i": keys[0]}).mappings().first()
        if img is None:
            continue
        values = {c: img[c] for c in DROPPED}
        for c in ("probabilities", "ood_reasons", "dicom_meta"):
            values[c] = json.dumps(_json(values[c], None))
        conn.execute(sa.text("UPDATE studies SET " + ", ".join(f"{c} = :{c}" for c in DROPPED) + " WHERE id = :sid"),
                     {**values, "sid": study_id})
    op.create_index("ix_studies_input_sha256", "studies", ["input_sha256"])
    op.drop_table("images")
    op.drop_table("series")
    op.drop_table("exam_identifiers")
