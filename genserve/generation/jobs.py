"""Generation jobs: the table, the state machine and the event log that server-sent events replay.

    queued ──▶ running ──▶ succeeded | blocked | failed | canceled
       └──────────────────▶ blocked | failed | canceled

Every transition is one conditional UPDATE (`WHERE status IN (...)`), so two processes racing to
finish the same job (its runner and the reaper) cannot both win: the loser sees `False` and leaves
billing alone. A job is owned by the process that runs it; the owner refreshes `heartbeat_at`, and a
job whose heartbeat went stale or whose owner process is gone is failed by the reaper.

Events are numbered per job (`seq`), stored in the same transaction as the change they describe,
and replayed to an event stream from any `Last-Event-ID`, whichever replica wrote them.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from genserve.core.db import Base, Database
from genserve.core.errors import NotFound, QueueFull


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    blocked = "blocked"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


ACTIVE = (JobStatus.queued, JobStatus.running)
TERMINAL = frozenset({JobStatus.succeeded, JobStatus.blocked, JobStatus.failed, JobStatus.canceled})


class JobNotFound(NotFound):
    code = "job_not_found"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


def idempotent_job_id(user_id: str, key: str) -> str:
    """The same (user, idempotency key) always names the same job, so a retried submit that races
    the first one reuses its ledger hold (keyed by job id) instead of taking a second one."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"genserve:generation:{user_id}:{key}").hex


def image_prefix(user_id: str, job_id: str) -> str:
    """Where a job's images live in the object store."""
    return f"images/{user_id}/{job_id}/"


def image_key(user_id: str, job_id: str, index: int, digest: str, ext: str = "png") -> str:
    """An image's key. It is written before the image's scan is done, so it carries part of the
    image's SHA-256: nobody can name it before the finished job lists it. `ext`: png, jpg or webp."""
    return f"{image_prefix(user_id, job_id)}{index}-{digest[:16]}.{ext}"


