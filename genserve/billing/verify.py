"""Reconciliation: the ledger's invariants, checked from the raw tables.

- All entries sum to zero, and so does each transfer (every debit has its credit).
- An account's posted balance (its row plus, for system accounts, its shards) equals the sum of
  its entries, and its `held` equals the sum of its open holds; `held` is never negative.
- A user's posted and available balances are never negative.
- A hold never captures more than its amount, and the entries posted for it match `captured`: the
  holder's debits and the legs' credits (several parties on a multi-party capture) each sum to it.
- No hold stays open longer than `expired_hold_grace_s` past its expiry (the reaper runs).

The checks read the tables with their own queries rather than the ledger's write path, so a bug
in that path cannot hide itself.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from genserve.billing import models
from genserve.billing.ledger_base import LedgerBase
from genserve.billing.records import VerifyReport, as_utc, iso

accounts_t = models.AccountRow.__table__
holds_t = models.HoldRow.__table__
shards_t = models.AccountShardRow.__table__
entries_t = models.EntryRow.__table__


class Verification(LedgerBase):
    """`verify`: reads only, never changes anything."""

    def verify(self, now: dt.datetime | None = None) -> VerifyReport:
        """Check the ledger's invariants from the raw tables; never changes anything."""
        now = as_utc(now) if now is not None else self._now()
        problems: list[str] = []
        e, a, h, sh = entries_t.c, accounts_t.c, holds_t.c, shards_t.c
        with self.db.engine.connect() as conn:
            total = conn.execute(select(func.coalesce(func.sum(e.amount), 0))).scalar_one()
            if total != 0:
                problems.append(f"entries sum to {total}, not 0")
            unbalanced = conn.execute(
                select(e.transfer_id, func.sum(e.amount))
                .group_by(e.transfer_id)
                .having(func.sum(e.amount) != 0)
                .limit(20)
            ).all()
            problems += [f"transfer {t} is unbalanced by {s}" for t, s in unbalanced]

            entry_sums = select(e.account_id, func.sum(e.amount).label("s")).group_by(e.account_id).subquery()
            open_held = (
                select(h.account_id, func.sum(h.amount).label("s"))
                .where(h.status == "open")
                .group_by(h.account_id)
                .subquery()
            )
            shard_sums = (
                select(sh.account_id, func.sum(sh.posted).label("s")).group_by(sh.account_id).subquery()
            )
            accounts = conn.execute(
                select(
                    a.id,
                    a.kind,
                    a.posted + func.coalesce(shard_sums.c.s, 0),
                    a.held,
                    func.coalesce(entry_sums.c.s, 0),
                    func.coalesce(open_held.c.s, 0),
                )
                .outerjoin(shard_sums, shard_sums.c.account_id == a.id)
                .outerjoin(entry_sums, entry_sums.c.account_id == a.id)
                .outerjoin(open_held, open_held.c.account_id == a.id)
            ).all()
            for account, kind, posted, held, entry_sum, held_sum in accounts:
                if posted != entry_sum:
                    problems.append(f"{account}: posted balance {posted} != sum of its entries {entry_sum}")
                if held != held_sum:
                    problems.append(f"{account}: held {held} != sum of its open holds {held_sum}")
                if held < 0:
                    problems.append(f"{account}: held is negative ({held})")
                if kind == "user" and (posted < 0 or posted - held < 0):
                    problems.append(f"{account}: negative user balance (posted {posted}, held {held})")

            over = conn.execute(select(h.id, h.amount, h.captured).where(h.captured > h.amount).limit(20)).all()
            problems += [f"hold {i} captured {c} beyond its amount {amt}" for i, amt, c in over]
            # a capture's legs (one transfer per party paid) sum to the captured amount, on both sides:
            # what the holder was debited and what the parties were credited
            posted_by_hold = func.coalesce(func.sum(e.amount), 0)
            mismatched = conn.execute(
                select(h.id, h.status, h.captured, posted_by_hold)
                .outerjoin(entries_t, (e.hold_id == h.id) & (e.account_id != h.account_id))
                .group_by(h.id, h.status, h.captured)
                .having(posted_by_hold != h.captured)
                .limit(20)
            ).all()
            problems += [f"hold {i} ({s}) records {c} captured but its legs post {p}" for i, s, c, p in mismatched]
            debited_by_hold = func.coalesce(func.sum(e.amount), 0)
            mismatched = conn.execute(
                select(h.id, h.status, h.captured, debited_by_hold)
                .outerjoin(entries_t, (e.hold_id == h.id) & (e.account_id == h.account_id))
                .group_by(h.id, h.status, h.captured)
                .having(-debited_by_hold != h.captured)
                .limit(20)
            ).all()
            problems += [f"hold {i} ({s}) records {c} captured but debits its account {-d}"
                         for i, s, c, d in mismatched]
            grace = now - dt.timedelta(seconds=self.config.expired_hold_grace_s)
            stale = conn.execute(
                select(h.id, h.expires_at).where(h.status == "open", h.expires_at < grace).limit(20)
            ).all()
            problems += [f"hold {i} is open past its expiry {iso(as_utc(x))} (run the reaper)" for i, x in stale]

            stats = {
                "accounts": len(accounts),
                "entries": conn.execute(select(func.count()).select_from(entries_t)).scalar_one(),
                "holds_open": conn.execute(select(func.count()).where(h.status == "open")).scalar_one(),
                "holds_total": conn.execute(select(func.count()).select_from(holds_t)).scalar_one(),
            }
        return VerifyReport(ok=not problems, problems=problems, stats=stats)
