"""buzz ledger (billing)

Revision ID: 0002_ledger
Revises: 0001_resources
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0002_ledger"
down_revision = "0001_resources"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
