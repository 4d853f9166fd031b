"""training jobs

Revision ID: 0005_trainings
Revises: 0004_jobs
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_trainings"
down_revision = "0004_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trainings",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("family", sa.String(16), nullable=False),
        sa.Column("base_model", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("trigger_words", sa.JSON(), nullable=False),
        sa.Column("real_person", sa.Boolean(), nullable=False),
        sa.Column("dataset_key", sa.String(512), nullable=False),
        sa.Column("dataset_images", sa.Integer(), nullable=False),
        sa.Column("intake_report", sa.JSON(), nullable=False),
        sa.Column("safety", sa.JSON(), nullable=False),
        sa.Column("quote_total", sa.BigInteger(), nullable=False),
        sa.Column("quote", sa.JSON(), nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("charged", sa.BigInteger(), nullable=True),
        sa.Column("steps_per_epoch", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checkpoint_key", sa.String(512), nullable=True),
        sa.Column("checkpoint_step", sa.Integer(), nullable=False),
        sa.Column("checkpoint_epoch", sa.Integer(), nullable=False),
        sa.Column("samples", sa.JSON(), nullable=False),
        sa.Column("ray_job_id", sa.String(128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("output_key", sa.String(512), nullable=True),
        sa.Column("output_sha256", sa.String(64), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trainings")),
    )
    op.create_index(op.f("ix_trainings_user_id"), "trainings", ["user_id"])
    op.create_index(op.f("ix_trainings_status"), "trainings", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_trainings_status"), table_name="trainings")
    op.drop_index(op.f("ix_trainings_user_id"), table_name="trainings")
    op.drop_table("trainings")
