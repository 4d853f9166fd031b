"""buzz ledger (billing)

Revision ID: 0002_ledger
Revises: 0001_resources
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_ledger"
down_revision = "0001_resources"
branch_labels = None
depends_on = None

ENTRY_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Ledger entries are append-only: the database refuses UPDATE and DELETE on them.
IMMUTABLE_ENTRIES = {
    "sqlite": (
        "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END",
        "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END",
    ),
    "postgresql": (
        "CREATE OR REPLACE FUNCTION ledger_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'ledger entries are immutable' USING ERRCODE = 'restrict_violation'; END $$",
        "CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_entries_immutable()",
    ),
}


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("posted", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('user', 'system')", name=op.f("ck_ledger_accounts_kind")),
        sa.CheckConstraint("held >= 0", name=op.f("ck_ledger_accounts_held_nonnegative")),
        sa.CheckConstraint("kind <> 'user' OR posted >= 0", name=op.f("ck_ledger_accounts_user_posted_nonnegative")),
        sa.CheckConstraint(
            "kind <> 'user' OR posted - held >= 0", name=op.f("ck_ledger_accounts_user_available_nonnegative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_accounts")),
    )
    op.create_table(
        "ledger_account_shards",
        sa.Column("account_id", sa.String(100), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("posted", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["ledger_accounts.id"], name=op.f("fk_ledger_account_shards_account_id_ledger_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", "shard", name=op.f("pk_ledger_account_shards")),
    )
    op.create_table(
        "ledger_holds",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(100), nullable=False),
        sa.Column("destination_id", sa.String(100), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("captured", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name=op.f("ck_ledger_holds_amount_positive")),
        sa.CheckConstraint("captured >= 0 AND captured <= amount", name=op.f("ck_ledger_holds_captured_within_amount")),
        sa.CheckConstraint("status IN ('open', 'captured', 'released', 'expired')", name=op.f("ck_ledger_holds_status")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["ledger_accounts.id"], name=op.f("fk_ledger_holds_account_id_ledger_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"], ["ledger_accounts.id"], name=op.f("fk_ledger_holds_destination_id_ledger_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_holds")),
    )
    op.create_index(op.f("ix_ledger_holds_account_id"), "ledger_holds", ["account_id"])
    op.create_index("ix_ledger_holds_status_expires_at", "ledger_holds", ["status", "expires_at"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", ENTRY_ID, autoincrement=True, nullable=False),
        sa.Column("transfer_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(100), nullable=False),
        sa.Column("counterparty_id", sa.String(100), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_ledger_entries_amount_nonzero")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["ledger_accounts.id"], name=op.f("fk_ledger_entries_account_id_ledger_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["counterparty_id"], ["ledger_accounts.id"], name=op.f("fk_ledger_entries_counterparty_id_ledger_accounts")
        ),
        sa.ForeignKeyConstraint(["hold_id"], ["ledger_holds.id"], name=op.f("fk_ledger_entries_hold_id_ledger_holds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(op.f("ix_ledger_entries_transfer_id"), "ledger_entries", ["transfer_id"])
    op.create_index(op.f("ix_ledger_entries_hold_id"), "ledger_entries", ["hold_id"])
    op.create_index("ix_ledger_entries_account_id_id", "ledger_entries", ["account_id", "id"])
    op.create_table(
        "ledger_idempotency",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_ledger_idempotency")),
    )
    dialect = op.get_bind().dialect.name
    for sql in IMMUTABLE_ENTRIES.get(dialect, ()):
        op.execute(sql)


def downgrade() -> None:
    op.drop_table("ledger_idempotency")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_holds")
    op.drop_table("ledger_account_shards")
    op.drop_table("ledger_accounts")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_immutable()")
