"""generation jobs

Revision ID: 0004_jobs
Revises: 0003_safety
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_jobs"
down_revision = "0003_safety"
branch_labels = None
depends_on = None

JOB_STATUS = sa.Enum(
    "queued", "running", "succeeded", "blocked", "failed", "canceled",
    name="jobstatus", native_enum=False, length=16,
)


def upgrade() -> None:
    op.create_table(
        "generation_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("status", JOB_STATUS, nullable=False),
        sa.Column("family", sa.String(16), nullable=False),
        sa.Column("checkpoint_id", sa.String(64), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("quote", sa.JSON(), nullable=False),
        sa.Column("quote_total", sa.BigInteger(), nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("charged", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generation_jobs")),
        sa.UniqueConstraint("user_id", "idempotency_key", name=op.f("uq_generation_jobs_user_id")),
    )
    op.create_index("ix_generation_jobs_user_id_status", "generation_jobs", ["user_id", "status"])
    op.create_index("ix_generation_jobs_status_heartbeat_at", "generation_jobs", ["status", "heartbeat_at"])
    op.create_table(
        "generation_job_events",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["generation_jobs.id"], ondelete="CASCADE",
            name=op.f("fk_generation_job_events_job_id_generation_jobs"),
        ),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_generation_job_events")),
    )


def downgrade() -> None:
    op.drop_table("generation_job_events")
    op.drop_index("ix_generation_jobs_status_heartbeat_at", table_name="generation_jobs")
    op.drop_index("ix_generation_jobs_user_id_status", table_name="generation_jobs")
    op.drop_table("generation_jobs")
