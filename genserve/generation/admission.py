"""Admission: everything decided about a request before any buzz is held, as one frozen plan.

    tier limits ─▶ resolve resources (and the VAE) ─▶ reserved tokens ─▶ size ─▶ hires ─▶ allowed level
    ─▶ likeness + safety precheck (audited) ─▶ input images: decoded, scanned, judged (audited)
    ─▶ quote                                                      = `AdmissionPlan`

The plan is computed once per request and read by everything after it (the hold, the job row, the
worker request, the runner's timeout, the postcheck), so no later stage recomputes a value the
admission already had. The checks that need no I/O (tier, size, hires, tokens, level) are plain
functions of the request and the configuration.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from genserve.billing.economy import price_generation
from genserve.billing.pricing import HiresParams, Pricing, Quote
from genserve.core import metrics
from genserve.core.config import Settings
from genserve.core.errors import (
    Forbidden,
    InvalidRequest,
    QueueFull,
    SafetyBlocked,
    Unavailable,
)
from genserve.economy.store import Economy
from genserve.engine.prompt_syntax import extract_extra_networks, plain_text
from genserve.generation.inputs import InputImages
from genserve.generation.jobs import GenerationJob, JobStore
from genserve.generation.protocol import MAX_HIRES_SIDE, GenerationRequest, Limits
from genserve.generation.worker.wire import (
    FaceFixSpec,
    HiresSpec,
    InitSpec,
    LoraSpec,
    WorkerRequest,
    denoise_steps,
)
from genserve.generation.workflows import (
    PlanInputs,
    check_workflow,
    decode_inputs,
    face_fix_params,
    judge_inputs,
)
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import FamilyEntry, ModelCatalog
from genserve.resources.models import ResourceKind
from genserve.resources.registry import (
    ReservedToken,
    ResolvedResource,
    ResolvedResources,
    ResourceNotFound,
    ResourceRegistry,
)
from genserve.resources.vae import resolve_vae
from safety.embeddings import uses_reserved_token
from safety.gate import SafetyGate
from safety.levels import NsfwLevel
from safety.likeness import LikenessMatch, RequestCheck, RequestFile
from safety.policy import LikenessHit, ResourceFlags
from safety.verdict import Action, Verdict


@dataclass(frozen=True)
class ResourceUse:
    """One resource a request uses: listed in `resources` or named by a `<lora:...>` tag."""

    id: str
    strength: float = 1.0


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
    inputs: PlanInputs | None = None

    @property
    def family(self) -> str:
        return self.resources.family

    @property
    def protect_minors(self) -> bool:
        """Whether the worker adds the minor-protection embedding: whenever a delivered image could be
        above PG13 (a mature prompt in any language, or a level that allows R or X), not only when the
        prompt says so."""
        return self.verdict.mature or self.allowed.mature

    def init_spec(self, image_key: str, mask_key: str | None = None) -> InitSpec | None:
        """The worker's input spec once the inputs are stored under `image_key` (and `mask_key`)."""
        if self.inputs is None:
            return None
        r, mask = self.request, self.inputs.mask
        return InitSpec(workflow=r.workflow, image_key=image_key, image_sha256=self.inputs.image.sha256,
                        mask_key=mask_key, mask_sha256=mask.sha256 if mask else None, denoise=r.denoise,
                        resize_mode=r.resize_mode, mask_blur=r.mask_blur, only_masked=r.inpaint_only_masked,
                        padding=r.inpaint_padding)

    def worker_request(self, job_id: str, seeds: list[int], init: InitSpec | None = None) -> WorkerRequest:
        r, res = self.request, self.resources
        return WorkerRequest(
            job_id=job_id, checkpoint_id=res.checkpoint.id, prompt=r.prompt, negative_prompt=r.negative_prompt,
            mature=self.protect_minors, sampler=r.sampler.value, steps=r.steps, cfg_scale=r.cfg_scale,
            clip_skip=r.clip_skip, width=self.size[0], height=self.size[1], seeds=seeds,
            loras=[LoraSpec(resource_id=x.id, strength=x.strength) for x in res.loras],
            embeddings=[x.id for x in res.embeddings], hires=self.hires, output_format=r.output_format,
            quality=r.quality, priority=r.priority.value, vae=res.vae.id if res.vae else None, init=init,
            face_fix=FaceFixSpec(**r.face_fix.model_dump()) if r.face_fix else None,
        )


    def job_row(self, job_id: str, worker_request: WorkerRequest, fingerprint: str, hold_id: str,
                owner: str) -> GenerationJob:
        """The job row of the plan once its buzz is held."""
        request, verdict = self.request, self.verdict
        return GenerationJob(
            id=job_id, user_id=self.caller.user_id, family=self.family, checkpoint_id=self.resources.checkpoint.id,
            priority=request.priority.value, quantity=request.quantity, idempotency_key=request.idempotency_key,
            request_hash=fingerprint, quote=self.quote.to_dict(),
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


def hires_spec(request: GenerationRequest, size: tuple[int, int], max_pixels: int) -> HiresSpec | None:
    """The worker's hires spec, refused here when the worker would refuse it (its `max_pixels`, the same
    target-size rule): a quoted and held job never fails at the worker for its size."""
    if size[0] * size[1] > max_pixels:
        raise InvalidRequest(f"{size[0]}x{size[1]} is over the worker's {max_pixels} pixels", code="size_too_large",
                             details={"max_pixels": max_pixels})
    if request.hires is None:
        return None
    h = request.hires
    spec = HiresSpec(scale=h.scale, denoise=h.denoise, steps=h.steps, upscaler=h.upscaler)
    target = spec.target_size(*size)
    if max(target) > MAX_HIRES_SIDE or target[0] * target[1] > max_pixels:
        raise InvalidRequest(f"hires fix would make {target[0]}x{target[1]}; the limit is {max_pixels} pixels "
                             f"and {MAX_HIRES_SIDE} a side", code="hires_too_large",
                             details={"target": list(target), "max_pixels": max_pixels, "max_side": MAX_HIRES_SIDE})
    return spec


def draft_request(family: FamilyEntry | None, family_name: str,
                  request: GenerationRequest) -> tuple[GenerationRequest, str]:
    """The request as draft mode runs it (the family's steps, CFG and sampler), and its LoRA's id."""
    draft = family.draft if family is not None else None
    if draft is None:
        raise InvalidRequest(f"no draft mode for the {family_name} family", code="draft_unavailable")
    effective = request.model_copy(update={"steps": draft.steps, "cfg_scale": draft.cfg_scale,
                                           "sampler": type(request.sampler)(draft.sampler)})
    return effective, draft.lora


def check_tokens(family: FamilyEntry | None, resources: ResolvedResources) -> None:
    """A user embedding may not use (or contain) a safety embedding's token: it could stand in for it."""
    reserved = [e.token for e in family.safety_embeddings.values()] if family else []
    for res in resources.embeddings:
        if uses_reserved_token(res.token or "", reserved):
            raise ReservedToken(f"embedding {res.id} uses a reserved safety token", details={"id": res.id})


def audit_text(prompt: str) -> str:
    """What the prompt audit reads: the prompt as written and, when it uses A1111 syntax, its words
    without it on a line of their own (weights, BREAK, escapes and editing could otherwise split or hide
    a term: "(lo)li", "lo\\li", "[lo:li:0]")."""
    plain = plain_text(prompt)
    return prompt if plain == prompt else f"{prompt}\n{plain}"


# --------------------------------------------------------------------------------- the admission


class Admission:
    """Turns a request into an `AdmissionPlan` or a refusal; writes nothing but the precheck's audit row."""

    def __init__(self, settings: Settings, *, registry: ResourceRegistry, catalog: ModelCatalog, pricing: Pricing,
                 safety: SafetyGate, resource_cache: ResourceCache, limits: Limits, economy: Economy | None = None,
                 inputs: InputImages | None = None):
        self.config = settings.generation
        self.max_pixels = settings.worker.max_pixels  # what the workers refuse above
        self.economy_config = settings.billing.economy
        self.economy = economy
        self.registry = registry
        self.catalog = catalog
        self.pricing = pricing
        self.safety = safety
        self.resource_cache = resource_cache
        self.limits = limits
        self.likeness = RequestCheck(safety.blocklist)
        self.inputs = inputs

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

    def resource_uses(self, caller: Caller, request: GenerationRequest) -> list[ResourceUse]:
        """The listed resources, then the LoRAs the prompt's `<lora:name:w>` tags name (by resource id, else
        by a LoRA's unique name), each checked like a listed one from here on (registry, likeness, worker)."""
        uses = [ResourceUse(r.id, r.strength) for r in request.resources]
        listed = {u.id for u in uses}
        tags = [*extract_extra_networks(request.prompt).loras, *extract_extra_networks(request.negative_prompt).loras]
        for tag in tags:
            if tag.split:
                raise InvalidRequest(f"{tag.text}: separate text-encoder and UNet strengths are not supported",
                                     code="lora_tag_split_strength", details={"tag": tag.text})
            rid = self._lora_id(tag.name, caller.user_id)
            if rid in listed:
                raise InvalidRequest(f"{tag.text}: LoRA {rid} is already listed", code="lora_listed_twice",
                                     details={"tag": tag.text, "id": rid})
            listed.add(rid)
            uses.append(ResourceUse(rid, tag.strength))
        tier = self.limits.tier(caller.tier)
        if len(uses) > tier.resources:
            raise InvalidRequest(f"over the {caller.tier or self.limits.default_tier} tier's limits: ['resources']",
                                 code="tier_limit_exceeded",
                                 details={"resources": {"requested": len(uses), "max": tier.resources}})
        return uses

    def _by_name(self, name: str, kind: ResourceKind, user_id: str) -> list[str]:
        return [r.id for r in self.registry.list(kind=kind)
                if r.name == name and (r.owner_user_id is None or r.owner_user_id == user_id)]

    def _checkpoint_id(self, ref: str, user_id: str) -> str:
        """A checkpoint by id, else by its unique name (what an infotext's `Model:` names)."""
        try:
            return self.registry.get(ref).id
        except ResourceNotFound:
            found = self._by_name(ref, ResourceKind.checkpoint, user_id)
            return found[0] if len(found) == 1 else ref  # otherwise resolve() reports it as it always has

    def _lora_id(self, name: str, user_id: str) -> str:
        try:
            return self.registry.get(name).id
        except ResourceNotFound:
            pass
        found = self._by_name(name, ResourceKind.lora, user_id)
        if len(found) != 1:
            raise InvalidRequest(f"<lora:{name}> names no{' single' if found else ''} known LoRA",
                                 code="lora_tag_unknown" if not found else "lora_tag_ambiguous",
                                 details={"name": name, **({"ids": found} if found else {})})
        return found[0]

    def plan(self, caller: Caller, request: GenerationRequest) -> AdmissionPlan:
        check_tier(self.limits, caller, request)
        check_workflow(request)
        checkpoint = self._checkpoint_id(request.checkpoint, caller.user_id)
        if checkpoint != request.checkpoint:
            request = request.model_copy(update={"checkpoint": checkpoint})
        uses = self.resource_uses(caller, request)
        resources = self.registry.resolve(request.checkpoint, uses, caller.user_id)
        if request.vae is not None:  # refused here (unknown, not a VAE, other family) before anything is held
            resources = dataclasses.replace(
                resources, vae=resolve_vae(self.registry, request.vae, resources.family, caller.user_id))
        # early access is refused here, before any buzz is held; the owners' fees come with it
        terms = self.economy.admit([r.id for r in resources.all], caller.user_id) if self.economy else []
        family = self.catalog.families.get(resources.family)
        free_extras = 0
        if request.draft:
            request, draft_lora = draft_request(family, resources.family, request)
            if draft_lora not in {u.id for u in uses}:
                uses.append(ResourceUse(draft_lora, 1.0))
                free_extras = 1  # the draft LoRA is part of the mode, not a resource the user added
            resources = dataclasses.replace(self.registry.resolve(request.checkpoint, uses, caller.user_id),
                                            vae=resources.vae)
        check_tokens(family, resources)
        size = image_size(family, resources.family, request)
        hires = hires_spec(request, size, self.max_pixels)
        allowed = NsfwLevel.lowest(caller.max_nsfw_level, request.nsfw_level)
        inputs = decode_inputs(self.inputs, caller.user_id, request, self.max_pixels)
        with metrics.stage_timer("audit", resources.family):
            verdict = self._precheck(caller, request, resources, allowed)
            if inputs is not None:
                # the input's face / minor findings ride on the verdict to the output postcheck
                verdict = judge_inputs(self.safety, caller.user_id, caller.request_id, request, inputs, verdict,
                                       allowed, size)
        steps = request.steps if inputs is None else denoise_steps(request.steps, request.denoise)
        quote = self.pricing.quote_generation(
            resources.family, size[0], size[1], steps, request.quantity, workflow=request.workflow,
            face_fix=face_fix_params(request, size),
            extra_resources=len(resources.extras) - free_extras,
            hires=HiresParams.upscaled(size[0], size[1], hires.scale, hires.steps or request.steps) if hires else None,
            output_format=request.output_format,
        )
        quote = price_generation(quote, payer=caller.user_id, terms=terms, config=self.economy_config,
                                 creator_tip_pct=request.creator_tip_pct, platform_tip_pct=request.platform_tip_pct,
                                 priority=request.priority.value)
        fetched = len(resources.extras) + (resources.vae is not None)  # files the worker may have to fetch
        timeout_s = self.config.job_timeout_s + self.config.timeout_per_resource_s * fetched
        return AdmissionPlan(caller, request, resources, size, hires, allowed, verdict, quote, timeout_s, inputs)

    def _precheck(self, caller: Caller, request: GenerationRequest, resources: ResolvedResources,
                  allowed: NsfwLevel) -> Verdict:
        hits = self._likeness(resources)
        face_prompt = request.face_fix.prompt if request.face_fix else ""
        verdict = self.safety.precheck_request(
            audit_text(f"{request.prompt}\n{face_prompt}" if face_prompt else request.prompt),
            audit_text(request.negative_prompt),
            resources=[ResourceFlags(r.id, r.minor, r.poi, r.sfw_only) for r in resources.all],
            likeness_hits=[LikenessHit(r.id, f"likeness.{hit.method}", f"matches a blocklisted likeness of {hit.person}")
                           for r, hit in hits],
            allowed_level=allowed, subject=[r.sha256 for r in resources.all], request_id=caller.request_id,
            user_id=caller.user_id, details={"resources": [r.id for r in resources.all],
                                             "likeness": [{"resource": r.id, **h.to_dict()} for r, h in hits]},
        )
        if verdict.action is not Action.allow:
            for rule in verdict.rule_ids:
                metrics.inc("genserve_prompts_blocked_total", rule=rule)
            details = {"rules": verdict.rule_ids, "reasons": [r.to_dict() for r in verdict.reasons]}
            if verdict.blocked:
                raise SafetyBlocked("the request was refused by the safety policy", details=details)
            # a review verdict is enforced: refused before anything is charged, its audit row is the
            # moderators' queue (README, Safety)
            raise SafetyBlocked("the request needs a moderator's review and was not run", code="safety_review",
                                details=details)
        return verdict

    def _likeness(self, resources: ResolvedResources) -> list[tuple[ResolvedResource, LikenessMatch]]:
        """The request's resources against the likeness blocklist, as the worker will load them: every
        file's hashes (the checkpoint's too), every LoRA's weights alone, and the combined update
        Σ strengthᵢ·ΔWᵢ of all its LoRAs (a blocked LoRA split across files is caught as a pair). A file
        that cannot be read fails closed."""
        hits = []
        for res in resources.all:
            if res.kind is not ResourceKind.lora:
                hit = self.safety.blocklist.check_hashes(res.sha256, res.tensor_sha256)
                if hit is not None:
                    hits.append((res, hit))
        loras = list(resources.loras)
        match = self.likeness.check([RequestFile(
            r.sha256, functools.partial(self.resource_cache.use, r.storage_key, r.sha256, "file"), r.family,
            r.strength) for r in loras])
        if match is not None:
            hits += [(loras[i], match) for i in (match.parts or range(len(loras)))]
        return hits
