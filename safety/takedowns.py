"""Takedown requests: a person asks for the removal of resources that reproduce them.

A request is recorded, then a moderator approves or denies it. Approval puts each named resource's
file on the likeness blocklist (source = the takedown id) and the person's name on the real-person
name list the prompt audit uses, in one transaction with its audit-log row. Callers hand in the
resource files, so this stays independent of the service's resource table.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from safety.audit_log import AuditLog
from safety.errors import SafetyError
from safety.hashing import Source
from safety.likeness import LikenessBlocklist
from safety.store import Takedown, add_person_name, person_names, utcnow

__all__ = ["TakedownError", "TakedownNotFound", "TakedownNotPending", "TakedownRecord", "Takedowns", "person_names"]

REQUESTED, APPROVED, DENIED = "requested", "approved", "denied"


class TakedownError(SafetyError):
    code = "takedown_invalid"


class TakedownNotFound(TakedownError):
    code = "takedown_not_found"


class TakedownNotPending(TakedownError):
    code = "takedown_not_pending"


@dataclass(frozen=True)
class TakedownRecord:
    id: str
    person: str
    contact: str
    resource_ids: list[str]
    reason: str
    status: str
    requested_by: str
    moderator: str | None
    decision_note: str
    entry_ids: list[int]
    requested_at: str
    decided_at: str | None

    @classmethod
    def of(cls, row: Takedown) -> TakedownRecord:
        return cls(id=row.id, person=row.person, contact=row.contact, resource_ids=list(row.resource_ids),
                   reason=row.reason, status=row.status, requested_by=row.requested_by, moderator=row.moderator,
                   decision_note=row.decision_note, entry_ids=list(row.entry_ids),
                   requested_at=row.requested_at.isoformat() if row.requested_at else "",
                   decided_at=row.decided_at.isoformat() if row.decided_at else None)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Takedowns:
    def __init__(self, session_factory: Callable[[], Session], blocklist: LikenessBlocklist, audit_log: AuditLog):
        self._sessions = session_factory
        self.blocklist = blocklist
        self.audit = audit_log

    def request(self, person: str, *, contact: str = "", resource_ids: Iterable[str] = (), reason: str = "",
                requested_by: str = "") -> TakedownRecord:
        """Record a request (status `requested`)."""
        if not person.strip():
            raise TakedownError("a takedown request needs the person's name", code="person_required")
        row = Takedown(id=f"td_{uuid.uuid4().hex[:20]}", person=person.strip(), contact=contact,
                       resource_ids=[str(r) for r in resource_ids], reason=reason, status=REQUESTED,
                       requested_by=requested_by, decision_note="", entry_ids=[], requested_at=utcnow())
        with self._sessions() as s, s.begin():
            s.add(row)
            s.flush()
            self.audit.append("takedown", REQUESTED, details={"takedown_id": row.id, "person": row.person,
                                                              "resource_ids": row.resource_ids}, session=s)
            return TakedownRecord.of(row)

    def _pending(self, s: Session, takedown_id: str) -> Takedown:
        row = s.scalar(select(Takedown).where(Takedown.id == takedown_id).with_for_update())
        if row is None:
            raise TakedownNotFound(f"no takedown {takedown_id!r}")
        if row.status != REQUESTED:
            raise TakedownNotPending(f"takedown {takedown_id} is already {row.status}")
        return row

    def approve(self, takedown_id: str, moderator: str, files: Sequence[Source] | Mapping[str, Source] = (),
                note: str = "") -> TakedownRecord:
        """Blocklist `files` (a mapping keys them by resource id) and the person's name, then mark approved.

        Every file is hashed and fingerprinted before anything is written: a bad file changes nothing.
        """
        if not moderator.strip():
            raise TakedownError("approving a takedown needs the moderator's name", code="takedown_moderator_required")
        pairs = list(files.items()) if isinstance(files, Mapping) else [(None, f) for f in files]
        prepared = [(rid, self.blocklist.prepare(src)) for rid, src in pairs]
        with self._sessions() as s, s.begin():
            row = self._pending(s, takedown_id)
            reason = f"takedown {row.id}" + (f": {row.reason}" if row.reason else "")
            entries = [
                self.blocklist.insert(s, p, person=row.person, reason=reason, source=row.id, created_by=moderator,
                                      resource_id=rid)
                for rid, p in prepared
            ]
            add_person_name(s, row.person, source=row.id)
            row.status, row.moderator, row.decision_note, row.decided_at = APPROVED, moderator, note, utcnow()
            row.entry_ids = [e.id for e in entries]
            self.audit.append("takedown", APPROVED, rules=["likeness.takedown"],
                              subject=[p.hashes.sha256 for _, p in prepared], user_id=moderator,
                              details={"takedown_id": row.id, "person": row.person, "entry_ids": row.entry_ids,
                                       "resource_ids": [rid for rid, _ in prepared if rid]}, session=s)
            s.flush()
            return TakedownRecord.of(row)

    def deny(self, takedown_id: str, moderator: str, note: str = "") -> TakedownRecord:
        if not moderator.strip():
            raise TakedownError("denying a takedown needs the moderator's name", code="takedown_moderator_required")
        with self._sessions() as s, s.begin():
            row = self._pending(s, takedown_id)
            row.status, row.moderator, row.decision_note, row.decided_at = DENIED, moderator, note, utcnow()
            self.audit.append("takedown", DENIED, user_id=moderator,
                              details={"takedown_id": row.id, "person": row.person, "note": note}, session=s)
            s.flush()
            return TakedownRecord.of(row)

    def get(self, takedown_id: str) -> TakedownRecord:
        with self._sessions() as s:
            row = s.get(Takedown, takedown_id)
            if row is None:
                raise TakedownNotFound(f"no takedown {takedown_id!r}")
            return TakedownRecord.of(row)

    def list(self, status: str | None = None) -> list[TakedownRecord]:
        stmt = select(Takedown).order_by(Takedown.requested_at, Takedown.id)
        if status is not None:
            stmt = stmt.where(Takedown.status == status)
        with self._sessions() as s:
            return [TakedownRecord.of(r) for r in s.scalars(stmt)]
