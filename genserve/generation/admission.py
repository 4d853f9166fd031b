"""Admission: everything decided about a request before any buzz is held, as one frozen plan.

    tier limits ─▶ resolve resources ─▶ reserved tokens ─▶ size ─▶ hires ─▶ allowed level
    ─▶ likeness + safety precheck (audited) ─▶ quote            = `AdmissionPlan`

The plan is computed once per request and read by everything after it (the hold, the job row, the
worker request, the runner's timeout, the postcheck), so no later stage recomputes a value the
admission already had. The checks that need no I/O (tier, size, hires, tokens, level) are plain
functions of the request and the configuration.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from genserve.billing.pricing import HiresParams, Pricing, Quote
from genserve.core import metrics
from genserve.core.config import Settings
from genserve.core.errors import Forbidden, InvalidRequest, QueueFull, SafetyBlocked, Unavailable
from genserve.generation.jobs import GenerationJob, JobStore
from genserve.generation.protocol import MAX_HIRES_SIDE, GenerationRequest, Limits
from genserve.generation.worker.errors import ReservedToken
from genserve.generation.worker.wire import HiresSpec, LoraSpec, WorkerRequest
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import FamilyEntry, ModelCatalog
from genserve.resources.models import ResourceKind
from genserve.resources.registry import ResolvedResource, ResolvedResources, ResourceRegistry
from safety.embeddings import uses_reserved_token
from safety.gate import SafetyGate
from safety.hashing import load_tensors
from safety.levels import NsfwLevel
from safety.likeness import Fingerprint, LikenessMatch, fingerprint_lora
from safety.policy import LikenessHit, ResourceFlags
from safety.verdict import Verdict

FINGERPRINT_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Caller:
    """Who a request is for, as the site's back end vouched for it."""

    user_id: str
    tier: str | None = None
    max_nsfw_level: NsfwLevel = NsfwLevel.PG13
    request_id: str | None = None


@dataclass(frozen=True)
class AdmissionPlan:
    """A request as admitted: what it runs, what it may see, what it costs."""

    caller: Caller
    request: GenerationRequest
    resources: ResolvedResources
    size: tuple[int, int]
    hires: HiresSpec | None
    allowed: NsfwLevel
    verdict: Verdict
    quote: Quote
    timeout_s: float

    @property
    def family(self) -> str:
        return self.resources.family

    def worker_request(self, job_id: str, seeds: list[int]) -> WorkerRequest:
        r, res = self.request, self.resources
        return WorkerRequest(
            job_id=job_id, checkpoint_id=res.checkpoint.id, prompt=r.prompt, negative_prompt=r.negative_prompt,
            mature=self.verdict.mature, sampler=r.sampler.value, steps=r.steps, cfg_scale=r.cfg_scale,
            clip_skip=r.clip_skip, width=self.size[0], height=self.size[1], seeds=seeds,
            loras=[LoraSpec(resource_id=x.id, strength=x.strength) for x in res.loras],
            embeddings=[x.id for x in res.embeddings], hires=self.hires,
        )


    def job_row(self, job_id: str, worker_request: WorkerRequest, fingerprint: str, hold_id: str,
                owner: str) -> GenerationJob:
        """The job row of the plan once its buzz is held."""
        request, verdict = self.request, self.verdict
        return GenerationJob(
            id=job_id, user_id=self.caller.user_id, family=self.family, checkpoint_id=self.resources.checkpoint.id,
            priority=request.priority.value, quantity=request.quantity, idempotency_key=request.idempotency_key,
            request_hash=fingerprint, quote={"total": self.quote.total, "per_image": self.quote.per_image},
            quote_total=self.quote.total, hold_id=hold_id, owner=owner,
            request={
                **worker_request.model_dump(mode="json", exclude={"schema_version"}),
                "allowed_nsfw_level": self.allowed.to_wire(), "tier": self.caller.tier,
                "resources": [r.to_dict() for r in self.resources.all],
                "precheck": {"action": verdict.action.value, "rules": verdict.rule_ids, "mature": verdict.mature},
            },
        )


# --------------------------------------------------------------------------------- the pure checks


def check_tier(limits: Limits, caller: Caller, request: GenerationRequest) -> None:
    tier = limits.tier(caller.tier)
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
        raise InvalidRequest(f"over the {caller.tier or limits.default_tier} tier's limits: {sorted(over)}",
                             code="tier_limit_exceeded", details=over)
    if request.priority not in tier.priorities:
        raise Forbidden(f"priority {request.priority.value} is not part of this tier",
                        code="priority_not_allowed", details={"allowed": [p.value for p in tier.priorities]})
    if request.hires and not tier.hires:
        raise Forbidden("hires fix is not part of this tier", code="hires_not_allowed")


def image_size(family: FamilyEntry | None, family_name: str, request: GenerationRequest) -> tuple[int, int]:
    if family is None:
        raise Unavailable(f"no worker serves the {family_name} family", code="family_unavailable")
    size = (request.width, request.height) if request.width else tuple(family.default_size)
    allowed = {tuple(s) for s in family.allowed_sizes} or {tuple(family.default_size)}
    if size not in allowed:
        raise InvalidRequest(f"{size[0]}x{size[1]} is not an allowed {family_name} size", code="size_not_allowed",
                             details={"allowed": sorted([list(s) for s in allowed])})
    return size  # type: ignore[return-value]


