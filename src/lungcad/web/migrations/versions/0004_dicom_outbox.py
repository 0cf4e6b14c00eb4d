"""dicom_outbox: DICOM results (SR, Secondary Captures) waiting to be sent to a PACS by `lungcad dicom-node`.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destination", sa.String(160), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("study_id", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_dicom_outbox_status_next", "dicom_outbox", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_dicom_outbox_status_next", table_name="dicom_outbox")
    op.drop_table("dicom_outbox")