class GenerationJob(Base):
    __tablename__ = "generation_jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        Index("ix_generation_jobs_user_id_status", "user_id", "status"),
        Index("ix_generation_jobs_status_heartbeat_at", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(Enum(JobStatus, native_enum=False, length=16))
    family: Mapped[str] = mapped_column(String(16))
    checkpoint_id: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    quantity: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    # the normalised request as run: seeds drawn, sizes resolved, resources with their kinds
    request: Mapped[dict] = mapped_column(JSON)
    quote: Mapped[dict] = mapped_column(JSON)
    quote_total: Mapped[int] = mapped_column(BigInteger)
    hold_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    __tablename__ = "generation_job_events"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("generation_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


# Writes go through the tables (Core statements): the ORM's unit of work and its update
# bookkeeping cost more than the statements on the generation path, which writes a job 5+ times.
_JOBS = GenerationJob.__table__
_EVENTS = JobEvent.__table__
_JOB_COLUMNS = tuple(c.key for c in _JOBS.columns)


def _next_event() -> Any:
    """INSERT the job's next event, its number taken by the database in the same statement."""
    e = _EVENTS.c
    job_id = bindparam("job_id", type_=String())
    next_seq = select(job_id, func.coalesce(func.max(e.seq), 0) + 1, bindparam("kind", type_=String()),
                      bindparam("data", type_=JSON()), bindparam("created_at", type_=DateTime(timezone=True)))
    return insert(_EVENTS).from_select(["job_id", "seq", "kind", "data", "created_at"], next_seq.where(e.job_id == job_id))


_APPEND_EVENT = _next_event()
_ACTIVE_COUNTS = select(
    func.coalesce(func.sum(case((_JOBS.c.user_id == bindparam("user_id"), 1), else_=0)), 0), func.count()
).where(_JOBS.c.status.in_(ACTIVE))


# PostgreSQL advisory lock taken by every admitting insert (the bytes of "gs-admit"): admissions are
# counted and inserted one at a time, while reads and the jobs' own updates never wait on it.
ADMISSION_LOCK_KEY = int.from_bytes(b"gs-admit", "big") & 0x7FFF_FFFF_FFFF_FFFF


class JobStore:
    """All reads and writes of generation jobs; each method is one transaction."""

    def __init__(self, db: Database):
        self.db = db

    # -- events -------------------------------------------------------------------------------

    @staticmethod
    def _append_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Insert the job's next event, numbered by the database in the same statement."""
        session.execute(_APPEND_EVENT, {"job_id": job_id, "kind": kind, "data": data, "created_at": utcnow()})

    def _with_event(self, fn, attempts: int = 5):  # noqa: ANN001, ANN202
        """Run `fn(session)` in a transaction; retry when two writers took the same event number."""
        for attempt in range(attempts):
            try:
                with self.db.transaction() as s:
                    return fn(s)
            except IntegrityError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def events_after(self, job_id: str, after_seq: int = 0, limit: int = 500) -> list[JobEvent]:
        with self.db.session() as s:
            rows = s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                .order_by(JobEvent.seq)
                .limit(limit)
            )
            return list(rows)

    # -- reads --------------------------------------------------------------------------------

    def get(self, job_id: str, user_id: str | None = None) -> GenerationJob:
        """The job; `user_id` given, another user's job is reported as missing, never as forbidden."""
        with self.db.session() as s:
            job = s.get(GenerationJob, job_id)
        if job is None or (user_id is not None and job.user_id != user_id):
            raise JobNotFound(f"no generation {job_id}")
        return job

    def find_idempotent(self, user_id: str, key: str) -> GenerationJob | None:
        with self.db.session() as s:
            return s.scalar(
                select(GenerationJob).where(GenerationJob.user_id == user_id, GenerationJob.idempotency_key == key)
            )

    def count_active(self, user_id: str | None = None) -> int:
        query = select(func.count()).select_from(GenerationJob).where(GenerationJob.status.in_(ACTIVE))
        if user_id is not None:
            query = query.where(GenerationJob.user_id == user_id)
        with self.db.session() as s:
            return int(s.scalar(query) or 0)

    def active_counts(self, user_id: str) -> tuple[int, int]:
        """(the user's active jobs, all active jobs) in one query: admission asks for both."""
        with self.db.session() as s:
            user_active, active = s.execute(_ACTIVE_COUNTS, {"user_id": user_id}).one()
        return int(user_active), int(active)

    def count_by_status(self) -> dict[str, int]:
        with self.db.session() as s:
            rows = s.execute(select(GenerationJob.status, func.count()).group_by(GenerationJob.status)).all()
        return {JobStatus(status).value: int(n) for status, n in rows}

    def count_active_by_family(self) -> dict[str, int]:
        with self.db.session() as s:
            rows = s.execute(select(GenerationJob.family, func.count())
                             .where(GenerationJob.status.in_(ACTIVE)).group_by(GenerationJob.family)).all()
        return {str(family): int(n) for family, n in rows}

    def active(self, owner: str | None = None) -> list[GenerationJob]:
        query = select(GenerationJob).where(GenerationJob.status.in_(ACTIVE))
        if owner is not None:
            query = query.where(GenerationJob.owner == owner)
        with self.db.session() as s:
            return list(s.scalars(query))

    def stale(self, heartbeat_before: dt.datetime) -> list[GenerationJob]:
        """Active jobs whose owner has not been heard from since `heartbeat_before`."""
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(GenerationJob).where(
                        GenerationJob.status.in_(ACTIVE),
                        (GenerationJob.heartbeat_at < heartbeat_before) | GenerationJob.heartbeat_at.is_(None),
                    )
                )
            )

    # -- writes -------------------------------------------------------------------------------

    def create(self, job: GenerationJob,
               admit: Callable[[int, int], None] | None = None) -> tuple[GenerationJob, bool]:
        """Insert a queued job and its first event. `(job, True)` when new; when the same
        (user, idempotency key) already exists, `(that job, False)` and nothing is written.

        `admit(user_active, active)` is called with the active jobs of the job's user and of the
        service, counted in the insert's own transaction while no other admission can run (SQLite:
        the transaction began IMMEDIATE, the one writer; PostgreSQL: a transaction-scoped advisory
        lock), and refuses by raising (`QueueFull`): queue limits hold under any burst."""
        now = utcnow()
        job.status = JobStatus.queued
        job.created_at = job.updated_at = now
        job.heartbeat_at = now
        job.charged = 0
        job.cancel_requested = False
        job.progress = job.progress or {}
        try:
            with self.db.transaction() as s:
                if admit is not None:
                    if not self.db.is_sqlite:
                        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK_KEY})
                    user_active, active = s.execute(_ACTIVE_COUNTS, {"user_id": job.user_id}).one()
                    admit(int(user_active), int(active))
                s.execute(insert(_JOBS), {c: getattr(job, c) for c in _JOB_COLUMNS})
                self._append_event(s, job.id, "status", {"status": JobStatus.queued.value})
            return job, True
        except QueueFull:
            # a retry of an admitted request (same idempotency key) is that job, not a refusal
            existing = self.find_idempotent(job.user_id, job.idempotency_key) if job.idempotency_key else None
            if existing is None:
                raise
            return existing, False
        except IntegrityError:
            existing = (
                self.find_idempotent(job.user_id, job.idempotency_key) if job.idempotency_key else None
            )
            if existing is None:
                raise
            return existing, False

    def start(self, job_id: str, owner: str) -> bool:
        """queued -> running for `owner`; False when the job is no longer queued (canceled, reaped)."""

        def tx(s: Session) -> bool:
            now = utcnow()
            j = _JOBS.c
            done = s.execute(
                update(_JOBS)
                .where(j.id == job_id, j.status == JobStatus.queued)
                .values(status=JobStatus.running, owner=owner, started_at=now, heartbeat_at=now, updated_at=now)
            ).rowcount
            if done:
                self._append_event(s, job_id, "status", {"status": JobStatus.running.value})
            return bool(done)

        return self._with_event(tx)

    def heartbeat(self, owner: str, job_ids: Iterable[str] | None = None) -> int:
        """Refresh the heartbeat of `owner`'s active jobs (all of them, or `job_ids`); returns how many."""
        query = update(GenerationJob).where(GenerationJob.owner == owner, GenerationJob.status.in_(ACTIVE))
        if job_ids is not None:
            query = query.where(GenerationJob.id.in_(list(job_ids)))
        now = utcnow()
        with self.db.transaction() as s:
            return s.execute(query.values(heartbeat_at=now)).rowcount

    def progress(self, job_id: str, owner: str, data: dict[str, Any]) -> bool:
        """Record progress (and a heartbeat) of a running job; returns whether a cancel was asked for.

        Raises `JobNotFound` when the job is no longer running for `owner` (the reaper took it).
        """

        def tx(s: Session) -> bool:
            now = utcnow()
            j = _JOBS.c
            row = s.execute(
                update(_JOBS)
                .where(j.id == job_id, j.owner == owner, j.status == JobStatus.running)
                .values(progress=data, heartbeat_at=now, updated_at=now)
                .returning(j.cancel_requested)
            ).first()
            if row is None:
                raise JobNotFound(f"generation {job_id} is not running for {owner}", code="job_not_running")
            self._append_event(s, job_id, "progress", data)
            return bool(row.cancel_requested)

        return self._with_event(tx)

    def request_cancel(self, job_id: str, user_id: str) -> GenerationJob:
        """Flag the job for cancellation (its runner stops within a step). Finished jobs are left as
        they are; the caller reads the returned status."""
        with self.db.transaction() as s:
            job = s.get(GenerationJob, job_id)
            if job is None or job.user_id != user_id:
                raise JobNotFound(f"no generation {job_id}")
            if job.status in ACTIVE and not job.cancel_requested:
                job.cancel_requested = True
                job.updated_at = utcnow()
            return job

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        owner: str | None = None,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
        charged: int = 0,
        from_statuses: Sequence[JobStatus] = ACTIVE,
    ) -> bool:
        """Move an active job to the terminal `status`. False when it was already finished (or is not
        `owner`'s): the caller lost the race and must not touch billing."""
        if not status.terminal:
            raise ValueError(f"{status} is not a terminal status")

        def tx(s: Session) -> bool:
            now = utcnow()
            j = _JOBS.c
            query = update(_JOBS).where(j.id == job_id, j.status.in_(from_statuses))
            if owner is not None:
                query = query.where(j.owner == owner)
            values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "charged": charged}
            if result is not None:
                values["result"] = result
            if error is not None:
                values["error_code"], values["error_message"] = error
            if not s.execute(query.values(**values)).rowcount:
                return False
            event = {"status": status.value, "charged": charged}
            if error is not None:
                event["error"] = {"code": error[0], "message": error[1]}
            self._append_event(s, job_id, "status", event)
            return True

        return self._with_event(tx)