def hires_spec(request: GenerationRequest, size: tuple[int, int]) -> HiresSpec | None:
    if request.hires is None:
        return None
    target = [round(side * request.hires.scale / 8) * 8 for side in size]
    if max(target) > MAX_HIRES_SIDE:
        raise InvalidRequest(f"hires fix would make {target[0]}x{target[1]}; the longest side is {MAX_HIRES_SIDE}",
                             code="hires_too_large")
    h = request.hires
    return HiresSpec(scale=h.scale, denoise=h.denoise, steps=h.steps, upscaler=h.upscaler)


def check_tokens(family: FamilyEntry | None, resources: ResolvedResources) -> None:
    """A user embedding may not use (or contain) a safety embedding's token: it could stand in for it."""
    reserved = [e.token for e in family.safety_embeddings.values()] if family else []
    for res in resources.embeddings:
        if uses_reserved_token(res.token or "", reserved):
            raise ReservedToken(f"embedding {res.id} uses a reserved safety token", details={"id": res.id})


# --------------------------------------------------------------------------------- the admission


class Admission:
    """Turns a request into an `AdmissionPlan` or a refusal; writes nothing but the precheck's audit row."""

    def __init__(self, settings: Settings, *, registry: ResourceRegistry, catalog: ModelCatalog, pricing: Pricing,
                 safety: SafetyGate, resource_cache: ResourceCache, limits: Limits):
        self.config = settings.generation
        self.registry = registry
        self.catalog = catalog
        self.pricing = pricing
        self.safety = safety
        self.resource_cache = resource_cache
        self.limits = limits
        self._fingerprints: OrderedDict[str, Fingerprint] = OrderedDict()

    def check_queue(self, jobs: JobStore, caller: Caller, request: GenerationRequest) -> int:
        """Refuse (429) past the user's queue limit or the service's capacity; returns the active jobs."""
        user_active, active = jobs.active_counts(caller.user_id)
        self.check_counts(caller, request, user_active, active)
        return active

    def check_counts(self, caller: Caller, request: GenerationRequest, user_active: int, active: int) -> None:
        """Refuse (429) when `user_active` / `active` jobs leave no room for this request. `JobStore.create`
        calls it again inside the insert's transaction, under the admission lock, so a burst of
        concurrent submits never gets past the limits (the earlier call only refuses before a hold)."""
        tier = self.limits.tier(caller.tier)
        if user_active >= tier.queue:
            raise QueueFull(f"{tier.queue} generations are already queued or running for this user",
                            code="queue_limit", retry_after_s=self.limits.retry_after_s, details={"limit": tier.queue})
        if not self.limits.admits(request.priority, active):
            raise QueueFull("the service is at capacity; try again shortly", code="queue_full",
                            retry_after_s=self.limits.retry_after_s)

    def plan(self, caller: Caller, request: GenerationRequest) -> AdmissionPlan:
        check_tier(self.limits, caller, request)
        resources = self.registry.resolve(request.checkpoint, request.resources, caller.user_id)
        family = self.catalog.families.get(resources.family)
        check_tokens(family, resources)
        size = image_size(family, resources.family, request)
        hires = hires_spec(request, size)
        allowed = NsfwLevel.lowest(caller.max_nsfw_level, request.nsfw_level)
        with metrics.stage_timer("audit", resources.family):
            verdict = self._precheck(caller, request, resources, allowed)
        quote = self.pricing.quote_generation(
            resources.family, size[0], size[1], request.steps, request.quantity,
            extra_resources=len(resources.extras),
            hires=HiresParams.upscaled(size[0], size[1], hires.scale, hires.steps or request.steps) if hires else None,
        )
        timeout_s = self.config.job_timeout_s + self.config.timeout_per_resource_s * len(resources.extras)
        return AdmissionPlan(caller, request, resources, size, hires, allowed, verdict, quote, timeout_s)

    def _precheck(self, caller: Caller, request: GenerationRequest, resources: ResolvedResources,
                  allowed: NsfwLevel) -> Verdict:
        hits = self._likeness(resources)
        verdict = self.safety.precheck_request(
            request.prompt, request.negative_prompt,
            resources=[ResourceFlags(r.id, r.minor, r.poi, r.sfw_only) for r in resources.all],
            likeness_hits=[LikenessHit(r.id, f"likeness.{hit.method}", f"matches a blocklisted likeness of {hit.person}")
                           for r, hit in hits],
            allowed_level=allowed, subject=[r.sha256 for r in resources.all], request_id=caller.request_id,
            user_id=caller.user_id, details={"resources": [r.id for r in resources.all],
                                             "likeness": [{"resource": r.id, **h.to_dict()} for r, h in hits]},
        )
        if verdict.blocked:
            for rule in verdict.rule_ids:
                metrics.inc("genserve_prompts_blocked_total", rule=rule)
            raise SafetyBlocked("the request was refused by the safety policy",
                                details={"rules": verdict.rule_ids, "reasons": [r.to_dict() for r in verdict.reasons]})
        return verdict

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
            while len(self._fingerprints) > FINGERPRINT_CACHE_ENTRIES:
                self._fingerprints.popitem(last=False)
        self._fingerprints.move_to_end(res.sha256)
        return fp
