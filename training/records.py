"""Reads and guarded writes of training rows, and settling a finished job's hold exactly once.

Status changes are compare-and-set (`transition`): two processes can never both move a job out of
the same state. A job process writes only while its own attempt owns the row (`fenced_update`),
so a superseded process (its replacement already launched) cannot overwrite progress.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update

from genserve.billing.errors import HoldClosed, HoldNotFound
from genserve.billing.ledger import REVENUE_TRAINING, Ledger
from genserve.billing.pricing import QuoteItem, TrainingQuote
from genserve.core.db import Database
from genserve.core.errors import Conflict, NotFound
from genserve.core.storage import ObjectStore
from training.table import TERMINAL_STATUSES, Training, TrainingStatus

log = logging.getLogger(__name__)

# a job in one of these never reads its dataset again
DATASET_DISCARDED = frozenset({TrainingStatus.canceled.value, TrainingStatus.denied.value, TrainingStatus.failed.value})


def discard_dataset(store: ObjectStore, row: Training) -> None:
    """Delete the uploaded dataset of an ended job that did not succeed (best effort: logged, never raised)."""
    if row.status not in DATASET_DISCARDED or not row.dataset_key:
        return
    try:
        store.delete(row.dataset_key)
    except Exception:  # noqa: BLE001 - the job's outcome stands; the object is found by a sweep
        log.warning("training %s: could not delete dataset %s", row.id, row.dataset_key, exc_info=True)

ACTIVE_STATUSES = (TrainingStatus.queued.value, TrainingStatus.running.value)


class TrainingNotFound(NotFound):
    code = "training_not_found"


class Superseded(Exception):
    """This process's attempt no longer owns the job (it was relaunched or finished elsewhere)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def quote_to_dict(quote: TrainingQuote) -> dict[str, Any]:
    return dataclasses.asdict(quote)


def quote_from_dict(data: dict[str, Any]) -> TrainingQuote:
    # JSON keeps the legs as lists; the quote (and the capture's idempotent request) compares tuples
    legs = tuple(tuple(leg) for leg in data.get("owner_fee_legs") or ())
    items = tuple(QuoteItem(**i) for i in data["items"])
    return TrainingQuote(**{**data, "items": items, "owner_fee_legs": legs})


def charge_owed(row: Training) -> tuple[int, list[tuple[str, int, str]] | None]:
    """What a finished job captures, and its legs (None: all to the hold's destination).
    Succeeded: every step and saved epoch, and the base model's owner fee (the LoRA was delivered).
    Canceled: the steps run and no fee (nothing was delivered). Failed or denied: nothing (a failure
    of the service refunds fully)."""
    quote = quote_from_dict(row.quote)
    if row.status == TrainingStatus.succeeded.value:
        steps, epochs = row.total_steps, row.epochs
        return (quote.for_progress(steps, epochs, delivered=True),
                quote.legs_for_progress(steps, epochs, delivered=True, destination=REVENUE_TRAINING))
    if row.status == TrainingStatus.canceled.value:
        return quote.for_progress(row.step, 0), None
    return 0, None


