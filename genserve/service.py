"""The orchestration of one generation, from an authenticated request to a finished, billed job.

    validate + tier limits + admission ─▶ resolve resources ─▶ safety precheck ─▶ quote ─▶ hold
    ─▶ persist (queued) ─▶ worker stream (progress → events) ─▶ postcheck each image ─▶ store PNGs
    ─▶ capture for delivered images (the rest of the hold is voided) ─▶ succeeded | blocked | failed | canceled

Every exit after the hold settles it exactly once: capture what was delivered, or release it all
(block, failure, cancellation, timeout, a dead worker). The job row's conditional transitions decide
who settles when the runner and the reaper race. Every safety decision is appended to the audit log.

The service knows workers only through `WorkerBackend` (a Ray Serve handle per family in
production, an in-process engine in tests), so the whole flow runs with or without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import logging
import os
import random
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from genserve import metrics
from genserve.billing.ledger import REVENUE_GENERATION, Ledger, user_account
from genserve.billing.pricing import HiresParams, Pricing, Quote
from genserve.config import Settings
from genserve.db import Database
from genserve.engine.infotext import PNG_TEXT_KEY
from genserve.engine.streaming import stream_from_thread
from genserve.errors import (
    Conflict,
    Forbidden,
    GenserveError,
    InvalidRequest,
    NotFound,
    QueueFull,
    SafetyBlocked,
    Unavailable,
)
from genserve.jobs import (
    GenerationJob,
    JobEvent,
    JobStatus,
    JobStore,
    idempotent_job_id,
    image_key,
    new_job_id,
    utcnow,
)
from genserve.model_catalog import load_model_catalog
from genserve.registry import ResolvedResource, ResolvedResources, ResourceRegistry
from genserve.resource_cache import ResourceCache
from genserve.resources import ResourceKind
from genserve.schemas import (
    API_VERSION,
    MAX_HIRES_SIDE,
    MAX_RANDOM_SEED,
    BalanceView,
    ErrorView,
    GenerationRequest,
    ImageView,
    JobView,
    Limits,
    NsfwLevel,
    ProgressView,
    QuoteItemView,
    QuoteView,
    WithheldImageView,
)
from genserve.storage import ObjectStore, object_store_from_settings
from genserve.worker_types import (
    EncodedImage,
    HiresSpec,
    LoraSpec,
    WorkerRequest,
    WorkerResult,
    WorkerStreamItem,
)
from safety.audit_log import AuditLog
from safety.errors import SafetyError
from safety.hashing import load_tensors
from safety.image_scan import NsfwLevel as ScanLevel
from safety.image_scan import ScanResult
from safety.likeness import Fingerprint, LikenessBlocklist, LikenessConfig, LikenessMatch, fingerprint_lora
from safety.policy import LikenessHit, ResourceFlags, SafetyPolicy
from safety.prompt_audit import PromptAuditor
from safety.store import person_names
from safety.takedowns import TakedownRecord, Takedowns
from safety.verdict import Verdict

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Caller:
    """Who a request is for, as the site's back end vouched for it."""

    user_id: str
    tier: str | None = None
    max_nsfw_level: NsfwLevel = NsfwLevel.pg13
    request_id: str | None = None


class WorkerStream(Protocol):
    def __aiter__(self) -> AsyncIterator[WorkerStreamItem]: ...

    def cancel(self) -> None: ...


class WorkerBackend(Protocol):
    """Starts a generation on the worker that serves `family`: progress and encoded images stream back,
    then one WorkerResult."""

    def generate(self, family: str, request: WorkerRequest) -> WorkerStream: ...

    def is_backpressure(self, exc: BaseException) -> bool: ...


class InProcessWorkers:
    """`WorkerBackend` running the real engine (`WorkerCore`) in this process, one per family: the
    whole generation flow without Ray (tests, benchmarks, a one-process deployment)."""

    def __init__(self, cores: dict[str, Any]):
        self.cores = cores

    def generate(self, family: str, request: WorkerRequest) -> _ThreadStream:
        core = self.cores.get(family)
        if core is None:
            raise Unavailable(f"no worker serves the {family} family", code="family_unavailable")
        return _ThreadStream(core, request)

    @staticmethod
    def is_backpressure(exc: BaseException) -> bool:
        return False


class _ThreadStream:
    """Runs one generation in a thread and streams its progress events, then its result."""

    def __init__(self, core: Any, request: WorkerRequest):
        self._core = core
        self._request = request
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[WorkerStreamItem]:
        core, request, cancel = self._core, self._request, self._cancel
        return stream_from_thread(lambda on_event: core.generate(request, on_event, cancel), cancel)


