"""training jobs

Revision ID: 0005_trainings
Revises: 0004_jobs
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0005_trainings"
down_revision = "0004_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
