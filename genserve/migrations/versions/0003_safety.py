"""safety audit log, likeness blocklist, takedowns

Revision ID: 0003_safety
Revises: 0002_ledger
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0003_safety"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
