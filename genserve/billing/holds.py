"""Two-phase transfers (TigerBeetle's pending/post/void): a hold, then its capture, release or expiry.

A hold moves buzz from the user's available balance into `held` without posting it anywhere.
Capture and release lock the hold's row before any account row and act only on an open hold, so
a hold is closed once. Capture posts at most the held amount to the hold's destination and gives
the rest back; release and expiry post nothing. A capture may split what it posts into legs (the platform,
resource owners, tips): one transfer with the holder's single debit and a credit per leg, the legs
summing exactly to the captured amount. Every hold expires: past its expiry a capture is
refused and the reaper (`reap_expired`) gives the buzz back, so a caller that dies never strands a
user's buzz.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from genserve.billing.accounts import (
    check_account,
    check_amount,
    check_key,
    check_reason,
    check_user_account,
    is_system_account,
)
from genserve.billing.errors import (
    CaptureExceedsHold,
    HoldClosed,
    HoldNotFound,
    InsufficientBuzz,
    InvalidAccount,
)
from genserve.billing.ledger_base import LedgerBase
from genserve.billing.records import HoldInfo, as_utc, read_ts
from genserve.billing.transactions import Tx
from genserve.core import metrics
from genserve.core.errors import InvalidRequest


class HoldOps(LedgerBase):
    """Holds on user accounts: reserve, capture, release, read, and reap the expired ones."""

    @staticmethod
    def _hold_from_row(row: Any) -> HoldInfo:
        hold_id, account, destination, amount, captured, status, key, reason, expires_at, created_at, closed_at = row
        return HoldInfo(
            id=hold_id, account=account, destination=destination, amount=amount, captured=captured, status=status,
            expires_at=read_ts(expires_at), key=key, reason=reason, created_at=read_ts(created_at),
            closed_at=read_ts(closed_at),
        )

    def _locked_open_hold(self, tx: Tx, hold_id: str, key: str, operation: str, request: str) -> HoldInfo | dict:
        """The open hold, locked; or the stored result when `key` was used before (a retry)."""
        row = tx.run("lock_hold_recall", {"id": hold_id, "key": key}).fetchone()
        if row is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        if row[11] is not None:
            return self._check_prior(key, operation, request, *row[11:])
        hold = self._hold_from_row(row[:11])
        if not hold.is_open:
            raise HoldClosed(
                f"hold {hold_id} is already {hold.status}", code=f"hold_{hold.status}", details={"hold": hold.to_dict()}
            )
        return hold

    def _close(self, tx: Tx, hold: HoldInfo, captured: int, now: dt.datetime,
               legs: tuple[tuple[str, int, str], ...] = ()) -> HoldInfo:
        """Unreserve the hold, post `captured` of it (to its destination, or split over `legs`, which
        sum to it), and mark it closed. Each leg is its own transfer of kind `leg kind`."""
        if not captured:
            legs = ()
        elif not legs:
            legs = ((hold.destination, captured, "capture"),)
        deltas: dict[str, tuple[int, int]] = {hold.account: (-captured, -hold.amount)}
        for destination, amount, _kind in legs:
            posted, _ = deltas.get(destination, (0, 0))
            deltas[destination] = (posted + amount, 0)
        # the hold's own destination exists (the hold created it); an owner paid by a leg may not yet
        credit = frozenset(d for d, _, _ in legs if d != hold.destination and not is_system_account(d))
        self._move(tx, deltas, credit=credit, now=now)
        if len(legs) == 1:
            destination, amount, kind = legs[0]
            self._write_transfer(
                tx, source=hold.account, destination=destination, amount=amount, kind=kind,
                key=hold.key, reason=hold.reason, now=now, hold_id=hold.id, need_entry=False,
            )
        elif legs:
            # one transfer: the holder's single debit (what the user sees as the charge) and a credit
            # per leg; its lines sum to zero like any transfer's
            common = {"transfer_id": uuid.uuid4().hex, "hold_id": hold.id, "key": hold.key, "reason": hold.reason,
                      "now": tx.ts(now)}
            tx.write("insert_entry", {**common, "account": hold.account, "counterparty": hold.destination,
                                      "amount": -captured, "kind": "capture"})
            for destination, amount, kind in legs:
                tx.write("insert_entry", {**common, "account": destination, "counterparty": hold.account,
                                          "amount": amount, "kind": kind})
        status = "captured" if captured else "released"
        tx.write("close_hold", {"id": hold.id, "captured": captured, "status": status, "now": tx.ts(now)})
        return replace(hold, captured=captured, status=status, closed_at=now)

    def hold(
        self,
        account: str,
        amount: int,
        key: str,
        *,
        destination: str,
        expires_at: dt.datetime | None = None,
        reason: str = "",
    ) -> HoldInfo:
        """Reserve `amount` of the user's available buzz for `destination` until `expires_at`.

        Raises InsufficientBuzz (402, `insufficient_funds`) when the available balance is short.
        """
        account = check_user_account(account)
        destination = check_account(destination)
        if destination == account:
            raise InvalidAccount("a hold cannot pay its own account", code="same_account")
        amount = check_amount(amount, self.config.max_amount)
        key = check_key(key)
        reason = check_reason(reason)
        if expires_at is not None and not isinstance(expires_at, dt.datetime):
            raise InvalidRequest("expires_at must be a datetime", code="invalid_expiry")
        request = self._request(account=account, destination=destination, amount=amount)
        fresh: list[bool] = []

        def tx_hold(tx: Tx) -> HoldInfo:
            fresh.clear()
            now = self._now()
            expires = now + dt.timedelta(seconds=self.config.default_hold_ttl_s) if expires_at is None else as_utc(expires_at)
            if not now < expires <= now + dt.timedelta(seconds=self.config.max_hold_ttl_s):
                prior = self._recall(tx, key, "hold", request)
                if prior is not None:
                    return HoldInfo.from_dict(prior)
                raise InvalidRequest(
                    f"expires_at must be in the future and within {self.config.max_hold_ttl_s} s",
                    code="invalid_expiry",
                )
            if not is_system_account(destination):
                self._insert_account(tx, destination, now)
            if tx.run("reserve_new", {"account": account, "amount": amount, "key": key}).rowcount != 1:
                prior = self._recall(tx, key, "hold", request)
                if prior is not None:
                    return HoldInfo.from_dict(prior)
                row = tx.run("balance", {"account": account}).fetchone()
                available = row[0] - row[1] if row else 0
                raise InsufficientBuzz(
                    f"{account} has {available} buzz available, {amount} needed",
                    details={"account": account, "available": available, "needed": amount},
                )
            hold = HoldInfo(
                id=uuid.uuid4().hex, account=account, destination=destination, amount=amount, captured=0,
                status="open", expires_at=expires, key=key, reason=reason, created_at=now,
            )
            tx.write(
                "insert_hold",
                {"id": hold.id, "account": account, "destination": destination, "amount": amount, "key": key,
                 "reason": reason, "expires_at": tx.ts(expires), "now": tx.ts(now)},
            )
            self._remember(tx, key, "hold", request, hold.to_dict(), now)
            fresh.append(True)
            return hold

        hold = self._run(tx_hold)
        if fresh:
            metrics.inc("genserve_buzz_total", amount, operation="held", destination=destination)
        return hold

    def capture(self, hold_id: str, amount: int, key: str, *,
                legs: Sequence[tuple[str, int, str]] | None = None) -> HoldInfo:
        """Post `amount` (<= the hold) to the hold's destination and void the rest; 0 is a release.

        With `legs` ((destination, amount, kind), ...) the posted amount is split between several
        accounts (the platform, resource owners, tips) in the same transaction: the legs must sum
        to `amount` exactly, so a multi-party capture creates and loses nothing.
        """
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        amount = check_amount(amount, self.config.max_amount, allow_zero=True)
        key = check_key(key)
        checked = check_legs(legs, amount, self.config.max_amount) if legs else ()
        if checked:
            request = self._request(hold_id=hold_id, amount=amount, legs=[list(leg) for leg in checked])
        else:
            request = self._request(hold_id=hold_id, amount=amount)

        def close_capture(tx: Tx, hold: HoldInfo, now: dt.datetime) -> HoldInfo:
            if now >= hold.expires_at:
                raise HoldClosed(
                    f"hold {hold_id} expired at {hold.expires_at.isoformat()}; its buzz goes back to the user",
                    code="hold_expired",
                    details={"hold": hold.to_dict()},
                )
            if amount > hold.amount:
                raise CaptureExceedsHold(
                    f"capture of {amount} exceeds hold {hold_id} of {hold.amount}",
                    details={"hold_id": hold_id, "held": hold.amount, "requested": amount},
                )
            if any(destination == hold.account for destination, _, _ in checked):
                raise InvalidAccount("a capture leg cannot pay the holder's own account", code="same_account")
            return self._close(tx, hold, amount, now, checked)

        return self._settle(hold_id, key, "capture", request, close_capture)

    def release(self, hold_id: str, key: str) -> HoldInfo:
        """Void an open hold (also allowed past its expiry time, before the reaper gets to it)."""
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        key = check_key(key)
        request = self._request(hold_id=hold_id)
        return self._settle(hold_id, key, "release", request, lambda tx, hold, now: self._close(tx, hold, 0, now))

    def _settle(self, hold_id: str, key: str, op: str, request: str,
                close: Callable[[Tx, HoldInfo, dt.datetime], HoldInfo]) -> HoldInfo:
        """Close an open hold once under idempotency `key`: a replay of `key` answers what it answered
        before; `close` (the operation's own checks, then the postings) runs only on a fresh call."""
        fresh: list[bool] = []

        def tx_settle(tx: Tx) -> HoldInfo:
            fresh.clear()
            hold = self._locked_open_hold(tx, hold_id, key, op, request)
            if isinstance(hold, dict):
                return HoldInfo.from_dict(hold)
            now = self._now()
            done = close(tx, hold, now)
            self._remember(tx, key, op, request, done.to_dict(), now)
            fresh.append(True)
            return done

        done = self._run(tx_settle)
        if fresh:
            _record_close(done)
        return done

    def get_hold(self, hold_id: str) -> HoldInfo:
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        if not self._system_ready:
            self._create_system_accounts()
        rows = self._read("get_hold", {"id": hold_id})
        if not rows:
            raise HoldNotFound(f"no hold {hold_id!r}")
        return self._hold_from_row(rows[0])

    def reap_expired(self, now: dt.datetime | None = None, *, batch: int = 500) -> int:
        """Void every open hold whose expiry has passed; returns how many. Safe to run anywhere, any time."""
        now = as_utc(now) if now is not None else self._now()

        def tx_reap(tx: Tx) -> int:
            rows = tx.run("expired_holds", {"now": tx.ts(now), "batch": batch}).fetchall()
            per_account: dict[str, int] = {}
            for _hold_id, account, amount in rows:
                per_account[account] = per_account.get(account, 0) + amount
            self._move(tx, {account: (0, -held) for account, held in per_account.items()})
            if rows:
                for r in rows:
                    tx.write("expire_hold", {"id": r[0], "now": tx.ts(now)})
            return len(rows)

        total = 0
        while True:
            n = self._run(tx_reap)
            total += n
            if n < batch:
                return total


LEG_KINDS = ("capture", "licence_fee", "creator_tip", "platform_tip", "platform_share", "priority_fee",
             "early_access")


def check_legs(legs: Sequence[tuple[str, int, str]], amount: int, max_amount: int) -> tuple[tuple[str, int, str], ...]:
    """Legs merged by (destination, kind) in a stable order, zero legs dropped; they must sum to `amount`."""
    merged: dict[tuple[str, str], int] = {}
    for leg in legs:
        if not isinstance(leg, (tuple, list)) or len(leg) != 3:
            raise InvalidRequest("a capture leg is (destination, amount, kind)", code="invalid_leg")
        destination, leg_amount, kind = leg
        destination = check_account(destination)
        leg_amount = check_amount(leg_amount, max_amount, allow_zero=True)
        if kind not in LEG_KINDS:
            raise InvalidRequest(f"leg kind must be one of {LEG_KINDS}, got {kind!r}", code="invalid_leg")
        merged[(destination, kind)] = merged.get((destination, kind), 0) + leg_amount
    if sum(merged.values()) != amount:
        raise InvalidRequest(f"capture legs sum to {sum(merged.values())}, not the captured {amount}",
                             code="legs_mismatch", details={"amount": amount, "legs": sum(merged.values())})
    return tuple((d, a, k) for (d, k), a in sorted(merged.items()) if a)


def _record_close(hold: HoldInfo) -> None:
    """Metrics for a hold this call closed: what was posted and what went back to the user."""
    metrics.inc("genserve_buzz_total", hold.captured, operation="captured", destination=hold.destination)
    metrics.inc("genserve_buzz_total", hold.amount - hold.captured, operation="released", destination=hold.destination)