@dataclass
class SafetyGate:
    """The safety components one generation passes through."""

    auditor: PromptAuditor
    policy: SafetyPolicy
    blocklist: LikenessBlocklist
    audit: AuditLog

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> SafetyGate:
        rules_dir = settings.config_path(settings.safety.rules_dir)
        with db.session() as s:
            names = person_names(s)
        auditor = PromptAuditor.from_dir(rules_dir, extra_person_names=names)
        likeness = LikenessConfig.load(rules_dir / settings.safety.likeness_file)
        return cls(auditor, SafetyPolicy(auditor), LikenessBlocklist(db.session, likeness), AuditLog(db.session))

    def refresh_person_names(self, db: Database) -> None:
        """Names added by approved takedowns reach the prompt audit without a restart."""
        with db.session() as s:
            names = person_names(s)
        if set(names) != set(self.auditor.extra_person_names):
            self.auditor = self.auditor.with_person_names(
                [n for n in names if n not in self.auditor.extra_person_names])
            self.policy = SafetyPolicy(self.auditor)

    def reload_rules(self, settings: Settings, db: Database) -> None:
        """Re-read the prompt-audit rule files (a new rule list rolls out without a restart).

        The new auditor is built completely before it replaces the old one, so a bad file leaves
        the running rules in force (and raises RulesInvalid to the caller)."""
        with db.session() as s:
            names = person_names(s)
        auditor = PromptAuditor.from_dir(settings.config_path(settings.safety.rules_dir), extra_person_names=names)
        self.auditor, self.policy = auditor, SafetyPolicy(auditor)


@dataclass
class _Plan:
    """What one accepted request needs in memory while it runs (the rest is in the job row)."""

    caller: Caller
    resources: ResolvedResources
    verdict: Verdict
    allowed: NsfwLevel
    quote: Quote
    worker_request: WorkerRequest
    timeout_s: float
    hold_id: str
    created_at: dt.datetime
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set once the job is settled


@dataclass(frozen=True)
class _StagedImage:
    """A finished image on its way into the object store while the worker still scans it."""

    key: str
    digest: str
    png: bytes
    stored: Future  # the put; `_deliver` waits for it, `_discard_staged` before deleting


class JobCanceled(Exception):
    """Raised inside a runner when its job was asked to stop."""


