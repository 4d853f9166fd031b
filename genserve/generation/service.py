"""`GenerationService`: the generation API's one entry, a thin façade over its parts.

    submit ─▶ admission (a frozen plan) ─▶ hold ─▶ job row (queued) ─▶ runner ─▶ settlement

A request enters here once (`submit`) and its result leaves here once (`get`, `wait`, `events`):
everything in between is `Admission` (what may run and what it costs), `Runner` (the worker and
its stream), `ImageStaging` and `Settlement` (what is delivered and charged). Every exit after the
hold settles it exactly once; a job no live process owns is settled by the `Reaper`.

The service knows workers only through `WorkerBackend` (a Ray Serve handle per family in
production, an in-process engine in tests), so the whole flow runs with or without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from genserve.billing.ledger import REVENUE_GENERATION, Ledger, user_account
from genserve.billing.pricing import Pricing
from genserve.core import metrics
from genserve.core.config import Settings
from genserve.core.db import Database
from genserve.core.errors import Conflict, NotFound
from genserve.core.storage import ObjectStore, object_store_from_settings
from genserve.economy.store import Economy
from genserve.generation.admission import Admission, Caller
from genserve.generation.inputs import InputImages
from genserve.generation.jobs import (
    GenerationJob,
    JobEvent,
    JobStatus,
    JobStore,
    idempotent_job_id,
    new_job_id,
    utcnow,
)
from genserve.generation.protocol import (
    MAX_RANDOM_SEED,
    BalanceView,
    GenerationRequest,
    JobView,
    Limits,
    QuoteView,
)
from genserve.generation.reaper import Reaper
from genserve.generation.runner import Runner, RunningJob, WorkerBackend
from genserve.generation.settlement import Settlement, hold_key
from genserve.generation.staging import ImageStaging
from genserve.generation.views import job_view, quote_view
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import load_model_catalog
from genserve.resources.registry import ResourceRegistry
from safety.gate import SafetyGate

logger = logging.getLogger(__name__)


class GenerationService:
    def __init__(self, settings: Settings, db: Database, store: ObjectStore, workers: WorkerBackend, *,
                 ledger: Ledger | None = None, pricing: Pricing | None = None, safety: SafetyGate | None = None,
                 limits: Limits | None = None):
        self.settings = settings
        self.config = settings.generation
        self.db = db
        self.store = store
        self.workers = workers
        self.jobs = JobStore(db)
        self.registry = ResourceRegistry(db, store)
        self.ledger = ledger or Ledger(db, settings.billing)
        self.economy = Economy(db, self.ledger, settings.billing)
        self.safety = safety or SafetyGate.build(settings.safety, settings.config_dir, db.session)
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.resource_cache = ResourceCache(store, settings.models_dir / "ingress-cache",
                                            settings.worker.resource_cache_max_bytes)
        self.admission = Admission(
            settings, registry=self.registry, catalog=load_model_catalog(settings.models_file),
            pricing=pricing or Pricing.from_settings(settings), safety=self.safety, resource_cache=self.resource_cache,
            limits=limits or Limits.load(settings.config_path(self.config.limits_file)), economy=self.economy,
            inputs=InputImages(store, self.jobs, self.config.input_images),
        )
        self.staging = ImageStaging(store, self.config.store_threads)
        settlement = Settlement(jobs=self.jobs, ledger=self.ledger, safety=self.safety, staging=self.staging,
                                owner=self.owner)
        self.runner = Runner(workers=workers, jobs=self.jobs, staging=self.staging, settlement=settlement,
                             owner=self.owner, on_change=self._wake)
        self._running: dict[str, RunningJob] = {}
        self._tasks: set[asyncio.Task] = set()
        self._notify: dict[str, asyncio.Event] = {}
        self._background: list[asyncio.Task] = []

    @classmethod
    def from_settings(cls, settings: Settings, workers: WorkerBackend, db: Database | None = None) -> GenerationService:
        return cls(settings, db or Database.from_settings(settings), object_store_from_settings(settings), workers)

    @property
    def inputs(self) -> InputImages:
        assert self.admission.inputs is not None
        return self.admission.inputs

    @property
    def limits(self) -> Limits:
        return self.admission.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self.admission.limits = limits

    # -- lifecycle ------------------------------------------------------------------------------

    def start_background(self) -> None:
        """Heartbeat for this owner's jobs and the reaper; call once inside a running event loop."""
        reaper = Reaper(self.jobs, self.ledger, store=self.store, stale_after_s=self.config.stale_after_s)
        self._background = [
            asyncio.create_task(self._every(self.config.heartbeat_interval_s, self._heartbeat)),
            asyncio.create_task(self._every(self.config.reaper_interval_s, reaper.reap_once)),
        ]

    @staticmethod
    async def _every(interval_s: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(fn)
            except Exception:  # noqa: BLE001 - a background loop must survive one bad round
                logger.exception("background task %s failed", getattr(fn, "__name__", fn))

    def _heartbeat(self) -> None:
        self.jobs.heartbeat(self.owner)
        # takedown names approved through any replica block here within one heartbeat
        self.safety.refresh_person_names()
        active = self.jobs.count_active_by_family()
        for family in self.admission.catalog.families:  # the gauge falls as well as rises
            metrics.set_gauge("genserve_queue_depth", active.get(family, 0), family=family)
        # cancellations asked through another replica reach this runner here
        for job in self.jobs.active(owner=self.owner):
            running = self._running.get(job.id)
            if running is not None and job.cancel_requested:
                running.cancel.set()

    async def close(self) -> None:
        for task in (*self._background, *self._tasks):
            task.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
        self.staging.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Hot settings from Serve's `user_config`: tier limits given inline under `limits`, or re-read
        from the limits file; every call also refreshes the blocklist index and re-reads the prompt
        rule files with the current person names (bump `revision` in user_config to trigger it)."""
        if "limits" in config:
            self.limits = Limits.model_validate(config["limits"])
        else:
            self.limits = Limits.load(self.settings.config_path(self.config.limits_file))
        self.safety.blocklist.refresh()
        self.safety.reload_rules()

    # -- the way in -------------------------------------------------------------------------------

    def balance(self, user_id: str) -> BalanceView:
        b = self.ledger.balance(user_account(user_id))
        return BalanceView(user_id=user_id, posted=b.posted, held=b.held, available=b.available)

    def quote(self, caller: Caller, request: GenerationRequest) -> QuoteView:
        """What the request would cost; checks everything a submit checks except funds and queues."""
        plan = self.admission.plan(caller, request)
        return quote_view(plan.quote, request.quantity, self.balance(caller.user_id).available)

    async def submit(self, caller: Caller, request: GenerationRequest) -> tuple[JobView, bool]:
        """Accept a generation and start it; `(job, False)` when the idempotency key named an earlier one."""
        job, running = await asyncio.to_thread(self._accept, caller, request)
        if running is not None:
            self._running[job.id] = running
            self._notify[job.id] = asyncio.Event()
            task = asyncio.create_task(self._run(running))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return job_view(job), running is not None

    def _accept(self, caller: Caller, request: GenerationRequest) -> tuple[GenerationJob, RunningJob | None]:
        fingerprint = request.fingerprint()
        if request.idempotency_key:
            existing = self.jobs.find_idempotent(caller.user_id, request.idempotency_key)
            if existing is not None:
                return _same_request(existing, fingerprint), None
        active = self.admission.check_queue(self.jobs, caller, request)
        plan = self.admission.plan(caller, request)
        job_id = idempotent_job_id(caller.user_id, request.idempotency_key) if request.idempotency_key else new_job_id()
        base_seed = request.seed if request.seed is not None else random.SystemRandom().randrange(MAX_RANDOM_SEED)
        seeds = [base_seed + i for i in range(request.quantity)]
        expires = utcnow() + dt.timedelta(seconds=plan.timeout_s + self.config.hold_margin_s)
        hold = self.ledger.hold(user_account(caller.user_id), plan.quote.total, hold_key(job_id),
                                destination=REVENUE_GENERATION, expires_at=expires, reason=f"generation {job_id}")
        inputs = plan.inputs
        input_keys = InputImages.keys(caller.user_id, job_id, inputs.image, inputs.mask) if inputs else []
        try:
            worker_request = plan.worker_request(job_id, seeds, plan.init_spec(*input_keys) if inputs else None)
            job, created = self.jobs.create(
                plan.job_row(job_id, worker_request, fingerprint, hold.id, self.owner),
                admit=lambda user_active, active: self.admission.check_counts(caller, request, user_active, active))
        except Exception:
            self.runner.settlement.release(job_id, hold.id)
            raise
        if not created:  # a concurrent retry with the same key won; its hold is this same hold
            return _same_request(job, fingerprint), None
        if inputs:
            # stored only by the request that created the job, once its row exists: a concurrent retry
            # stores nothing, and a crash in between leaves a job the reaper fails, refunds and cleans
            # (it deletes the job's prefix); the runner deletes them when the job ends
            try:
                self.inputs.put(input_keys, inputs.image, inputs.mask)
            except Exception as exc:
                self.inputs.delete(input_keys)
                self.runner.settlement.fail(job_id, getattr(exc, "code", "storage_error"),
                                            "the input image could not be stored")
                raise
        metrics.set_gauge("genserve_queue_depth", active + 1, family=plan.family)
        return job, RunningJob(job_id, plan, worker_request, hold.id, job.created_at)

    async def _run(self, running: RunningJob) -> None:
        try:
            await self.runner.run(running)
        finally:
            self._running.pop(running.job_id, None)
            self._wake(running.job_id)

    def _wake(self, job_id: str) -> None:
        """Let event streams in this process look at the log now instead of at their next poll."""
        event = self._notify.pop(job_id, None)
        if event is not None:
            event.set()
        if job_id in self._running:
            self._notify[job_id] = asyncio.Event()

    async def cancel(self, caller: Caller, job_id: str) -> JobView:
        """Ask a job to stop; a queued job ends at once, a running one within a step."""
        await asyncio.to_thread(self.jobs.request_cancel, job_id, caller.user_id)
        running = self._running.get(job_id)
        if running is not None:
            running.cancel.set()
        # otherwise another replica runs it: it sees the flag at its next step or heartbeat
        return job_view(await asyncio.to_thread(self.jobs.get, job_id, caller.user_id))

    # -- the way out ------------------------------------------------------------------------------

    def get(self, caller: Caller, job_id: str) -> JobView:
        return job_view(self.jobs.get(job_id, caller.user_id))

    async def wait(self, caller: Caller, job_id: str, timeout_s: float) -> JobView:
        """The job once it is finished, or as it is after `timeout_s`. A job this process runs for
        the caller is read once, when it ends (its runner says so); one run elsewhere is polled."""
        timeout_s = min(timeout_s, self.config.wait_timeout_s)
        running = self._running.get(job_id)
        if running is not None and running.plan.caller.user_id == caller.user_id:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(running.finished.wait(), timeout_s)
            return job_view(await asyncio.to_thread(self.jobs.get, job_id, caller.user_id))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            wakeup = self._notify.get(job_id)  # taken before the read, so a change in between is not missed
            job = await asyncio.to_thread(self.jobs.get, job_id, caller.user_id)
            remaining = deadline - asyncio.get_running_loop().time()
            if job.status.terminal or remaining <= 0:
                return job_view(job)
            await _sleep_until(wakeup, min(remaining, self.config.sse_poll_s))

    async def events(self, caller: Caller, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Every event of the job after `after_seq`, live, ending with its terminal status event."""
        await asyncio.to_thread(self.jobs.get, job_id, caller.user_id)
        seq = after_seq
        while True:
            wakeup = self._notify.get(job_id)
            rows = await asyncio.to_thread(self.jobs.events_after, job_id, seq)
            if not rows:
                # an ended job with nothing after `seq`: the caller has every event (a client that
                # reconnects after the end, or names an id past the last); the status is read before
                # the events again, and a job's terminal status and its last event commit together
                if (await asyncio.to_thread(self.jobs.get, job_id, caller.user_id)).status.terminal:
                    rows = await asyncio.to_thread(self.jobs.events_after, job_id, seq)
                    if not rows:
                        return
            for row in rows:
                seq = row.seq
                yield row
                if row.kind == "status" and JobStatus(row.data["status"]).terminal:
                    return
            if not rows:
                await _sleep_until(wakeup, self.config.sse_poll_s)

    def image(self, caller: Caller, job_id: str, index: int) -> tuple[str, bytes]:
        job = self.jobs.get(job_id, caller.user_id)
        for image in (job.result or {}).get("images", []):
            if image["index"] == index:
                return image["key"], self.store.get_bytes(image["key"])
        raise NotFound(f"generation {job_id} has no delivered image {index}", code="image_not_found")

    def count_active(self) -> int:
        return self.jobs.count_active()

    def job_figures(self) -> tuple[dict[str, int], dict[str, int]]:
        """Jobs by status, and active jobs by family, of the whole service (the database's)."""
        return self.jobs.count_by_status(), self.jobs.count_active_by_family()

    def image_url(self, caller: Caller, job_id: str, index: int) -> str | None:
        """A presigned HTTP(S) URL of a delivered image, or None when the store has none to give (the
        local store's would be a `file://` path on this server: never handed to a client)."""
        job = self.jobs.get(job_id, caller.user_id)
        key = next((i["key"] for i in (job.result or {}).get("images", []) if i["index"] == index), None)
        if key is None:
            raise NotFound(f"generation {job_id} has no delivered image {index}", code="image_not_found")
        url = self.store.presigned_get_url(key, self.settings.storage.presign_expiry_s)
        return url if url.startswith(("https://", "http://")) else None


def _same_request(job: GenerationJob, fingerprint: str) -> GenerationJob:
    if job.request_hash != fingerprint:
        raise Conflict("this idempotency key was used for a different request", code="idempotency_key_reused",
                       details={"job_id": job.id})
    return job


async def _sleep_until(wakeup: asyncio.Event | None, timeout_s: float) -> None:
    """Until this process records a change of the job, or `timeout_s` (changes made elsewhere)."""
    if wakeup is None:
        await asyncio.sleep(timeout_s)
        return
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(wakeup.wait(), timeout_s)
