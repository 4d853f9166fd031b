"""The safety audit log: every decision, appended to a hash chain so edits show.

Each row's `row_hash` is SHA-256 over a canonical JSON of its fields (id included) and the previous
row's hash. Ids run 1, 2, 3 ... assigned by the appender, so a deleted row leaves a gap, an edited or
moved row no longer matches its hash, and `verify()` names the first bad row. Appends are serialised:
SQLite by `BEGIN IMMEDIATE` (the service's engine starts every transaction so), PostgreSQL by a
transaction-level advisory lock; a lost race on the id is retried.
Deleting the newest rows is only visible against a head (id, hash) recorded elsewhere: `verify()`
reports the head for that purpose.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from safety.errors import SafetyError
from safety.store import AuditRow
from safety.verdict import Verdict

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key for appends ("safe audit" in hex-speak; any fixed int64 works).
_PG_LOCK_KEY = 0x5AFE_A0D1_7000_0001
_RETRIES = 8

SessionFactory = Callable[[], Session]

_TABLE = AuditRow.__table__
_HEAD = select(_TABLE.c.id, _TABLE.c.row_hash).order_by(_TABLE.c.id.desc()).limit(1)
_INSERT = insert(_TABLE)


def _canonical_ts(ts: dt.datetime) -> str:
    """UTC, microseconds; SQLite hands back naive UTC datetimes, PostgreSQL aware ones."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.timezone.utc)
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_safe(value: Any) -> Any:
    """The value as it will read back from a JSON column (so the hash stays valid after a round trip)."""
    try:
        return json.loads(json.dumps(value, default=str, allow_nan=False))
    except ValueError as exc:
        raise SafetyError(f"audit details are not JSON-serialisable: {exc}", code="audit_invalid") from exc


