"""The reaper: fails generation jobs that no live process owns and gives their buzz back.

A job's owner refreshes its heartbeat while it runs. When the owner is gone (its process died, or
its replica was killed with everything in it), the heartbeat goes stale; the reaper then moves the
job to `failed` with the code `owner_lost` and releases its hold. A job on this host whose owner
process no longer exists is reaped at once, without waiting for the heartbeat to go stale.

Any number of reapers may run (one per ingress replica): the conditional transition lets exactly one
of them, or the job's own runner, settle each job. Expired ledger holds are voided on the same round.
A reaped job's images are deleted: its runner stores each image while it is being scanned, and
one that died may have left some behind that no job lists.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass

from genserve.billing.ledger import Ledger
from genserve.core.errors import GenserveError
from genserve.core.storage import ObjectStore
from genserve.generation.jobs import GenerationJob, JobStatus, JobStore, image_prefix, utcnow

logger = logging.getLogger(__name__)

OWNER_LOST = "owner_lost"


def owner_process_gone(owner: str | None, hostname: str | None = None) -> bool:
    """True when `owner` ("host/pid/instance") names a process on this host that no longer exists."""
    if not owner:
        return True
    parts = owner.split("/")
    if len(parts) < 2 or parts[0] != (hostname or socket.gethostname()):
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@dataclass(frozen=True)
class ReapReport:
    jobs: list[str]
    expired_holds: int

    def to_dict(self) -> dict:
        return {"jobs": self.jobs, "expired_holds": self.expired_holds}


class Reaper:
    def __init__(self, jobs: JobStore, ledger: Ledger, *, stale_after_s: float, store: ObjectStore | None = None):
        self.jobs = jobs
        self.ledger = ledger
        self.stale_after_s = stale_after_s
        self.store = store

    def orphans(self, now: dt.datetime | None = None) -> list[GenerationJob]:
        now = now or utcnow()
        stale = {j.id: j for j in self.jobs.stale(now - dt.timedelta(seconds=self.stale_after_s))}
        for job in self.jobs.active():
            if job.id not in stale and owner_process_gone(job.owner):
                stale[job.id] = job
        return list(stale.values())

    def reap_once(self, now: dt.datetime | None = None) -> ReapReport:
        reaped = []
        for job in self.orphans(now):
            if not self.jobs.finish(job.id, JobStatus.failed, owner=job.owner,
                                    error=(OWNER_LOST, "the process running this generation stopped")):
                continue  # its runner (or another reaper) settled it meanwhile
            reaped.append(job.id)
            if job.hold_id:
                try:
                    self.ledger.release(job.hold_id, f"gen:{job.id}:release")
                except GenserveError as exc:
                    logger.info("hold %s of reaped job %s: %s", job.hold_id, job.id, exc.code)
            self._delete_images(job)
            logger.warning("reaped generation %s owned by %s", job.id, job.owner)
        return ReapReport(reaped, self.ledger.reap_expired())

    def _delete_images(self, job: GenerationJob) -> None:
        if self.store is None:
            return
        try:
            for key in list(self.store.list(image_prefix(job.user_id, job.id))):
                self.store.delete(key)
        except GenserveError as exc:
            logger.error("images of reaped job %s not deleted: %s", job.id, exc)
