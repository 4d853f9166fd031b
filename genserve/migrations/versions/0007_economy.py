"""creator economy: resource terms (licence fee, early access) and unlocks/contributions

Revision ID: 0007_economy
Revises: 0006_resource_visibility
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_economy"
down_revision = "0006_resource_visibility"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "resource_terms",
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("licence_fee", sa.Integer(), nullable=False),
        sa.Column("early_access_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unlock_price", sa.BigInteger(), nullable=False),
        sa.Column("contribution_goal", sa.BigInteger(), nullable=True),
        sa.Column("contributed", sa.BigInteger(), nullable=False),
        sa.Column("goal_reached_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("licence_fee >= 0", name=op.f("ck_resource_terms_licence_fee_nonnegative")),
        sa.CheckConstraint("unlock_price >= 0", name=op.f("ck_resource_terms_unlock_price_nonnegative")),
        sa.CheckConstraint("contributed >= 0", name=op.f("ck_resource_terms_contributed_nonnegative")),
        sa.ForeignKeyConstraint(["resource_id"], ["resources.id"],
                                name=op.f("fk_resource_terms_resource_id_resources")),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_resource_terms")),
    )
    op.create_table(
        "resource_unlocks",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('purchase', 'contribution')", name=op.f("ck_resource_unlocks_kind")),
        sa.CheckConstraint("amount > 0", name=op.f("ck_resource_unlocks_amount_positive")),
        sa.ForeignKeyConstraint(["resource_id"], ["resources.id"],
                                name=op.f("fk_resource_unlocks_resource_id_resources")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resource_unlocks")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_resource_unlocks_idempotency_key")),
    )
    op.create_index("ix_resource_unlocks_resource_user", "resource_unlocks", ["resource_id", "user_id"])


def downgrade() -> None:
    op.drop_index("ix_resource_unlocks_resource_user", table_name="resource_unlocks")
    op.drop_table("resource_unlocks")
    op.drop_table("resource_terms")
