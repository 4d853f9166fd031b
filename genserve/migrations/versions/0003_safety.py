"""safety audit log, likeness blocklist, takedowns

Revision ID: 0003_safety
Revises: 0002_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_safety"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "safety_likeness_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("tensor_sha256", sa.String(64), nullable=True),
        sa.Column("fingerprint", sa.LargeBinary(), nullable=True),
        sa.Column("fingerprint_meta", sa.JSON(), nullable=False),
        sa.Column("person", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_likeness_entries")),
    )
    op.create_index(op.f("ix_safety_likeness_entries_sha256"), "safety_likeness_entries", ["sha256"])
    op.create_index(op.f("ix_safety_likeness_entries_tensor_sha256"), "safety_likeness_entries", ["tensor_sha256"])
    op.create_index(op.f("ix_safety_likeness_entries_resource_id"), "safety_likeness_entries", ["resource_id"])

    op.create_table(
        "safety_takedowns",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("person", sa.String(200), nullable=False),
        sa.Column("contact", sa.String(320), nullable=False),
        sa.Column("resource_ids", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("moderator", sa.String(200), nullable=True),
        sa.Column("decision_note", sa.Text(), nullable=False),
        sa.Column("entry_ids", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_takedowns")),
    )
    op.create_index(op.f("ix_safety_takedowns_status"), "safety_takedowns", ["status"])

    op.create_table(
        "safety_person_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("name_key", sa.String(200), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_person_names")),
        sa.UniqueConstraint("name_key", name=op.f("uq_safety_person_names_name_key")),
    )

    op.create_table(
        "safety_audit_log",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("subject_hashes", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_audit_log")),
        sa.UniqueConstraint("row_hash", name=op.f("uq_safety_audit_log_row_hash")),
    )
    op.create_index(op.f("ix_safety_audit_log_kind"), "safety_audit_log", ["kind"])
    op.create_index(op.f("ix_safety_audit_log_request_id"), "safety_audit_log", ["request_id"])
    op.create_index(op.f("ix_safety_audit_log_job_id"), "safety_audit_log", ["job_id"])
    op.create_index(op.f("ix_safety_audit_log_user_id"), "safety_audit_log", ["user_id"])


def downgrade() -> None:
    op.drop_table("safety_audit_log")
    op.drop_table("safety_person_names")
    op.drop_table("safety_takedowns")
    op.drop_table("safety_likeness_entries")
