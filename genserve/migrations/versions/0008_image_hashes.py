"""perceptual hashes of known-abusive images (input images within a distance of one are refused)

Revision ID: 0008_image_hashes
Revises: 0007_economy
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_image_hashes"
down_revision = "0007_economy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "safety_image_hashes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("phash", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_safety_image_hashes")),
        sa.UniqueConstraint("phash", name=op.f("uq_safety_image_hashes_phash")),
    )


def downgrade() -> None:
    op.drop_table("safety_image_hashes")
