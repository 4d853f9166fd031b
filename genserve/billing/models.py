"""Ledger tables (the `*Row` classes; the ledger's API returns its own dataclasses). The database itself refuses a negative user balance (CHECK constraints) and any
change to a written entry (triggers), so no code path, old or new, can break those rules.

- `ledger_accounts`: one row per account with its running balance (`posted`, and `held` by open holds).
- `ledger_account_shards`: the posted balance of a system account, spread over a few rows. Every
  capture credits a revenue account; one balance row for it would be locked by every capture until
  its commit is on disk, serialising them all. System accounts have no floor, so nothing needs
  their total in one row. A system account's posted balance = its `posted` + the sum of its shards.
- `ledger_entries`: immutable double-entry lines; each transfer writes one debit and one credit line.
- `ledger_holds`: two-phase transfers (pending -> captured / released / expired).
- `ledger_idempotency`: the first result of every keyed call, so a retry returns it unchanged.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    DDL,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
)
from sqlalchemy.orm import Mapped, mapped_column

from genserve.core.db import Base

ACCOUNT_ID = String(100)
HOLD_ID = String(32)
IDEMPOTENCY_KEY = String(200)
# 64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY (which is 64-bit there).
ENTRY_ID = BigInteger().with_variant(Integer(), "sqlite")

HOLD_STATUSES = ("open", "captured", "released", "expired")


class AccountRow(Base):
    __tablename__ = "ledger_accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('user', 'system')", name="kind"),
        CheckConstraint("held >= 0", name="held_nonnegative"),
        CheckConstraint("kind <> 'user' OR posted >= 0", name="user_posted_nonnegative"),
        CheckConstraint("kind <> 'user' OR posted - held >= 0", name="user_available_nonnegative"),
    )

    id: Mapped[str] = mapped_column(ACCOUNT_ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    posted: Mapped[int] = mapped_column(BigInteger)
    held: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AccountShardRow(Base):
    __tablename__ = "ledger_account_shards"

    account_id: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.id"), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    posted: Mapped[int] = mapped_column(BigInteger)


class HoldRow(Base):
    __tablename__ = "ledger_holds"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("captured >= 0 AND captured <= amount", name="captured_within_amount"),
        CheckConstraint("status IN ('open', 'captured', 'released', 'expired')", name="status"),
        Index("ix_ledger_holds_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(HOLD_ID, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.id"), index=True)
    destination_id: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    captured: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(IDEMPOTENCY_KEY)
    reason: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EntryRow(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount_nonzero"),
        Index("ix_ledger_entries_account_id_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(ENTRY_ID, primary_key=True, autoincrement=True)
    transfer_id: Mapped[str] = mapped_column(String(32), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.id"))
    counterparty_id: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    hold_id: Mapped[str | None] = mapped_column(ForeignKey("ledger_holds.id"), nullable=True, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(IDEMPOTENCY_KEY, nullable=True)
    reason: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyRow(Base):
    __tablename__ = "ledger_idempotency"

    key: Mapped[str] = mapped_column(IDEMPOTENCY_KEY, primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    request: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


# Entries are append-only. The same statements run in migration 0002 and after `create_all`.
IMMUTABLE_ENTRIES_SQLITE = (
    "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END",
    "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END",
)
IMMUTABLE_ENTRIES_POSTGRESQL = (
    "CREATE OR REPLACE FUNCTION ledger_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'ledger entries are immutable' USING ERRCODE = 'restrict_violation'; END $$",
    "CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries "
    "FOR EACH ROW EXECUTE FUNCTION ledger_entries_immutable()",
)

for _sql in IMMUTABLE_ENTRIES_SQLITE:
    event.listen(EntryRow.__table__, "after_create", DDL(_sql).execute_if(dialect="sqlite"))
for _sql in IMMUTABLE_ENTRIES_POSTGRESQL:
    event.listen(EntryRow.__table__, "after_create", DDL(_sql).execute_if(dialect="postgresql"))
