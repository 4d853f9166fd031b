"""Economy tables (migration 0007): what an owner sets on a resource, and who unlocked or contributed.

- `resource_terms`: one row per resource whose owner set a licence fee or an early-access window.
  `early_access_until` is part of every access check (no job flips it): after that instant the
  resource is public. `goal_reached_at` is set in the transaction whose contribution reaches the
  goal, which makes it public early.
- `resource_unlocks`: one row per paid unlock (`purchase`) or contribution; the buzz itself moved in
  the ledger under the same idempotency key. An admin refund sets `refunded_at` (the unlock is gone).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from genserve.core.db import Base
from genserve.resources import models as _resources  # noqa: F401 - the `resources` table the keys point at

ENTRY_ID = BigInteger().with_variant(Integer(), "sqlite")


class ResourceTermsRow(Base):
    __tablename__ = "resource_terms"
    __table_args__ = (
        CheckConstraint("licence_fee >= 0", name="licence_fee_nonnegative"),
        CheckConstraint("unlock_price >= 0", name="unlock_price_nonnegative"),
        CheckConstraint("contributed >= 0", name="contributed_nonnegative"),
    )

    resource_id: Mapped[str] = mapped_column(ForeignKey("resources.id"), primary_key=True)
    licence_fee: Mapped[int] = mapped_column(Integer, default=0)
    early_access_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    unlock_price: Mapped[int] = mapped_column(BigInteger, default=0)
    contribution_goal: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    contributed: Mapped[int] = mapped_column(BigInteger, default=0)
    goal_reached_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class UnlockRow(Base):
    __tablename__ = "resource_unlocks"
    __table_args__ = (
        CheckConstraint("kind IN ('purchase', 'contribution')", name="kind"),
        CheckConstraint("amount > 0", name="amount_positive"),
        Index("ix_resource_unlocks_resource_user", "resource_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(ENTRY_ID, primary_key=True, autoincrement=True)
    resource_id: Mapped[str] = mapped_column(ForeignKey("resources.id"))
    user_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    hold_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    refunded_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
