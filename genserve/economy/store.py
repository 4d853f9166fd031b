"""`Economy`: owners' terms on their resources, early access and its unlocks, receipts and earnings.

Money moves only through the ledger. An unlock or a contribution is a hold on the buyer's buzz and
a capture whose legs pay the owner (less the platform share) under keys derived from the call's
idempotency key, then a `resource_unlocks` row under the same key: a retry after a crash anywhere
finds the same hold, the same capture and at most one row, so an unlock is paid once.

Early access: while `now < early_access_until` (and no contribution goal was reached) only the
owner and users holding an unrefunded purchase may generate with or download the resource. Time is
part of every check, so the window ends by itself: nothing has to run when it does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from genserve.billing import models as ledger_models
from genserve.billing.accounts import REVENUE_GENERATION, check_key, user_account
from genserve.billing.economy import CreatorTerms, split_owner_income
from genserve.billing.ledger import Ledger
from genserve.billing.records import as_utc, iso, utcnow
from genserve.core.config.billing import BillingConfig
from genserve.core.db import Database
from genserve.core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from genserve.economy.models import ResourceTermsRow, UnlockRow
from genserve.resources.models import Resource

UNLOCK_HOLD_TTL_S = 120
INCOME_KINDS = ("licence_fee", "creator_tip", "early_access")


class EarlyAccessLocked(Forbidden):
    code = "early_access"


@dataclass(frozen=True)
class Terms:
    resource_id: str
    owner_user_id: str | None
    licence_fee: int
    early_access_until: dt.datetime | None
    unlock_price: int
    contribution_goal: int | None
    contributed: int
    goal_reached_at: dt.datetime | None

    def early_access_open(self, now: dt.datetime) -> bool:
        """Whether the resource is still restricted to unlockers at `now`."""
        return (self.early_access_until is not None and now < self.early_access_until
                and self.goal_reached_at is None)

    def to_dict(self, now: dt.datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {"resource_id": self.resource_id, "owner": self.owner_user_id, "licence_fee": self.licence_fee,
                "early_access_until": iso(self.early_access_until), "unlock_price": self.unlock_price,
                "contribution_goal": self.contribution_goal, "contributed": self.contributed,
                "goal_reached_at": iso(self.goal_reached_at), "early_access": self.early_access_open(now)}


def _terms(resource: Resource, row: ResourceTermsRow | None) -> Terms:
    def ts(v: dt.datetime | None) -> dt.datetime | None:
        return None if v is None else as_utc(v)

    return Terms(
        resource_id=resource.id, owner_user_id=resource.owner_user_id,
        licence_fee=row.licence_fee if row else 0, early_access_until=ts(row.early_access_until) if row else None,
        unlock_price=row.unlock_price if row else 0, contribution_goal=row.contribution_goal if row else None,
        contributed=row.contributed if row else 0, goal_reached_at=ts(row.goal_reached_at) if row else None,
    )


class Economy:
    def __init__(self, db: Database, ledger: Ledger, config: BillingConfig | None = None):
        self.db = db
        self.ledger = ledger
        self.config = (config or ledger.config).economy

    def _now(self) -> dt.datetime:
        return self.ledger._now()  # one clock with the ledger (tests move it there)

    # -- terms ------------------------------------------------------------------------------------

    def terms(self, resource_ids: Iterable[str]) -> dict[str, Terms]:
        ids = list(dict.fromkeys(resource_ids))
        with self.db.session() as s:
            rows = s.execute(
                select(Resource, ResourceTermsRow)
                .outerjoin(ResourceTermsRow, ResourceTermsRow.resource_id == Resource.id)
                .where(Resource.id.in_(ids))
            ).all()
        return {res.id: _terms(res, row) for res, row in rows}

    def get_terms(self, resource_id: str) -> Terms:
        found = self.terms([resource_id]).get(resource_id)
        if found is None:
            raise NotFound(f"no resource {resource_id}", code="resource_not_found", details={"id": resource_id})
        return found

    def set_terms(self, owner: str, resource_id: str, *, licence_fee: int | None = None,
                  early_access_days: int | None = None, unlock_price: int | None = None,
                  contribution_goal: int | None = None, admin: bool = False) -> Terms:
        """The owner's (or an admin's) licence fee and early-access window on a resource. A window is
        counted from now; `early_access_days=0` ends it."""
        cfg = self.config
        _bounded("licence_fee", licence_fee, cfg.licence_fee_cap)
        _bounded("early_access_days", early_access_days, cfg.early_access_max_days)
        _bounded("unlock_price", unlock_price, cfg.unlock_price_cap)
        _bounded("contribution_goal", contribution_goal, cfg.max_contribution_goal)
        now = self._now()
        with self.db.transaction() as s:
            res = s.get(Resource, resource_id)
            if res is None or (not admin and res.owner_user_id != owner):
                raise NotFound(f"no resource {resource_id} of yours", code="resource_not_found",
                               details={"id": resource_id})
            if res.owner_user_id is None:
                raise InvalidRequest("a resource without an owner has no one to pay", code="resource_has_no_owner")
            row = s.get(ResourceTermsRow, resource_id, with_for_update=True)
            if row is None:
                row = ResourceTermsRow(resource_id=resource_id, licence_fee=0, unlock_price=0, contributed=0,
                                       updated_at=now)
                s.add(row)
            if licence_fee is not None:
                row.licence_fee = licence_fee
            if unlock_price is not None:
                row.unlock_price = unlock_price
            if contribution_goal is not None:
                row.contribution_goal = contribution_goal or None
            if early_access_days is not None:
                until = row.early_access_until and as_utc(row.early_access_until)
                if early_access_days and (until is None or until <= now):  # a new window starts from nothing
                    row.contributed, row.goal_reached_at = 0, None
                row.early_access_until = now + dt.timedelta(days=early_access_days) if early_access_days else None
            if row.early_access_until is not None and row.early_access_until > now and not row.unlock_price:
                raise InvalidRequest("an early-access window needs an unlock price", code="unlock_price_required")
            row.updated_at = now
            s.flush()
            return _terms(res, row)

    # -- admission --------------------------------------------------------------------------------

    def admit(self, resource_ids: Sequence[str], user_id: str) -> list[CreatorTerms]:
        """The creator terms of a request's resources (in request order), after refusing any still in
        early access that `user_id` has not unlocked (403 `early_access`)."""
        terms = self.terms(resource_ids)
        self._check_access([terms[r] for r in resource_ids if r in terms], user_id)
        return [CreatorTerms(t.resource_id, t.owner_user_id, t.licence_fee)
                for r in resource_ids if (t := terms.get(r)) is not None]

    def check_download(self, resource_id: str, user_id: str) -> None:
        """Downloads follow the same early-access rule as generation."""
        self._check_access([self.get_terms(resource_id)], user_id)

    def _check_access(self, terms: Sequence[Terms], user_id: str) -> None:
        now = self._now()
        locked = [t for t in terms if t.early_access_open(now) and t.owner_user_id != user_id]
        if not locked:
            return
        with self.db.session() as s:
            unlocked = set(s.scalars(
                select(UnlockRow.resource_id).where(
                    UnlockRow.resource_id.in_([t.resource_id for t in locked]), UnlockRow.user_id == user_id,
                    UnlockRow.kind == "purchase", UnlockRow.refunded_at.is_(None))))
        refused = [t for t in locked if t.resource_id not in unlocked]
        if refused:
            raise EarlyAccessLocked(
                "in early access: unlock it, or wait until the window ends",
                details={"resources": [{"id": t.resource_id, "unlock_price": t.unlock_price,
                                        "public_at": iso(t.early_access_until)} for t in refused]})

    # -- unlocks and contributions ----------------------------------------------------------------

    def unlock(self, user_id: str, resource_id: str) -> dict[str, Any]:
        """Buy early access (one-time, paid to the owner less the platform share). Idempotent: a second
        call returns the first unlock and charges nothing."""
        return self._pay(user_id, resource_id, "purchase", None, f"unlock:{resource_id}:{user_id}")

    def contribute(self, user_id: str, resource_id: str, amount: int, key: str) -> dict[str, Any]:
        """Give `amount` toward the resource's contribution goal; reaching it makes the resource
        public at once. Idempotent per `key`."""
        key = check_key(key)
        return self._pay(user_id, resource_id, "contribution", amount, f"contrib:{resource_id}:{user_id}:{key}")

    def _pay(self, user_id: str, resource_id: str, kind: str, amount: int | None, key: str) -> dict[str, Any]:
        with self.db.session() as s:
            done = s.scalar(select(UnlockRow).where(UnlockRow.idempotency_key == key))
            if done is not None:
                return _unlock_dict(done) | {"repeated": True}
        terms = self.get_terms(resource_id)
        now = self._now()
        if terms.owner_user_id is None or not terms.early_access_open(now):
            raise Conflict(f"{resource_id} is not in early access", code="not_in_early_access")
        if terms.owner_user_id == user_id:
            raise InvalidRequest("owners do not pay for their own resources", code="own_resource")
        if kind == "purchase":
            amount = terms.unlock_price
        elif not terms.contribution_goal:
            raise Conflict(f"{resource_id} has no contribution goal", code="no_contribution_goal")
        elif isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise InvalidRequest("a contribution is a whole number of buzz > 0", code="invalid_amount")
        assert amount is not None
        hold = self.ledger.hold(user_account(user_id), amount, f"{key}:hold", destination=REVENUE_GENERATION,
                                expires_at=now + dt.timedelta(seconds=UNLOCK_HOLD_TTL_S),
                                reason=f"early access {kind} {resource_id}")
        legs = split_owner_income(terms.owner_user_id, amount, "early_access", self.config)
        self.ledger.capture(hold.id, amount, f"{key}:capture", legs=legs)
        try:
            with self.db.transaction() as s:
                row = UnlockRow(resource_id=resource_id, user_id=user_id, kind=kind, amount=amount,
                                idempotency_key=key, hold_id=hold.id, created_at=now)
                s.add(row)
                s.flush()
                if kind == "contribution":
                    s.execute(update(ResourceTermsRow).where(ResourceTermsRow.resource_id == resource_id)
                              .values(contributed=ResourceTermsRow.contributed + amount))
                    s.execute(update(ResourceTermsRow).where(
                        ResourceTermsRow.resource_id == resource_id, ResourceTermsRow.goal_reached_at.is_(None),
                        ResourceTermsRow.contribution_goal.is_not(None),
                        ResourceTermsRow.contributed >= ResourceTermsRow.contribution_goal,
                    ).values(goal_reached_at=now))
                result = _unlock_dict(row)
        except IntegrityError:  # a concurrent retry with the same key recorded it first
            with self.db.session() as s:
                return _unlock_dict(s.scalar(select(UnlockRow).where(UnlockRow.idempotency_key == key))) | {
                    "repeated": True}
        return result | {"repeated": False, "terms": self.get_terms(resource_id).to_dict(now)}

    def refund(self, unlock_id: int, reason: str = "") -> dict[str, Any]:
        """Admin only: give an unlock's or contribution's buzz back (from `mint`, as compensation) and
        revoke the unlock. Idempotent per unlock."""
        now = self._now()
        with self.db.transaction() as s:
            row = s.get(UnlockRow, unlock_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no unlock {unlock_id}", code="unlock_not_found")
            if row.refunded_at is None:
                row.refunded_at = now
            out = _unlock_dict(row)
        self.ledger.grant(user_account(out["user_id"]), out["amount"], f"unlock-refund:{unlock_id}",
                          kind="compensation", reason=(reason or f"refund of early access {out['kind']}")[:200])
        return out

    def unlocks(self, resource_id: str) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(UnlockRow).where(UnlockRow.resource_id == resource_id).order_by(UnlockRow.id))
            return [_unlock_dict(r) for r in rows]

    # -- earnings ---------------------------------------------------------------------------------

    def earnings(self, user_id: str, since: dt.datetime | None = None, until: dt.datetime | None = None
                 ) -> dict[str, Any]:
        """What an owner earned (net of the platform share) by kind over [since, until)."""
        e = ledger_models.EntryRow
        q = (select(e.kind, func.count(), func.coalesce(func.sum(e.amount), 0))
             .where(e.account_id == user_account(user_id), e.kind.in_(INCOME_KINDS), e.amount > 0))
        if since is not None:
            q = q.where(e.created_at >= since)
        if until is not None:
            q = q.where(e.created_at < until)
        with self.db.session() as s:
            rows = s.execute(q.group_by(e.kind)).all()
        by_kind = {kind: {"entries": int(n), "amount": int(total)} for kind, n, total in rows}
        return {"user_id": user_id, "since": iso(since), "until": iso(until), "by_kind": by_kind,
                "total": sum(v["amount"] for v in by_kind.values()),
                "platform_share_pct": self.config.platform_share_pct}


def _bounded(name: str, value: Any, cap: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cap:
        raise InvalidRequest(f"{name} must be a whole number 0..{cap}", code=f"invalid_{name}",
                             details={name: value, "max": cap})


def _unlock_dict(row: UnlockRow) -> dict[str, Any]:
    return {"id": row.id, "resource_id": row.resource_id, "user_id": row.user_id, "kind": row.kind,
            "amount": row.amount, "hold_id": row.hold_id, "created_at": iso(as_utc(row.created_at)),
            "refunded_at": iso(as_utc(row.refunded_at)) if row.refunded_at else None}
