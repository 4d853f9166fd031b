"""resource registry

Revision ID: 0001_resources
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_resources"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.Enum("checkpoint", "lora", "embedding", name="resourcekind", native_enum=False, length=16), nullable=False),
        sa.Column("family", sa.Enum("sd1", "sdxl", name="modelfamily", native_enum=False, length=16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("tensor_sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("owner_user_id", sa.String(64), nullable=True),
        sa.Column("minor", sa.Boolean(), nullable=False),
        sa.Column("poi", sa.Boolean(), nullable=False),
        sa.Column("sfw_only", sa.Boolean(), nullable=False),
        sa.Column("generation_enabled", sa.Boolean(), nullable=False),
        sa.Column("trigger_words", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resources")),
    )
    op.create_index(op.f("ix_resources_sha256"), "resources", ["sha256"])
    op.create_index(op.f("ix_resources_tensor_sha256"), "resources", ["tensor_sha256"])
    op.create_index(op.f("ix_resources_owner_user_id"), "resources", ["owner_user_id"])


def downgrade() -> None:
    op.drop_table("resources")
