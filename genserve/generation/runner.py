"""The runner: one accepted job from dispatch to its settlement.

    dispatch to the family's worker (waiting while its queue is full) ─▶ follow the stream:
    progress → job events, each encoded image → staged into the store ─▶ the result ─▶ settlement

Whatever happens (a refusal, a dead replica, a timeout, a cancellation, the service stopping) the
job ends in `Settlement`, and whatever the finished job does not list leaves the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from genserve.core.errors import GenserveError, SafetyBlocked, Unavailable
from genserve.generation.admission import AdmissionPlan
from genserve.generation.jobs import JobStore
from genserve.generation.settlement import Settlement
from genserve.generation.staging import ImageStaging
from genserve.generation.worker.wire import EncodedImage, WorkerRequest, WorkerResult, WorkerStreamItem
from safety.errors import SafetyError

logger = logging.getLogger(__name__)


class WorkerStream(Protocol):
    def __aiter__(self) -> AsyncIterator[WorkerStreamItem]: ...

    def cancel(self) -> None: ...


class WorkerBackend(Protocol):
    """Starts a generation on the worker that serves `family`: progress and encoded images stream back,
    then one WorkerResult."""

    def generate(self, family: str, request: WorkerRequest) -> WorkerStream: ...

    def is_backpressure(self, exc: BaseException) -> bool: ...


@dataclass
class RunningJob:
    """An accepted job while this process runs it (the rest is in the job row)."""

    job_id: str
    plan: AdmissionPlan
    worker_request: WorkerRequest
    hold_id: str
    created_at: dt.datetime
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set once the job is settled


class JobCanceled(Exception):
    """Raised inside a runner when its job was asked to stop."""


class Runner:
    def __init__(self, *, workers: WorkerBackend, jobs: JobStore, staging: ImageStaging, settlement: Settlement,
                 owner: str, on_change: Callable[[str], None]):
        self.workers = workers
        self.jobs = jobs
        self.staging = staging
        self.settlement = settlement
        self.owner = owner
        self._on_change = on_change  # event streams in this process look now instead of at their next poll

    async def run(self, job: RunningJob) -> None:
        job_id = job.job_id
        try:
            await self._run_to_end(job)
        except asyncio.CancelledError:  # the service is shutting down: give the buzz back now
            self.settlement.fail(job_id, "service_stopped", "the service stopped before the generation finished")
            self.staging.discard(job_id)
            raise
        except Exception:  # noqa: BLE001 - the last line of defence: the hold must be settled
            logger.exception("generation %s crashed", job_id)
            await asyncio.to_thread(self.settlement.fail, job_id, "internal_error", "the generation failed unexpectedly")
        finally:
            try:  # whatever the job does not list (withheld, or it did not succeed) leaves the store
                if self.staging.has_leftovers(job_id):
                    await asyncio.to_thread(self.staging.discard, job_id)
            finally:
                self.staging.forget(job_id)
                if job.worker_request.init is not None:  # an input image lives as long as its job runs
                    await asyncio.to_thread(self.staging.delete_keys, job.worker_request.init.keys)
                job.finished.set()

    async def _run_to_end(self, job: RunningJob) -> None:
        job_id, timeout_s = job.job_id, job.plan.timeout_s
        try:
            result = await asyncio.wait_for(self._generate(job), timeout_s)
        except JobCanceled:
            await asyncio.to_thread(self.settlement.cancel, job_id)
            return
        except asyncio.TimeoutError:
            await asyncio.to_thread(self.settlement.fail, job_id, "timeout", f"no result within {timeout_s:.0f} s")
            return
        except Exception as exc:  # noqa: BLE001 - a refusal, a dead replica, a bug in the engine
            cause = _unwrap(exc)
            if isinstance(cause, (SafetyBlocked, SafetyError)):
                await asyncio.to_thread(self.settlement.worker_refused, job_id, job.plan, cause)
            else:
                code, message = _worker_failure(exc, cause)
                logger.warning("generation %s failed on the worker: %s", job_id, message)
                await asyncio.to_thread(self.settlement.fail, job_id, code, message)
            return
        if result.canceled:
            await asyncio.to_thread(self.settlement.cancel, job_id)
            return
        await asyncio.to_thread(self.settlement.deliver, job_id, job.plan, job.hold_id, job.created_at, result)

    async def _generate(self, job: RunningJob) -> WorkerResult:
        """Dispatch to the worker (waiting while its queue is full) and follow the stream to its result."""
        delay = 0.2
        while True:
            if job.cancel.is_set():
                raise JobCanceled
            stream = self.workers.generate(job.plan.family, job.worker_request)
            try:
                return await self._follow(job, stream)
            except Exception as exc:
                if not self.workers.is_backpressure(exc):
                    raise
            # the worker deployment's queue is full: the job stays queued here (bounded by admission)
            try:
                await asyncio.wait_for(job.cancel.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 2.0)

    async def _follow(self, job: RunningJob, stream: WorkerStream) -> WorkerResult:
        job_id, started = job.job_id, False
        watcher = asyncio.create_task(job.cancel.wait())
        iterator = stream.__aiter__()
        try:
            while True:
                step = asyncio.ensure_future(iterator.__anext__())
                try:
                    done, _ = await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:  # the job timed out or the service is closing
                    step.cancel()
                    stream.cancel()
                    raise
                if watcher in done and step not in done:
                    step.cancel()
                    stream.cancel()
                    raise JobCanceled
                try:
                    item = step.result()
                except StopAsyncIteration:
                    raise Unavailable("the worker ended the stream without a result", code="worker_failed") from None
                if not started:
                    started = True
                    if not await asyncio.to_thread(self.jobs.start, job_id, self.owner):
                        stream.cancel()
                        raise JobCanceled
                if isinstance(item, WorkerResult):
                    return item
                if isinstance(item, EncodedImage):  # hashed off the loop: a 1024² PNG is megabytes
                    digest = await asyncio.to_thread(_sha256, item.png)
                    self.staging.stage(job.plan.caller.user_id, job_id, job.plan.family, item.index, item.png, digest)
                    continue
                data = {"step": item.step, "total": item.total_steps, "image": item.image_index,
                        "images": item.image_count}
                if await asyncio.to_thread(self.jobs.progress, job_id, self.owner, data):
                    job.cancel.set()
                self._on_change(job_id)
        finally:
            watcher.cancel()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unwrap(exc: BaseException) -> BaseException:
    """The exception a remote worker raised (Ray wraps it, keeping the original as `cause`)."""
    seen = {id(exc)}
    while isinstance(getattr(exc, "cause", None), BaseException) and id(exc.cause) not in seen:
        exc = exc.cause
        seen.add(id(exc))
    return exc


def _worker_failure(exc: BaseException, cause: BaseException) -> tuple[str, str]:
    """A stable code for why the worker call failed (a typed refusal, the replica died ...)."""
    if isinstance(cause, GenserveError):
        return cause.code, cause.message
    name = type(exc).__name__
    if "ActorDied" in name or "ActorError" in name or "ActorUnavailable" in name:
        return "worker_lost", f"the worker replica died: {name}"
    return "worker_failed", f"{name}: {cause}"[:500]
