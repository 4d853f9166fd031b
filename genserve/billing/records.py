"""What the ledger returns: balances, holds, entries and the verification report.

They are frozen snapshots (the report aside), never live rows. Holds and entries round-trip
through a dict because an idempotent retry returns the stored first result rather than re-reading
the tables. Times are aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    """Aware UTC datetime; naive values (SQLite reads) are taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


def _from_iso(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def read_ts(value: Any) -> dt.datetime | None:
    """A timestamp column as the DBAPI returns it (text on SQLite, datetime on PostgreSQL)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return as_utc(value)


@dataclass(frozen=True)
class Balance:
    """`available` = `posted` - `held`: what a new hold may reserve."""

    posted: int
    held: int
    available: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class HoldInfo:
    id: str
    account: str
    destination: str
    amount: int
    captured: int
    status: str  # open | captured | released | expired
    expires_at: dt.datetime
    key: str
    reason: str = ""
    created_at: dt.datetime | None = None
    closed_at: dt.datetime | None = None

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    @property
    def remaining(self) -> int:
        """Buzz still reserved by this hold."""
        return self.amount - self.captured if self.is_open else 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("expires_at", "created_at", "closed_at"):
            d[k] = iso(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HoldInfo:
        d = dict(d)
        for k in ("expires_at", "created_at", "closed_at"):
            d[k] = _from_iso(d[k])
        return cls(**d)


@dataclass(frozen=True)
class LedgerEntry:
    """One line of a transfer, seen from `account`: `amount` > 0 credits it, < 0 debits it."""

    id: int
    transfer_id: str
    account: str
    counterparty: str
    amount: int
    kind: str
    hold_id: str | None
    key: str | None
    reason: str
    created_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["created_at"] = iso(self.created_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        d = dict(d)
        d["created_at"] = _from_iso(d["created_at"])
        return cls(**d)


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
