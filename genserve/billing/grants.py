"""Grants: the only way buzz enters user accounts, and each user's history of entries.

A grant debits a system account (`mint` for admin grants, purchases and compensation, `promo`
for the daily allowance) and credits the user, so the sum of all entries stays zero. The daily
allowance's idempotency key is derived from the user and the UTC day, so it is given at most once
per user per day however many calls ask for it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from genserve.billing import models
from genserve.billing.accounts import (
    GRANT_KINDS,
    MINT,
    PROMO,
    check_account,
    check_amount,
    check_key,
    check_reason,
    check_user_account,
)
from genserve.billing.ledger_base import LedgerBase
from genserve.billing.records import LedgerEntry, as_utc
from genserve.billing.transactions import Tx
from genserve.core.errors import InvalidRequest

entries_t = models.EntryRow.__table__


class GrantOps(LedgerBase):
    """Credits to users from system accounts, and reads of an account's entries."""

    def _credit_user(
        self, tx: Tx, source: str, account: str, amount: int, key: str, kind: str, reason: str, now: dt.datetime
    ) -> LedgerEntry:
        self._insert_account(tx, account, now)
        self._move(tx, {account: (amount, 0), source: (-amount, 0)})
        return self._write_transfer(
            tx, source=source, destination=account, amount=amount, kind=kind, key=key, reason=reason, now=now
        )

    def grant(self, account: str, amount: int, key: str, *, kind: str = "admin_grant", reason: str = "") -> LedgerEntry:
        """Credit a user from `mint` (admin grant, purchase, compensation); returns the user's entry."""
        account = check_user_account(account)
        amount = check_amount(amount, self.config.max_amount)
        key = check_key(key)
        reason = check_reason(reason)
        if kind not in GRANT_KINDS:
            raise InvalidRequest(f"grant kind must be one of {GRANT_KINDS}, got {kind!r}", code="invalid_grant_kind")
        request = self._request(account=account, amount=amount, kind=kind)

        def tx_grant(tx: Tx) -> LedgerEntry:
            prior = self._recall(tx, key, "grant", request)
            if prior is not None:
                return LedgerEntry.from_dict(prior)
            now = self._now()
            entry = self._credit_user(tx, MINT, account, amount, key, kind, reason, now)
            self._remember(tx, key, "grant", request, entry.to_dict(), now)
            return entry

        return self._run(tx_grant)

    def daily_allowance(self, account: str, *, day: dt.date | None = None) -> LedgerEntry | None:
        """Grant the free daily buzz from `promo`, once per user per UTC day.

        Returns the entry this call created, or None when that day's allowance was already given
        (or the allowance is configured to 0).
        """
        account = check_user_account(account)
        amount = self.config.daily_allowance
        if day is None:
            day = self._now().date()
        elif not isinstance(day, dt.date) or isinstance(day, dt.datetime):
            raise InvalidRequest("day must be a date", code="invalid_day")
        if amount == 0:
            return None
        key = f"daily_allowance:{account}:{day.isoformat()}"
        request = self._request(account=account, day=day.isoformat())

        def tx_allowance(tx: Tx) -> LedgerEntry | None:
            if self._recall(tx, key, "daily_allowance", request) is not None:
                return None
            now = self._now()
            entry = self._credit_user(
                tx, PROMO, account, amount, key, "daily_allowance", f"daily allowance {day.isoformat()}", now
            )
            self._remember(tx, key, "daily_allowance", request, entry.to_dict(), now)
            return entry

        return self._run(tx_allowance)

    def hold_entries(self, hold_id: str) -> list[LedgerEntry]:
        """Every entry posted for a hold (each capture leg's debit and credit), oldest first."""
        e = entries_t.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(entries_t).where(e.hold_id == hold_id).order_by(e.id))
            return [_entry(r) for r in rows]

    def history(self, account: str, limit: int = 100) -> list[LedgerEntry]:
        """The account's entries, newest first."""
        account = check_account(account)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest("limit must be a positive integer", code="invalid_limit")
        e = entries_t.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(entries_t).where(e.account_id == account).order_by(e.id.desc()).limit(limit))
            return [_entry(r) for r in rows]


def _entry(r) -> LedgerEntry:  # noqa: ANN001 - a row of ledger_entries
    return LedgerEntry(
        id=r.id, transfer_id=r.transfer_id, account=r.account_id, counterparty=r.counterparty_id,
        amount=r.amount, kind=r.kind, hold_id=r.hold_id, key=r.idempotency_key, reason=r.reason,
        created_at=as_utc(r.created_at),
    )