def row_digest(*, id: int, ts: dt.datetime, kind: str, action: str, rules: list, subject_hashes: list,  # noqa: A002
               request_id: str | None, job_id: str | None, user_id: str | None, details: dict, prev_hash: str) -> str:
    body = {
        "id": id, "ts": _canonical_ts(ts), "kind": kind, "action": action, "rules": rules,
        "subject_hashes": subject_hashes, "request_id": request_id, "job_id": job_id, "user_id": user_id,
        "details": details, "prev_hash": prev_hash,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _digest_of(row: AuditRow) -> str:
    return row_digest(id=row.id, ts=row.ts, kind=row.kind, action=row.action, rules=row.rules,
                      subject_hashes=row.subject_hashes, request_id=row.request_id, job_id=row.job_id,
                      user_id=row.user_id, details=row.details, prev_hash=row.prev_hash)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    ts: str
    kind: str
    action: str
    rules: list[str]
    subject_hashes: list[str]
    request_id: str | None
    job_id: str | None
    user_id: str | None
    details: dict
    prev_hash: str
    row_hash: str

    @classmethod
    def of(cls, row: AuditRow) -> AuditRecord:
        return cls(id=row.id, ts=_canonical_ts(row.ts), kind=row.kind, action=row.action, rules=list(row.rules),
                   subject_hashes=list(row.subject_hashes), request_id=row.request_id, job_id=row.job_id,
                   user_id=row.user_id, details=dict(row.details), prev_hash=row.prev_hash, row_hash=row.row_hash)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AuditVerifyReport:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    problem: str | None = None  # row_hash_mismatch | prev_hash_mismatch | id_gap
    message: str = ""
    head_id: int | None = None
    head_hash: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class AuditLog:
    """Append-only, hash-chained log of safety decisions in the service database."""

    def __init__(self, session_factory: SessionFactory):
        self._sessions = session_factory

    def append(self, kind: str, action: str, *, rules: Iterable[str] = (), subject: str | Iterable[str] | None = None,
               request_id: str | None = None, job_id: str | None = None, user_id: str | None = None,
               details: Mapping[str, Any] | None = None, session: Session | None = None) -> AuditRecord:
        """Append one decision. With `session`, the row joins the caller's transaction (and commits with it)."""
        fields = {
            "kind": kind, "action": action, "rules": [str(r) for r in rules],
            "subject_hashes": [subject] if isinstance(subject, str) else [str(s) for s in subject or ()],
            "request_id": request_id, "job_id": job_id, "user_id": user_id,
            "details": _json_safe(dict(details or {})),
        }
        if session is not None:
            return self._append_in(session, fields)
        for attempt in range(_RETRIES):
            try:
                with self._sessions() as s, s.begin():
                    return self._append_in(s, fields)
            except (IntegrityError, OperationalError) as exc:  # lost the race for the next id / lock busy
                if attempt == _RETRIES - 1:
                    raise SafetyError(f"audit append failed: {exc.orig}", code="audit_append_failed") from exc
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def append_verdict(self, verdict: Verdict, *, kind: str = "prompt", subject: str | Iterable[str] | None = None,
                       request_id: str | None = None, job_id: str | None = None, user_id: str | None = None,
                       details: Mapping[str, Any] | None = None, session: Session | None = None) -> AuditRecord:
        """Record a safety verdict with its rule ids and reasons."""
        body = {**verdict.to_dict(), "tags": sorted(verdict.tags), **(details or {})}
        body.pop("action")
        body.pop("rules")
        return self.append(kind, verdict.action.value, rules=verdict.rule_ids, subject=subject, request_id=request_id,
                           job_id=job_id, user_id=user_id, details=body, session=session)

    @staticmethod
    def _append_in(s: Session, fields: dict) -> AuditRecord:
        """Two Core statements (read the head, insert the next row): the ORM's unit of work cost more
        than the statements themselves on the generation path, which appends twice per job."""
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        last = s.execute(_HEAD).first()
        new_id, prev = (last.id + 1, last.row_hash) if last else (1, GENESIS_HASH)
        ts = dt.datetime.now(dt.timezone.utc)
        row_hash = row_digest(id=new_id, ts=ts, prev_hash=prev, **fields)
        s.execute(_INSERT, {"id": new_id, "ts": ts, "prev_hash": prev, "row_hash": row_hash, **fields})
        return AuditRecord(id=new_id, ts=_canonical_ts(ts), prev_hash=prev, row_hash=row_hash, **fields)

    def verify(self, batch: int = 1000) -> AuditVerifyReport:
        """Walk the whole chain; report the first row that was edited, moved or follows a deleted one."""
        checked, expected_id, prev = 0, 1, GENESIS_HASH
        with self._sessions() as s:
            while True:
                stmt = select(AuditRow).order_by(AuditRow.id).limit(batch)
                rows = s.scalars(stmt.where(AuditRow.id >= expected_id) if checked else stmt).all()
                for row in rows:
                    if row.id != expected_id:
                        where = "the chain start" if expected_id == 1 else f"row {expected_id - 1}"
                        return AuditVerifyReport(False, checked, row.id, "id_gap",
                                                 f"row {row.id} follows {where}: rows were deleted")
                    if _digest_of(row) != row.row_hash:
                        return AuditVerifyReport(False, checked, row.id, "row_hash_mismatch",
                                                 f"row {row.id} does not match its hash: it was edited or moved")
                    if row.prev_hash != prev:
                        return AuditVerifyReport(False, checked, row.id, "prev_hash_mismatch",
                                                 f"row {row.id} does not chain to row {row.id - 1}")
                    prev, expected_id, checked = row.row_hash, row.id + 1, checked + 1
                s.expunge_all()
                if len(rows) < batch:
                    break
        head = (expected_id - 1, prev) if checked else (None, None)
        return AuditVerifyReport(True, checked, head_id=head[0], head_hash=head[1])

    def count_since(self, since: dt.datetime, *, kind: str, action: str, user_id: str) -> int:
        """How many decisions of `kind` and `action` about `user_id` were logged at or after `since`."""
        stmt = (select(func.count()).select_from(AuditRow)
                .where(AuditRow.kind == kind, AuditRow.action == action, AuditRow.user_id == user_id,
                       AuditRow.ts >= since))
        with self._sessions() as s:
            return int(s.scalar(stmt) or 0)

    def query(self, *, kind: str | None = None, action: str | None = None, job_id: str | None = None,
              request_id: str | None = None, user_id: str | None = None, before_id: int | None = None,
              limit: int = 100) -> list[AuditRecord]:
        """Newest first, filtered; page with `before_id`."""
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(max(1, min(limit, 10_000)))
        for column, value in ((AuditRow.kind, kind), (AuditRow.action, action), (AuditRow.job_id, job_id),
                              (AuditRow.request_id, request_id), (AuditRow.user_id, user_id)):
            if value is not None:
                stmt = stmt.where(column == value)
        if before_id is not None:
            stmt = stmt.where(AuditRow.id < before_id)
        with self._sessions() as s:
            return [AuditRecord.of(r) for r in s.scalars(stmt)]
