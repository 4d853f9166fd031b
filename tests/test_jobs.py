"""Job state machine: conditional transitions, ownership, events, idempotency; migration matches the model."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from genserve.generation.jobs import (
    GenerationJob,
    JobNotFound,
    JobStatus,
    JobStore,
    idempotent_job_id,
    new_job_id,
    utcnow,
)


def _job(user: str = "u1", key: str | None = None, job_id: str | None = None) -> GenerationJob:
    return GenerationJob(
        id=job_id or (idempotent_job_id(user, key) if key else new_job_id()), user_id=user, family="sd1",
        checkpoint_id="tiny-sd1", priority="normal", quantity=2, idempotency_key=key, request_hash="h" * 64,
        request={"prompt": "a fox", "seeds": [1, 2]}, quote={"total": 4}, quote_total=4, owner="me",
    )


@pytest.fixture
def store(db):
    return JobStore(db)


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request):
    """The transitions that depend on the database's locking run on both backends."""
    return JobStore(request.getfixturevalue("db" if request.param == "sqlite" else "pg_db"))


def test_happy_path_writes_ordered_events(any_store):
    store = any_store
    job, created = store.create(_job())
    assert created and job.status is JobStatus.queued
    assert store.start(job.id, "me")
    assert not store.start(job.id, "me"), "a running job cannot start twice"
    assert store.progress(job.id, "me", {"step": 1, "total": 2}) is False
    assert store.finish(job.id, JobStatus.succeeded, owner="me", result={"images": []}, charged=4)
    assert not store.finish(job.id, JobStatus.failed, error=("late", "too late")), "terminal is final"
    done = store.get(job.id)
    assert done.status is JobStatus.succeeded and done.charged == 4 and done.finished_at is not None
    events = store.events_after(job.id)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [(e.kind, e.data.get("status")) for e in events] == [
        ("status", "queued"), ("status", "running"), ("progress", None), ("status", "succeeded")
    ]
    assert [e.seq for e in store.events_after(job.id, after_seq=2)] == [3, 4]


def test_other_users_job_is_not_found(store):
    job, _ = store.create(_job(user="alice"))
    assert store.get(job.id, user_id="alice").id == job.id
    with pytest.raises(JobNotFound):
        store.get(job.id, user_id="bob")
    with pytest.raises(JobNotFound):
        store.request_cancel(job.id, "bob")


def test_idempotency_key_returns_the_first_job(any_store):
    store = any_store
    first, created = store.create(_job(key="k-1"))
    again, created_again = store.create(_job(key="k-1"))
    assert created and not created_again and again.id == first.id
    other_user, created_other = store.create(_job(user="u2", key="k-1"))
    assert created_other and other_user.id != first.id
    assert len(store.events_after(first.id)) == 1


def test_progress_on_a_job_someone_else_owns_raises(store):
    job, _ = store.create(_job())
    store.start(job.id, "me")
    with pytest.raises(JobNotFound):
        store.progress(job.id, "someone-else", {"step": 1})
    assert not store.finish(job.id, JobStatus.succeeded, owner="someone-else")


def test_cancel_flag_is_reported_to_the_runner(store):
    job, _ = store.create(_job())
    store.start(job.id, "me")
    assert store.request_cancel(job.id, "u1").cancel_requested
    assert store.progress(job.id, "me", {"step": 1}) is True


def test_stale_and_heartbeat(store):
    job, _ = store.create(_job())
    store.start(job.id, "me")
    later = utcnow() + dt.timedelta(seconds=1)
    assert [j.id for j in store.stale(later)] == [job.id]
    assert store.heartbeat("me") == 1
    assert store.stale(utcnow() - dt.timedelta(seconds=30)) == []
    assert store.count_active() == 1 and store.count_active("u1") == 1 and store.count_active("u2") == 0
    assert store.active_counts("u1") == (1, 1) and store.active_counts("u2") == (0, 1)


def test_only_one_of_racing_finishers_wins(any_store):
    store = any_store
    job, _ = store.create(_job())
    store.start(job.id, "me")
    wins = []

    def finish(status: JobStatus) -> None:
        wins.append(store.finish(job.id, status, error=("x", "y")))

    threads = [threading.Thread(target=finish, args=(s,)) for s in (JobStatus.failed, JobStatus.canceled) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert [e.data["status"] for e in store.events_after(job.id) if e.kind == "status"][-1] == store.get(job.id).status.value


def test_finish_refuses_a_non_terminal_status(store):
    job, _ = store.create(_job())
    with pytest.raises(ValueError):
        store.finish(job.id, JobStatus.running)


def test_migration_matches_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from genserve.core.db import Base

    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(ctx, Base.metadata) if "generation_job" in repr(d)]
    assert diff == []


def test_admission_counted_in_the_insert_never_exceeds_a_limit(any_store):
    """16 concurrent creates against a limit of 4, each pausing between its count and its insert: the
    count and the insert are one step under the admission lock (PostgreSQL) or the one writer (SQLite)."""
    from genserve.core.errors import QueueFull

    store = any_store
    barrier = threading.Barrier(16)
    created: list[bool] = []
    refused: list[QueueFull] = []

    def admit(user_active: int, active: int) -> None:
        if user_active >= 4:
            raise QueueFull("full", code="queue_limit")
        time.sleep(0.05)  # a wide window between the count and the insert

    def create() -> None:
        barrier.wait()
        try:
            created.append(store.create(_job(user="burst"), admit=admit)[1])
        except QueueFull as exc:
            refused.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (len(created), len(refused)) == (4, 12)
    assert store.active_counts("burst") == (4, 4)


def test_a_retry_of_an_admitted_request_is_its_job_not_a_refusal(any_store):
    from genserve.core.errors import QueueFull

    store = any_store
    first, _ = store.create(_job(user="retry", key="k1"))

    def full(user_active: int, active: int) -> None:
        raise QueueFull("full", code="queue_limit")

    again, created = store.create(_job(user="retry", key="k1"), admit=full)
    assert (again.id, created) == (first.id, False)
    with pytest.raises(QueueFull):
        store.create(_job(user="retry", key="k2"), admit=full)
