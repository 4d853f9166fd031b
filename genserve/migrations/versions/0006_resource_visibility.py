"""resources: visibility, nsfw flag, AIR alias

Revision ID: 0006_resource_visibility
Revises: 0005_trainings

Rows that existed before are public when nobody owns them (the catalog's checkpoints) and private
when a user does (trained LoRAs), which is how `usable` treated them until now.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_resource_visibility"
down_revision = "0005_trainings"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("nsfw", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column(
            "visibility", sa.Enum("private", "public", name="visibility", native_enum=False, length=16),
            nullable=False, server_default="private"))
        batch.add_column(sa.Column("air", sa.String(200), nullable=True))
        batch.create_unique_constraint(op.f("uq_resources_air"), ["air"])
    op.execute("UPDATE resources SET visibility = 'public' WHERE owner_user_id IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.drop_constraint(op.f("uq_resources_air"), type_="unique")
        batch.drop_column("air")
        batch.drop_column("visibility")
        batch.drop_column("nsfw")