# --------------------------------------------------------------------------------------------- service


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: ObjectStore,
        workers: WorkerBackend,
        *,
        ledger: Ledger | None = None,
        pricing: Pricing | None = None,
        safety: SafetyGate | None = None,
        limits: Limits | None = None,
    ):
        self.settings = settings
        self.config = settings.generation
        self.db = db
        self.store = store
        self.workers = workers
        self.jobs = JobStore(db)
        self.registry = ResourceRegistry(db, store)
        self.ledger = ledger or Ledger(db, settings.billing)
        self.pricing = pricing or Pricing.from_settings(settings)
        self.safety = safety or SafetyGate.from_settings(settings, db)
        self.limits = limits or Limits.load(settings.config_path(self.config.limits_file))
        self.catalog = load_model_catalog(settings.config_path("models.yaml"))
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.resource_cache = ResourceCache(
            store, settings.models_dir / "ingress-cache", settings.worker.resource_cache_max_bytes
        )
        self.takedowns = Takedowns(db.session, self.safety.blocklist, self.safety.audit)
        self._fingerprints: OrderedDict[str, Fingerprint] = OrderedDict()
        self._plans: dict[str, _Plan] = {}
        self._tasks: set[asyncio.Task] = set()
        self._notify: dict[str, asyncio.Event] = {}
        self._background: list[asyncio.Task] = []
        # job id -> image index -> image stored but not (yet) listed by a finished job
        self._staged: dict[str, dict[int, _StagedImage]] = {}
        self._storing = ThreadPoolExecutor(self.config.store_threads, thread_name_prefix="genserve-store")

    @classmethod
    def from_settings(cls, settings: Settings, workers: WorkerBackend, db: Database | None = None) -> GenerationService:
        return cls(settings, db or Database.from_settings(settings), object_store_from_settings(settings), workers)

    # -- lifecycle ------------------------------------------------------------------------------

    def start_background(self) -> None:
        """Heartbeat for this owner's jobs and the reaper; call once inside a running event loop."""
        from genserve.reaper import Reaper

        reaper = Reaper(self.jobs, self.ledger, store=self.store, stale_after_s=self.config.stale_after_s)
        self._background = [
            asyncio.create_task(self._every(self.config.heartbeat_interval_s, self._heartbeat)),
            asyncio.create_task(self._every(self.config.reaper_interval_s, reaper.reap_once)),
        ]

    async def _every(self, interval_s: float, fn) -> None:  # noqa: ANN001
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(fn)
            except Exception:  # noqa: BLE001 - a background loop must survive one bad round
                logger.exception("background task %s failed", getattr(fn, "__name__", fn))

    def _heartbeat(self) -> None:
        self.jobs.heartbeat(self.owner)
        # cancellations asked through another replica reach this runner here
        for job in self.jobs.active(owner=self.owner):
            plan = self._plans.get(job.id)
            if plan is not None and job.cancel_requested:
                plan.cancel.set()

    async def close(self) -> None:
        for task in (*self._background, *self._tasks):
            task.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
        self._storing.shutdown(wait=True)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Hot settings from Serve's `user_config`: tier limits given inline under `limits`, or re-read
        from the limits file; every call also refreshes the blocklist index and re-reads the prompt
        rule files with the current person names (bump `revision` in user_config to trigger it)."""
        if "limits" in config:
            self.limits = Limits.model_validate(config["limits"])
        else:
            self.limits = Limits.load(self.settings.config_path(self.config.limits_file))
        self.safety.blocklist.refresh()
        self.safety.reload_rules(self.settings, self.db)

    # -- quotes and balances --------------------------------------------------------------------

    def balance(self, user_id: str) -> BalanceView:
        b = self.ledger.balance(user_account(user_id))
        return BalanceView(user_id=user_id, posted=b.posted, held=b.held, available=b.available)

    def quote(self, caller: Caller, request: GenerationRequest) -> QuoteView:
        """What the request would cost; checks everything a submit checks except funds and queues."""
        _, resources, _, quote = self._prepare(caller, request)
        return self._quote_view(quote, request.quantity, self.balance(caller.user_id).available)

    @staticmethod
    def _quote_view(quote: Quote, quantity: int, available: int | None = None) -> QuoteView:
        items = [QuoteItemView(name=i.name, amount=i.amount, detail=i.detail) for i in quote.items]
        return QuoteView(total=quote.total, per_image=quote.per_image, quantity=quantity, items=items,
                         balance_available=available)

    # -- validation -----------------------------------------------------------------------------

    def _size(self, family: str, request: GenerationRequest) -> tuple[int, int]:
        entry = self.catalog.families.get(family)
        if entry is None:
            raise Unavailable(f"no worker serves the {family} family", code="family_unavailable")
        size = (request.width, request.height) if request.width else tuple(entry.default_size)
        allowed = {tuple(s) for s in entry.allowed_sizes} or {tuple(entry.default_size)}
        if size not in allowed:
            raise InvalidRequest(
                f"{size[0]}x{size[1]} is not an allowed {family} size",
                code="size_not_allowed",
                details={"allowed": sorted([list(s) for s in allowed])},
            )
        return size

    def _check_tier(self, caller: Caller, request: GenerationRequest) -> None:
        tier = self.limits.tier(caller.tier)
        over = {
            name: {"requested": value, "max": limit}
            for name, value, limit in (
                ("quantity", request.quantity, tier.quantity),
                ("steps", request.steps, tier.steps),
                ("resources", len(request.resources), tier.resources),
                ("hires.steps", request.hires.steps if request.hires else 0, tier.steps),
            )
            if value > limit
        }
        if over:
            raise InvalidRequest(f"over the {caller.tier or self.limits.default_tier} tier's limits: {sorted(over)}",
                                 code="tier_limit_exceeded", details=over)
        if request.priority not in tier.priorities:
            raise Forbidden(f"priority {request.priority.value} is not part of this tier",
                            code="priority_not_allowed", details={"allowed": [p.value for p in tier.priorities]})
        if request.hires and not tier.hires:
            raise Forbidden("hires fix is not part of this tier", code="hires_not_allowed")

    def _check_tokens(self, resources: ResolvedResources) -> None:
        """A user embedding may not use (or contain) a safety embedding's token: it could stand in for it."""
        family = self.catalog.families.get(resources.family)
        reserved = [e.token.lower() for e in family.safety_embeddings.values()] if family else []
        for res in resources.embeddings:
            token = (res.token or "").lower()
            if any(r in token or r.strip("<>") in token for r in reserved):
                raise InvalidRequest(f"embedding {res.id} uses a reserved safety token", code="reserved_token",
                                     details={"id": res.id})

    def _hires(self, request: GenerationRequest, size: tuple[int, int]) -> HiresSpec | None:
        if request.hires is None:
            return None
        target = [round(side * request.hires.scale / 8) * 8 for side in size]
        if max(target) > MAX_HIRES_SIDE:
            raise InvalidRequest(f"hires fix would make {target[0]}x{target[1]}; the longest side is "
                                 f"{MAX_HIRES_SIDE}", code="hires_too_large")
        h = request.hires
        return HiresSpec(scale=h.scale, denoise=h.denoise, steps=h.steps, upscaler=h.upscaler)

    def _likeness(self, resources: ResolvedResources) -> list[tuple[ResolvedResource, LikenessMatch]]:
        """Every LoRA and embedding against the likeness blocklist: hashes for all, weights for LoRAs
        (so a renamed or re-exported copy still matches). A file that cannot be read fails closed."""
        hits = []
        for res in resources.extras:
            hit = self.safety.blocklist.check_hashes(res.sha256, res.tensor_sha256)
            if hit is None and res.kind is ResourceKind.lora:
                hit = self.safety.blocklist.match_fingerprint(self._fingerprint(res))
            if hit is not None:
                hits.append((res, hit))
        return hits

    def _fingerprint(self, res: ResolvedResource) -> Fingerprint:
        fp = self._fingerprints.get(res.sha256)
        if fp is None:
            with self.resource_cache.use(res.storage_key, res.sha256, "file") as path:
                fp = fingerprint_lora(*load_tensors(path))
            self._fingerprints[res.sha256] = fp
            while len(self._fingerprints) > 4096:
                self._fingerprints.popitem(last=False)
        self._fingerprints.move_to_end(res.sha256)
        return fp

    def _precheck(self, caller: Caller, request: GenerationRequest, resources: ResolvedResources,
                  allowed: NsfwLevel) -> Verdict:
        hits = self._likeness(resources)
        flags = [ResourceFlags(r.id, r.minor, r.poi, r.sfw_only) for r in resources.all]
        verdict = self.safety.policy.precheck(
            request.prompt, request.negative_prompt, resources=flags,
            likeness_hits=[LikenessHit(r.id, f"likeness.{hit.method}", f"matches a blocklisted likeness of {hit.person}")
                           for r, hit in hits],
            allowed_level=allowed.value,
        )
        self.safety.audit.append_verdict(
            verdict, kind="precheck", subject=[r.sha256 for r in resources.all], request_id=caller.request_id,
            user_id=caller.user_id, details={"resources": [r.id for r in resources.all],
                                             "likeness": [{"resource": r.id, **h.to_dict()} for r, h in hits]},
        )
        if verdict.blocked:
            for rule in verdict.rule_ids:
                metrics.inc("genserve_prompts_blocked_total", rule=rule)
            raise SafetyBlocked(
                "the request was refused by the safety policy",
                details={"rules": verdict.rule_ids, "reasons": [r.to_dict() for r in verdict.reasons]},
            )
        return verdict

    def _prepare(self, caller: Caller, request: GenerationRequest) -> tuple[tuple[int, int], ResolvedResources, Verdict, Quote]:
        """Steps 2-4 short of the hold: limits, resources, precheck, price."""
        self._check_tier(caller, request)
        resources = self.registry.resolve(request.checkpoint, request.resources, caller.user_id)
        self._check_tokens(resources)
        size = self._size(resources.family, request)
        hires = self._hires(request, size)
        allowed = NsfwLevel.lowest(caller.max_nsfw_level, request.nsfw_level)
        with metrics.stage_timer("audit", resources.family):
            verdict = self._precheck(caller, request, resources, allowed)
        quote = self.pricing.quote_generation(
            resources.family, size[0], size[1], request.steps, request.quantity,
            extra_resources=len(resources.extras),
            hires=HiresParams.upscaled(size[0], size[1], hires.scale, hires.steps or request.steps) if hires else None,
        )
        return size, resources, verdict, quote

    def _admit(self, caller: Caller, request: GenerationRequest) -> int:
        """Refuse (429) past the user's queue limit or the service's capacity; returns the active jobs."""
        tier = self.limits.tier(caller.tier)
        user_active, active = self.jobs.active_counts(caller.user_id)
        if user_active >= tier.queue:
            raise QueueFull(f"{tier.queue} generations are already queued or running for this user",
                            code="queue_limit", retry_after_s=self.limits.retry_after_s,
                            details={"limit": tier.queue})
        if not self.limits.admits(request.priority, active):
            raise QueueFull("the service is at capacity; try again shortly", code="queue_full",
                            retry_after_s=self.limits.retry_after_s)
        return active

    # -- submit ---------------------------------------------------------------------------------

    async def submit(self, caller: Caller, request: GenerationRequest) -> tuple[JobView, bool]:
        """Accept a generation and start it; `(job, False)` when the idempotency key named an earlier one."""
        job, created, plan = await asyncio.to_thread(self._accept, caller, request)
        if created:
            self._plans[job.id] = plan
            self._notify[job.id] = asyncio.Event()
            task = asyncio.create_task(self._run(job.id, plan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self._view(job), created

    def _accept(self, caller: Caller, request: GenerationRequest) -> tuple[GenerationJob, bool, _Plan | None]:
        fingerprint = request.fingerprint()
        if request.idempotency_key:
            existing = self.jobs.find_idempotent(caller.user_id, request.idempotency_key)
            if existing is not None:
                return self._same_request(existing, fingerprint), False, None
        active = self._admit(caller, request)
        size, resources, verdict, quote = self._prepare(caller, request)
        job_id = idempotent_job_id(caller.user_id, request.idempotency_key) if request.idempotency_key else new_job_id()
        base_seed = request.seed if request.seed is not None else random.SystemRandom().randrange(MAX_RANDOM_SEED)
        seeds = [base_seed + i for i in range(request.quantity)]
        allowed = NsfwLevel.lowest(caller.max_nsfw_level, request.nsfw_level)
        worker_request = WorkerRequest(
            job_id=job_id, checkpoint_id=resources.checkpoint.id, prompt=request.prompt,
            negative_prompt=request.negative_prompt, mature=verdict.mature, sampler=request.sampler.value,
            steps=request.steps, cfg_scale=request.cfg_scale, clip_skip=request.clip_skip, width=size[0],
            height=size[1], seeds=seeds, loras=[LoraSpec(resource_id=r.id, strength=r.strength) for r in resources.loras],
            embeddings=[r.id for r in resources.embeddings], hires=self._hires(request, size),
        )
        timeout_s = self.config.job_timeout_s + self.config.timeout_per_resource_s * len(resources.extras)
        expires = utcnow() + dt.timedelta(seconds=timeout_s + self.config.hold_margin_s)
        hold = self.ledger.hold(user_account(caller.user_id), quote.total, f"gen:{job_id}:hold",
                                destination=REVENUE_GENERATION, expires_at=expires, reason=f"generation {job_id}")
        row = GenerationJob(
            id=job_id, user_id=caller.user_id, family=resources.family, checkpoint_id=resources.checkpoint.id,
            priority=request.priority.value, quantity=request.quantity, idempotency_key=request.idempotency_key,
            request_hash=fingerprint, quote={"total": quote.total, "per_image": quote.per_image},
            quote_total=quote.total, hold_id=hold.id, owner=self.owner,
            request={
                **worker_request.model_dump(mode="json", exclude={"schema_version"}),
                "allowed_nsfw_level": allowed.value, "tier": caller.tier,
                "resources": [r.to_dict() for r in resources.all],
                "precheck": {"action": verdict.action.value, "rules": verdict.rule_ids, "mature": verdict.mature},
            },
        )
        try:
            job, created = self.jobs.create(row)
        except Exception:
            self._release(job_id, hold.id)
            raise
        if not created:  # a concurrent retry with the same key won; its hold is this same hold
            return self._same_request(job, fingerprint), False, None
        metrics.set_gauge("genserve_queue_depth", active + 1, family=resources.family)
        plan = _Plan(caller, resources, verdict, allowed, quote, worker_request, timeout_s, hold.id, job.created_at)
        return job, True, plan

    @staticmethod
    def _same_request(job: GenerationJob, fingerprint: str) -> GenerationJob:
        if job.request_hash != fingerprint:
            raise Conflict("this idempotency key was used for a different request", code="idempotency_key_reused",
                           details={"job_id": job.id})
        return job

    # -- running --------------------------------------------------------------------------------

    async def _run(self, job_id: str, plan: _Plan) -> None:
        try:
            await self._run_to_end(job_id, plan)
        except asyncio.CancelledError:  # the service is shutting down: give the buzz back now
            self._fail(job_id, "service_stopped", "the service stopped before the generation finished")
            self._discard_staged(job_id)
            raise
        except Exception:  # noqa: BLE001 - the last line of defence: the hold must be settled
            logger.exception("generation %s crashed", job_id)
            await asyncio.to_thread(self._fail, job_id, "internal_error", "the generation failed unexpectedly")
        finally:
            try:  # whatever the job does not list (withheld, or it did not succeed) leaves the store
                if self._staged.get(job_id):
                    await asyncio.to_thread(self._discard_staged, job_id)
            finally:
                self._staged.pop(job_id, None)
                self._plans.pop(job_id, None)
                plan.finished.set()
                self._wake(job_id)

    async def _run_to_end(self, job_id: str, plan: _Plan) -> None:
        try:
            result = await asyncio.wait_for(self._generate(job_id, plan), plan.timeout_s)
        except JobCanceled:
            await asyncio.to_thread(self._settle_without_images, job_id, JobStatus.canceled,
                                    ("canceled", "the generation was canceled"))
            return
        except asyncio.TimeoutError:
            await asyncio.to_thread(self._fail, job_id, "timeout", f"no result within {plan.timeout_s:.0f} s")
            return
        except Exception as exc:  # noqa: BLE001 - a refusal, a dead replica, a bug in the engine
            cause = _unwrap(exc)
            if isinstance(cause, (SafetyBlocked, SafetyError)):
                await asyncio.to_thread(self._worker_refused, job_id, plan, cause)
            else:
                code, message = _worker_failure(exc, cause)
                logger.warning("generation %s failed on the worker: %s", job_id, message)
                await asyncio.to_thread(self._fail, job_id, code, message)
            return
        if result.canceled:
            await asyncio.to_thread(self._settle_without_images, job_id, JobStatus.canceled,
                                    ("canceled", "the generation was canceled"))
            return
        await asyncio.to_thread(self._deliver, job_id, plan, result)

    async def _generate(self, job_id: str, plan: _Plan) -> WorkerResult:
        """Dispatch to the worker (waiting while its queue is full) and follow the stream to its result."""
        delay = 0.2
        while True:
            if plan.cancel.is_set():
                raise JobCanceled
            stream = self.workers.generate(plan.resources.family, plan.worker_request)
            try:
                return await self._follow(job_id, plan, stream)
            except Exception as exc:
                if not self.workers.is_backpressure(exc):
                    raise
            # the worker deployment's queue is full: the job stays queued here (bounded by admission)
            try:
                await asyncio.wait_for(plan.cancel.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 2.0)

    async def _follow(self, job_id: str, plan: _Plan, stream: WorkerStream) -> WorkerResult:
        started = False
        watcher = asyncio.create_task(plan.cancel.wait())
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
                    self._stage(job_id, plan, item, await asyncio.to_thread(_sha256, item.png))
                    continue
                data = {"step": item.step, "total": item.total_steps, "image": item.image_index,
                        "images": item.image_count}
                if await asyncio.to_thread(self.jobs.progress, job_id, self.owner, data):
                    plan.cancel.set()
                self._wake(job_id)
        finally:
            watcher.cancel()

    def _stage(self, job_id: str, plan: _Plan, item: EncodedImage, digest: str) -> None:
        """Start storing a finished image while the worker scans it. Its key names its `digest`, so no
        one can ask for it before the job lists it; `_deliver` lists it or leaves it to be deleted."""
        key = image_key(plan.caller.user_id, job_id, item.index, digest)
        family = plan.resources.family

        def put() -> None:
            with metrics.stage_timer("store", family):
                self.store.put_bytes(key, item.png, content_type="image/png")

        self._staged.setdefault(job_id, {})[item.index] = _StagedImage(key, digest, item.png, self._storing.submit(put))

    def _discard_staged(self, job_id: str, images: dict[int, _StagedImage] | None = None) -> None:
        """Delete stored images no finished job lists: `images`, or all of `job_id`'s still staged."""
        staged = images if images is not None else self._staged.get(job_id, {})
        while staged:
            _, image = staged.popitem()
            with contextlib.suppress(Exception):  # a failed put stored nothing; delete regardless
                image.stored.result()  # a put still running would land after the delete
            try:
                self.store.delete(image.key)
            except GenserveError:
                logger.error("could not delete undelivered image %s", image.key)

    def _wake(self, job_id: str) -> None:
        """Let event streams in this process look at the log now instead of at their next poll."""
        event = self._notify.pop(job_id, None)
        if event is not None:
            event.set()
        if job_id in self._plans:
            self._notify[job_id] = asyncio.Event()

    # -- settling -------------------------------------------------------------------------------

    def _release(self, job_id: str, hold_id: str | None) -> None:
        if hold_id:
            try:
                self.ledger.release(hold_id, f"gen:{job_id}:release")
            except GenserveError as exc:  # already closed (the reaper or the expiry got there first)
                logger.info("hold %s of %s not released: %s", hold_id, job_id, exc.code)

    def _settle_without_images(self, job_id: str, status: JobStatus, error: tuple[str, str],
                               result: dict | None = None) -> bool:
        job = self.jobs.get(job_id)
        if not self.jobs.finish(job_id, status, owner=self.owner, error=error, result=result):
            return False
        self._release(job_id, job.hold_id)
        metrics.inc("genserve_jobs_total", family=job.family, status=status.value)
        return True

    def _fail(self, job_id: str, code: str, message: str) -> bool:
        return self._settle_without_images(job_id, JobStatus.failed, (code, message))

    def _worker_refused(self, job_id: str, plan: _Plan, exc: Exception) -> None:
        """The worker's own checks (defence in depth) refused a resource: blocked, nothing charged."""
        code = getattr(exc, "code", "safety_blocked")
        details = getattr(exc, "details", {}) or {}
        rules = details.get("rules") or [code]
        self.safety.audit.append("worker_refusal", "block", rules=rules, job_id=job_id, user_id=plan.caller.user_id,
                                 request_id=plan.caller.request_id, details={"message": str(exc)})
        self._settle_without_images(job_id, JobStatus.blocked, (code, str(getattr(exc, "message", exc))),
                                    result={"images": [], "withheld": [], "rules": rules})

    def _deliver(self, job_id: str, plan: _Plan, result: WorkerResult) -> None:
        """Postcheck each image, list the stored ones that pass, capture, finish. An image stays
        staged (and `_run` deletes it) unless the finished job lists it."""
        family = plan.resources.family
        staged = self._staged.get(job_id, {})
        images, withheld = [], []
        for image in sorted(result.images, key=lambda i: i.index):
            stage = staged.get(image.index)
            decision = self.safety.policy.postcheck(_scan_result(image.scan), plan.verdict, plan.allowed.value)
            deliver = bool(decision.deliver and image.deliverable and stage is not None)
            reasons = decision.rule_ids or ([] if deliver else ["scan_failed"])
            if stage is None:  # the worker reported an image whose PNG it never sent
                reasons = ["image_missing"]
            level = decision.level.name.lower()
            # review = withheld and queued for a moderator; an undeliverable image the policy let through is a block
            action = "allow" if deliver else ("block" if decision.deliver else decision.action.value)
            self.safety.audit.append(
                "postcheck", action, rules=reasons, subject=stage.digest if stage else None, job_id=job_id,
                user_id=plan.caller.user_id, request_id=plan.caller.request_id,
                details={"index": image.index, "seed": image.seed, "level": level, "allowed": plan.allowed.value,
                         "severity": decision.severity.value, "scan_errors": list(image.scan.errors)},
            )
            if deliver:
                try:
                    stage.stored.result()
                except GenserveError as exc:
                    logger.error("storing %s failed: %s", stage.key, exc)
                    withheld.append({"index": image.index, "seed": image.seed, "nsfw_level": level,
                                     "reasons": ["storage_failed"]})
                    continue
                images.append({"index": image.index, "seed": image.seed, "key": stage.key, "nsfw_level": level,
                               "sha256": stage.digest})
            else:
                metrics.inc("genserve_images_withheld_total", value=1, rule=reasons[0])
                withheld.append({"index": image.index, "seed": image.seed, "nsfw_level": level, "reasons": reasons})
        charge = plan.quote.for_delivered(len(images))
        status = JobStatus.succeeded if images else JobStatus.blocked
        body = {
            "images": images, "withheld": withheld,
            "infotext": _infotext(staged[images[0]["index"]].png) if images else None,
            "final_prompt": result.final_prompt, "final_negative_prompt": result.final_negative_prompt,
            "model_hash": result.model_hash, "lora_hashes": result.lora_hashes, "timings_ms": result.timings_ms,
        }
        try:
            self.ledger.capture(plan.hold_id, charge, f"gen:{job_id}:capture")
        except GenserveError as exc:
            logger.error("capture for %s failed: %s", job_id, exc.code)
            self._fail(job_id, "billing_failed", f"the charge could not be settled: {exc.code}")
            return
        listed = {i["index"]: stage for i in images if (stage := staged.pop(i["index"], None)) is not None}
        error = None if images else ("all_images_withheld", "every image was withheld by the safety policy")
        if not self.jobs.finish(job_id, status, owner=self.owner, result=body, charged=charge, error=error):
            logger.error("generation %s was finished by someone else after its capture", job_id)
            self._discard_staged(job_id, listed)
        metrics.inc("genserve_jobs_total", family=family, status=status.value)
        metrics.inc("genserve_images_generated_total", value=len(result.images), family=family)
        _record_latencies(family, plan.created_at, result)

    # -- reads ----------------------------------------------------------------------------------

    def get(self, caller: Caller, job_id: str) -> JobView:
        return self._view(self.jobs.get(job_id, caller.user_id))

    async def wait(self, caller: Caller, job_id: str, timeout_s: float) -> JobView:
        """The job once it is finished, or as it is after `timeout_s`. A job this process runs for
        the caller is read once, when it ends (its runner says so); one run elsewhere is polled."""
        timeout_s = min(timeout_s, self.config.wait_timeout_s)
        plan = self._plans.get(job_id)
        if plan is not None and plan.caller.user_id == caller.user_id:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(plan.finished.wait(), timeout_s)
            return self._view(await asyncio.to_thread(self.jobs.get, job_id, caller.user_id))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            wakeup = self._notify.get(job_id)  # taken before the read, so a change in between is not missed
            job = await asyncio.to_thread(self.jobs.get, job_id, caller.user_id)
            remaining = deadline - asyncio.get_running_loop().time()
            if job.status.terminal or remaining <= 0:
                return self._view(job)
            await self._sleep_until(wakeup, min(remaining, self.config.sse_poll_s))

    @staticmethod
    async def _sleep_until(wakeup: asyncio.Event | None, timeout_s: float) -> None:
        """Until this process records a change of the job, or `timeout_s` (changes made elsewhere)."""
        if wakeup is None:
            await asyncio.sleep(timeout_s)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout_s)

    async def events(self, caller: Caller, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Every event of the job after `after_seq`, live, ending with its terminal status event."""
        await asyncio.to_thread(self.jobs.get, job_id, caller.user_id)
        seq = after_seq
        while True:
            wakeup = self._notify.get(job_id)
            rows = await asyncio.to_thread(self.jobs.events_after, job_id, seq)
            for row in rows:
                seq = row.seq
                yield row
                if row.kind == "status" and JobStatus(row.data["status"]).terminal:
                    return
            if not rows:
                await self._sleep_until(wakeup, self.config.sse_poll_s)

    def image(self, caller: Caller, job_id: str, index: int) -> tuple[str, bytes]:
        job = self.jobs.get(job_id, caller.user_id)
        for image in (job.result or {}).get("images", []):
            if image["index"] == index:
                return image["key"], self.store.get_bytes(image["key"])
        raise NotFound(f"generation {job_id} has no delivered image {index}", code="image_not_found")

    def image_url(self, caller: Caller, job_id: str, index: int) -> str:
        key, _ = self.image(caller, job_id, index)
        return self.store.presigned_get_url(key, self.settings.storage.presign_expiry_s)

    # -- cancel ---------------------------------------------------------------------------------

    async def cancel(self, caller: Caller, job_id: str) -> JobView:
        """Ask a job to stop; a queued job ends at once, a running one within a step."""
        await asyncio.to_thread(self.jobs.request_cancel, job_id, caller.user_id)
        plan = self._plans.get(job_id)
        if plan is not None:
            plan.cancel.set()
        # otherwise another replica runs it: it sees the flag at its next step or heartbeat
        return self._view(await asyncio.to_thread(self.jobs.get, job_id, caller.user_id))

    # -- moderation -----------------------------------------------------------------------------

    def _resource_file(self, resource_id: str) -> ResolvedResource:
        res = ResolvedResource.from_row(self.registry.get(resource_id))
        if res.format != "safetensors":
            raise InvalidRequest(f"{resource_id} is not a single safetensors file", code="not_a_file_resource")
        return res

    def add_likeness(self, resource_id: str, person: str, reason: str = "", source: str = "") -> int:
        """Blocklist a registered resource's file; copies of it (renamed, re-exported) match too."""
        res = self._resource_file(resource_id)
        with self.resource_cache.use(res.storage_key, res.sha256, "file") as path:
            entry_id = self.safety.blocklist.add(path, person, reason, source=source or "admin-api",
                                                 created_by="admin-api", resource_id=resource_id)
        self.safety.audit.append("likeness", "block", rules=["likeness.admin"], subject=res.sha256,
                                 details={"entry_id": entry_id, "resource_id": resource_id, "person": person,
                                          "reason": reason})
        return entry_id

    def approve_takedown(self, takedown_id: str, moderator: str, note: str = "") -> TakedownRecord:
        """Blocklist the takedown's resources and the person's name, and turn the resources off."""
        record = self.takedowns.get(takedown_id)
        with contextlib.ExitStack() as stack:
            files = {}
            for rid in record.resource_ids:
                res = self._resource_file(rid)
                files[rid] = stack.enter_context(self.resource_cache.use(res.storage_key, res.sha256, "file"))
            done = self.takedowns.approve(takedown_id, moderator, files, note)
        for rid in record.resource_ids:
            self.registry.disable(rid, f"takedown {takedown_id}")
        self.safety.refresh_person_names(self.db)
        return done

    # -- views ----------------------------------------------------------------------------------

    def _view(self, job: GenerationJob) -> JobView:
        result = job.result or {}
        base = f"/{API_VERSION}/generations/{job.id}/images"
        progress = job.progress or {}
        return JobView(
            id=job.id, status=job.status.value, user_id=job.user_id, checkpoint=job.checkpoint_id,
            family=job.family, priority=job.priority, seeds=list(job.request.get("seeds", [])),
            quantity=job.quantity, quote=job.quote_total, charged=job.charged,
            progress=ProgressView(**{k: int(progress.get(k, 0)) for k in ("step", "total", "image", "images")}),
            images=[ImageView(url=f"{base}/{i['index']}", **i) for i in result.get("images", [])],
            withheld=[WithheldImageView(**w) for w in result.get("withheld", [])],
            infotext=result.get("infotext"),
            error=ErrorView(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            safety=job.request.get("precheck"),
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        )


# --------------------------------------------------------------------------------------------- helpers


def _record_latencies(family: str, created_at: dt.datetime, result: WorkerResult) -> None:
    """Stage latencies the worker measured, and the job's end-to-end time."""
    timings = result.timings_ms
    for stage, key in (("queue", "queue_ms"), ("diffusion", "generate_ms"), ("scan", "scan_ms")):
        if key in timings:
            metrics.observe("genserve_stage_latency_ms", timings[key], stage=stage, family=family)
    created = created_at if created_at.tzinfo else created_at.replace(tzinfo=dt.timezone.utc)
    elapsed_ms = (dt.datetime.now(dt.timezone.utc) - created).total_seconds() * 1000
    metrics.observe("genserve_request_latency_ms", elapsed_ms, family=family)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _infotext(png: bytes) -> str | None:
    """The A1111 infotext the worker wrote into a PNG."""
    with Image.open(io.BytesIO(png)) as img:
        return img.info.get(PNG_TEXT_KEY)  # read before the pixels: a text chunk ahead of the image data


def _scan_result(scan: Any) -> ScanResult:
    """The worker's scan report as the policy reads it; a scan that did not finish is a failed scan."""
    errors = tuple(scan.errors) or (() if scan.level is not None else ("the image scan did not finish",))
    raw = scan.level
    try:
        level = ScanLevel.X if raw is None else ScanLevel.parse(int(raw) if str(raw).isdigit() else raw)
    except ValueError as exc:
        level, errors = ScanLevel.X, (*errors, str(exc))
    return ScanResult(level=level, minor_signal=bool(scan.minor_signal), scanner_errors=errors)


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


def in_process_service(settings: Settings, *, db: Database | None = None, store: ObjectStore | None = None,
                       scanner: Any | None = None) -> GenerationService:
    """The service with one in-process engine per family of the catalog (no Ray): the same flow
    the Serve application runs, for tests, benchmarks and single-process use."""
    from genserve.worker import WorkerCore

    db = db or Database.from_settings(settings)
    store = store or object_store_from_settings(settings)
    families = load_model_catalog(settings.config_path("models.yaml")).families
    cores = {f: WorkerCore(f, settings, db=db, store=store, scanner=scanner) for f in families}
    return GenerationService(settings, db, store, InProcessWorkers(cores))