class TrainingRecords:
    def __init__(self, db: Database):
        self.db = db

    def insert(self, row: Training) -> Training:
        with self.db.transaction() as s:
            s.add(row)
        return row

    def get(self, training_id: str) -> Training:
        with self.db.session() as s:
            row = s.get(Training, training_id)
        if row is None:
            raise TrainingNotFound(f"no training {training_id}")
        return row

    def list(self, *, statuses: Iterable[str] | None = None, user_id: str | None = None,
             limit: int = 100) -> list[Training]:
        query = select(Training).order_by(Training.created_at.desc()).limit(limit)
        if statuses is not None:
            query = query.where(Training.status.in_(list(statuses)))
        if user_id is not None:
            query = query.where(Training.user_id == user_id)
        with self.db.session() as s:
            return list(s.scalars(query))

    def finished_before(self, cutoff: dt.datetime, limit: int = 500) -> list[Training]:
        """Finished jobs that ended before `cutoff`, oldest first."""
        query = (select(Training).where(Training.status.in_([s.value for s in TERMINAL_STATUSES]),
                                        Training.finished_at.is_not(None), Training.finished_at < cutoff)
                 .order_by(Training.finished_at).limit(limit))
        with self.db.session() as s:
            return list(s.scalars(query))

    def unsettled(self) -> list[Training]:
        """Finished jobs whose hold was not captured or released yet (a process died in between)."""
        query = select(Training).where(Training.status.in_([s.value for s in TERMINAL_STATUSES]),
                                       Training.charged.is_(None), Training.hold_id.is_not(None))
        with self.db.session() as s:
            return list(s.scalars(query))

    def transition(self, training_id: str, from_statuses: Iterable[str], to: str, **fields: Any) -> Training:
        """Move the job to `to` only if it is in one of `from_statuses`; else `Conflict`."""
        allowed = list(from_statuses)
        values = {"status": to, "updated_at": utcnow(), **fields}
        if to in {s.value for s in TERMINAL_STATUSES}:
            values.setdefault("finished_at", utcnow())
        with self.db.transaction() as s:
            done = s.execute(update(Training).where(Training.id == training_id, Training.status.in_(allowed))
                             .values(**values)).rowcount
            row = s.get(Training, training_id)
        if row is None:
            raise TrainingNotFound(f"no training {training_id}")
        if not done:
            raise Conflict(f"training {training_id} is {row.status}; expected one of {allowed}",
                           code="training_state_conflict", details={"status": row.status})
        return row

    def fenced_update(self, training_id: str, attempt: str, **fields: Any) -> None:
        """Write progress only while `attempt` owns the running job; else `Superseded`."""
        with self.db.transaction() as s:
            done = s.execute(update(Training).where(Training.id == training_id, Training.ray_job_id == attempt,
                                                    Training.status == TrainingStatus.running.value)
                             .values(updated_at=utcnow(), **fields)).rowcount
        if not done:
            raise Superseded(training_id)

    def set_fields(self, training_id: str, **fields: Any) -> None:
        with self.db.transaction() as s:
            s.execute(update(Training).where(Training.id == training_id).values(updated_at=utcnow(), **fields))

    def cancel_requested(self, training_id: str) -> bool:
        with self.db.session() as s:
            return bool(s.scalar(select(Training.cancel_requested).where(Training.id == training_id)))

    def settle(self, ledger: Ledger, training_id: str, store: ObjectStore | None = None) -> Training:
        """Capture what a finished job owes and release the rest; a no-op once done (idempotent keys).
        With `store`, the dataset of a job that will never train again (canceled, denied, failed) is
        deleted from it: nobody asked to keep a refused or abandoned upload."""
        row = self.get(training_id)
        if row.status not in {s.value for s in TERMINAL_STATUSES}:
            raise Conflict(f"training {training_id} is still {row.status}", code="training_not_finished")
        if store is not None:
            discard_dataset(store, row)
        if row.charged is not None or row.hold_id is None:
            return row
        amount, legs = charge_owed(row)
        try:
            if amount > 0:
                ledger.capture(row.hold_id, amount, key=f"training:{row.id}:capture", legs=legs)
            else:
                ledger.release(row.hold_id, key=f"training:{row.id}:release")
        except (HoldClosed, HoldNotFound) as exc:
            # the hold expired and its buzz went back to the user: nothing was charged
            log.warning("training %s: hold %s already closed (%s); nothing charged", row.id, row.hold_id, exc.code)
            amount = 0
        with self.db.transaction() as s:
            s.execute(update(Training).where(Training.id == training_id, Training.charged.is_(None))
                      .values(charged=amount, updated_at=utcnow()))
            return s.get(Training, training_id)
