"""Safety's tables: the likeness blocklist, takedown requests, real-person names, the perceptual hashes of
known-abusive images and the audit log.

All on `SafetyBase`, so the service's migrations create them and `safety` needs nothing from `genserve`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, Integer, LargeBinary, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from safety.db import SafetyBase


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LikenessEntry(SafetyBase):
    """One resource that reproduces a real person's likeness; the generator never loads a match."""

    __tablename__ = "safety_likeness_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    tensor_sha256: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    # Per-module names, energies and sketches (safety.likeness.Fingerprint.to_bytes; version in
    # fingerprint_meta); None for a hash-only entry (embedding, explicit hash-only, nothing to fingerprint).
    fingerprint: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    fingerprint_meta: Mapped[dict] = mapped_column(JSON, default=dict)
    person: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    resource_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Takedown(SafetyBase):
    """A person's request to remove resources that reproduce them, and the moderator's decision."""

    __tablename__ = "safety_takedowns"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    person: Mapped[str] = mapped_column(String(200))
    contact: Mapped[str] = mapped_column(String(320), default="")
    resource_ids: Mapped[list] = mapped_column(JSON, default=list)
    reason: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), index=True)  # requested | approved | denied
    requested_by: Mapped[str] = mapped_column(String(200), default="")
    moderator: Mapped[str | None] = mapped_column(String(200), nullable=True)
    decision_note: Mapped[str] = mapped_column(Text, default="")
    entry_ids: Mapped[list] = mapped_column(JSON, default=list)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PersonName(SafetyBase):
    """A real person's name the prompt audit treats as a likeness request (added by approved takedowns)."""

    __tablename__ = "safety_person_names"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_key: Mapped[str] = mapped_column(String(200), unique=True)  # casefolded, whitespace collapsed
    source: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AbusiveImageHash(SafetyBase):
    """The 64-bit perceptual hash (16 hex) of a known-abusive image: an input within the configured
    Hamming distance of one is refused. Only the hash is kept, never the image."""

    __tablename__ = "safety_image_hashes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    phash: Mapped[str] = mapped_column(String(16), unique=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditRow(SafetyBase):
    """One safety decision. `row_hash` covers the row and `prev_hash`, chaining every row to the last.

    Ids are assigned by the appender (previous id + 1) under a lock, so a gap means a deleted row.
    """

    __tablename__ = "safety_audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    action: Mapped[str] = mapped_column(String(32))
    rules: Mapped[list] = mapped_column(JSON, default=list)
    subject_hashes: Mapped[list] = mapped_column(JSON, default=list)
    request_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


def name_key(name: str) -> str:
    """How person names compare: case-insensitive, whitespace collapsed."""
    return " ".join(name.split()).casefold()


def add_person_name(session: Session, name: str, source: str = "") -> bool:
    """Put `name` on the real-person name list; False when it is already there."""
    key = name_key(name)
    if not key:
        return False
    if session.scalar(select(PersonName.id).where(PersonName.name_key == key)) is not None:
        return False
    session.add(PersonName(name=" ".join(name.split()), name_key=key, source=source))
    session.flush()
    return True


def person_names(session: Session) -> list[str]:
    """Every name on the real-person name list, oldest first (the prompt audit matches against these)."""
    return list(session.scalars(select(PersonName.name).order_by(PersonName.id)))
