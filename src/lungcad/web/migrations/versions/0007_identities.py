"""Identities kept to return results to a PACS (issue 14 item 3): the original patient module and
General Study attributes on `exam_identifiers`, and the original SOP Instance, SOP Class and Series
Instance UIDs of each stored DICOM image in a new identifying table, `image_identifiers`.

Revision ID: 0007
Revises: 0006

Rows stored before this migration have nothing to fill these with (only de-identified copies were
kept): `identity_kept` stays false and their results cannot be sent to a PACS from the web app.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# (column, length) added to exam_identifiers, all NOT NULL with '' for the rows already there
EXAM_COLUMNS = (
    ("patient_name", 324), ("patient_id", 64), ("issuer_of_patient_id", 64), ("patient_birth_date", 16),
    ("patient_sex", 16), ("study_date", 16), ("study_time", 32), ("referring_physician_name", 324),
    ("dicom_study_id", 16),
)


def upgrade() -> None:
    # Plain ALTER TABLE, as 0005 and 0006 (no batch copy of a table others point at).
    op.add_column("exam_identifiers", sa.Column("identity_kept", sa.Boolean, nullable=False, server_default="0"))
    for name, length in EXAM_COLUMNS:
        op.add_column("exam_identifiers", sa.Column(name, sa.String(length), nullable=False, server_default=""))
    op.create_table(
        "image_identifiers",
        sa.Column("image_id", sa.String(32), sa.ForeignKey("images.id"), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("image_identifiers")
    # SQLite (3.35+) drops a column with ALTER TABLE; batch mode would copy the table.
    for name, _ in reversed(EXAM_COLUMNS):
        op.drop_column("exam_identifiers", name)
    op.drop_column("exam_identifiers", "identity_kept")
