"""Reads (issue 13 item 4): one read per reader and study with append-only revisions, reference
diagnoses, System Usability Scale questionnaires, pilot settings and the per-user reading mode.

Revision ID: 0006
Revises: 0005 (the studies/series migration; 0006 uses no 0005 table, and reads stay per study, i.e. per exam)

Old feedback rows are copied, not moved: each becomes a `read_revisions` row (stage "aided",
source "legacy", its time kept) and the latest row per reader and study becomes that reader's read
(mode "legacy": the AI result was in view, there is no unaided read). The stored `agree` is not
carried over: agreement is derived from the labels. The `feedback` table stays as it was (old
1-5 usability ratings stay readable there); the application no longer writes to it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ALTER TABLE, as 0005: a batch copy of `users` would drop the table studies, series, images
    # and reads point at (refused under SQLite's foreign keys).
    op.add_column("users", sa.Column("reading_mode", sa.Boolean, nullable=False, server_default="0"))
    op.create_table(
        "reads",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("unaided_label", sa.String(32), nullable=True),
        sa.Column("unaided_confidence", sa.Integer, nullable=True),
        sa.Column("unaided_at", TS, nullable=True),
        sa.Column("final_label", sa.String(32), nullable=True),
        sa.Column("final_confidence", sa.Integer, nullable=True),
        sa.Column("final_at", TS, nullable=True),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("model_label", sa.String(32), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("revisions", sa.Integer, nullable=False),
        sa.UniqueConstraint("study_id", "user_id", name="uq_reads_study_user"),
    )
    op.create_index("ix_reads_study_id", "reads", ["study_id"])
    op.create_index("ix_reads_user_id", "reads", ["user_id"])
    op.create_index("ix_reads_updated_at", "reads", ["updated_at"])
    op.create_table(
        "read_revisions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("read_id", sa.Integer, sa.ForeignKey("reads.id"), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("stage", sa.String(8), nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("confidence", sa.Integer, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("model_label", sa.String(32), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("legacy_feedback_id", sa.Integer, nullable=True),
    )
    op.create_index("ix_read_revisions_read_id", "read_revisions", ["read_id"])
    op.create_table(
        "reference_diagnoses",
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), primary_key=True),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("diagnosed_on", sa.Date, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("entered_by", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("entered_at", TS, nullable=False),
    )
    op.create_table(
        "sus_responses",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("period", sa.String(64), nullable=False),
        sa.Column("answers", sa.JSON, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("user_id", "period", name="uq_sus_user_period"),
    )
    op.create_index("ix_sus_responses_user_id", "sus_responses", ["user_id"])
    op.create_table(
        "pilot_settings",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    _copy_feedback()
    _append_only("read_revisions")


def _copy_feedback() -> None:
    """Old feedback rows -> reads (latest per reader and study) and read_revisions (every row)."""
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, study_id, user_id, created_at, label, confidence, comment, model_label, model_sha256 "
        "FROM feedback ORDER BY id")).mappings().all()
    by_pair: dict[tuple, list] = {}
    for r in rows:
        by_pair.setdefault((r["study_id"], r["user_id"]), []).append(r)
    reads = sa.table("reads", *(sa.column(c) for c in (
        "study_id", "user_id", "created_at", "updated_at", "mode", "final_label", "final_confidence", "final_at",
        "comment", "model_label", "model_sha256", "revisions")))
    revisions = sa.table("read_revisions", *(sa.column(c) for c in (
        "read_id", "at", "stage", "label", "confidence", "comment", "model_label", "source", "legacy_feedback_id")))
    for (study_id, user_id), group in by_pair.items():
        last = group[-1]
        bind.execute(reads.insert().values(
            study_id=study_id, user_id=user_id, created_at=group[0]["created_at"], updated_at=last["created_at"],
            mode="legacy", final_label=last["label"], final_confidence=last["confidence"], final_at=last["created_at"],
            comment=last["comment"] or "", model_label=last["model_label"] or "",
            model_sha256=last["model_sha256"] or "", revisions=len(group)))
        read_id = bind.execute(sa.text("SELECT id FROM reads WHERE study_id = :s AND user_id = :u"),
                               {"s": study_id, "u": user_id}).scalar_one()
        bind.execute(revisions.insert(), [
            {"read_id": read_id, "at": r["created_at"], "stage": "aided", "label": r["label"],
             "confidence": r["confidence"], "comment": r["comment"] or "", "model_label": r["model_label"] or "",
             "source": "legacy", "legacy_feedback_id": r["id"]} for r in group])


def _append_only(table: str) -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
    elif dialect == "postgresql":
        op.execute(f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{table} is append-only'; END $$")
        op.execute(f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS read_revisions_no_update")
        op.execute("DROP TRIGGER IF EXISTS read_revisions_no_delete")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS read_revisions_no_change ON read_revisions")
        op.execute("DROP FUNCTION IF EXISTS read_revisions_append_only()")
    for table in ("pilot_settings", "sus_responses", "reference_diagnoses", "read_revisions", "reads"):
        op.drop_table(table)
    op.drop_column("users", "reading_mode")  # plain ALTER TABLE (SQLite >= 3.35), see upgrade
