"""The safety policy the service calls: one check before generation, one per generated image.

`precheck` (before any charge): prompt audit + resource flags + likeness blocklist hits.
- a blocklisted resource blocks; a `poi` (real person) resource with a mature prompt blocks;
- a `minor` resource sets the minor signal (so a mature prompt blocks) and, like `sfw_only`, caps
  the level the request may see at PG13.

`postcheck` (per image): the scan's level against the request's allowed level (after the caps).
`ImageDecision.action` says what happens to the image:
- `allow`: delivered;
- `block`: withheld (above the allowed level, scan failed, or the request was refused);
- `review`: withheld AND queued for a moderator, with a severity: an image above PG with any minor
  signal (prompt, resource flag, scanner, the input image's scan), an image above PG13 edited from an
  input that showed a face, or a mature image from a real-person resource.

Both checks fail closed: any exception becomes a refusal (`precheck_failed` / `postcheck_failed`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safety.image_scan import ScanResult
from safety.input_policy import TAG_INPUT_FACE, TAG_INPUT_MINOR
from safety.levels import NsfwLevel
from safety.prompt_audit import PromptAuditor
from safety.verdict import Action, Reason, Verdict

log = logging.getLogger(__name__)

# The most a request may see when a resource is flagged minor or sfw_only.
RESTRICTED_RESOURCE_LEVEL = NsfwLevel.PG13

TAG_MINOR_RESOURCE = "resource:minor"
TAG_SFW_ONLY_RESOURCE = "resource:sfw_only"
TAG_POI_RESOURCE = "resource:poi"


@dataclass(frozen=True)
class ResourceFlags:
    """Moderation flags of one resource (checkpoint, LoRA, embedding) used by a request."""

    id: str
    minor: bool = False
    poi: bool = False
    sfw_only: bool = False


@dataclass(frozen=True)
class LikenessHit:
    """A resource the likeness blocklist refused (from `LikenessMatch`: its rule id and who/why)."""

    resource_id: str
    rule_id: str
    detail: str = ""


class Severity(str, enum.Enum):
    none = "none"
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


@dataclass(frozen=True)
class ImageDecision:
    deliver: bool
    level: NsfwLevel
    action: Action
    reasons: tuple[Reason, ...] = ()
    severity: Severity = Severity.none

    @property
    def rule_ids(self) -> list[str]:
        return [r.rule_id for r in self.reasons]

    def to_dict(self) -> dict:
        return {"deliver": self.deliver, "level": self.level.name, "action": self.action.value,
                "rules": self.rule_ids, "reasons": [r.to_dict() for r in self.reasons],
                "severity": self.severity.value}


def effective_level(precheck: Verdict, allowed_level: NsfwLevel | str) -> NsfwLevel:
    """The highest level a request may see once its resources' flags are applied."""
    level = NsfwLevel.parse(allowed_level)
    if {TAG_MINOR_RESOURCE, TAG_SFW_ONLY_RESOURCE} & precheck.tags:
        level = min(level, RESTRICTED_RESOURCE_LEVEL)
    return level


class SafetyPolicy:
    def __init__(self, auditor: PromptAuditor):
        self.auditor = auditor

    @classmethod
    def from_dir(cls, rules_dir: Path, extra_person_names: Sequence[str] = ()) -> SafetyPolicy:
        return cls(PromptAuditor.from_dir(rules_dir, extra_person_names))

    def with_person_names(self, names: Sequence[str]) -> SafetyPolicy:
        """The same policy, its prompt audit also knowing `names` (from takedowns)."""
        return SafetyPolicy(self.auditor.with_person_names(names))

    # -- before generation -----------------------------------------------------------------------

    def precheck(
        self,
        prompt: str,
        negative: str,
        resources: Sequence[ResourceFlags],
        likeness_hits: Sequence[LikenessHit],
        allowed_level: NsfwLevel | str,
    ) -> Verdict:
        try:
            return self._precheck(prompt, negative, resources, likeness_hits, NsfwLevel.parse(allowed_level))
        except Exception as exc:  # noqa: BLE001 - fail closed
            log.exception("safety precheck failed")
            return Verdict(Action.block, (Reason("precheck_failed", f"{type(exc).__name__}: {exc}"),))

    def _precheck(self, prompt: str, negative: str, resources: Sequence[ResourceFlags],
                  likeness_hits: Sequence[LikenessHit], allowed_level: NsfwLevel) -> Verdict:
        audit = self.auditor.audit(prompt, negative)
        reasons: list[Reason] = []
        tags: set[str] = set()
        action = Action.allow
        for hit in likeness_hits:
            action = Action.block
            reasons.append(Reason(hit.rule_id, hit.detail or "resource is on the likeness blocklist",
                                  "resources", matched=hit.resource_id))
        minor_resources = [r.id for r in resources if r.minor]
        if minor_resources:
            tags.add(TAG_MINOR_RESOURCE)
            reasons.append(Reason("resource.minor", "resource depicts minors; mature content is not allowed",
                                  "resources", matched=",".join(minor_resources)))
            if audit.mature:
                action = Action.block
                reasons.append(Reason("minor_resource_with_mature", "mature prompt with a minor resource",
                                      "resources", matched=",".join(minor_resources)))
        if any(r.sfw_only for r in resources):
            tags.add(TAG_SFW_ONLY_RESOURCE)
        poi_resources = [r.id for r in resources if r.poi]
        if poi_resources:
            tags.add(TAG_POI_RESOURCE)
            if audit.mature:
                action = Action.block
                reasons.append(Reason("poi_resource_with_mature", "mature prompt with a real-person resource",
                                      "resources", matched=",".join(poi_resources)))
        if {TAG_MINOR_RESOURCE, TAG_SFW_ONLY_RESOURCE} & tags and allowed_level > RESTRICTED_RESOURCE_LEVEL:
            tags.add(f"level_capped:{RESTRICTED_RESOURCE_LEVEL.name}")
        own = Verdict(action, tuple(reasons), minor_signal=bool(minor_resources), tags=frozenset(tags))
        return Verdict.combine([audit, own])

    # -- per image -------------------------------------------------------------------------------

    def postcheck(self, scan: ScanResult, precheck: Verdict, allowed_level: NsfwLevel | str) -> ImageDecision:
        try:
            return self._postcheck(scan, precheck, allowed_level)
        except Exception as exc:  # noqa: BLE001 - fail closed
            log.exception("safety postcheck failed")
            level = getattr(scan, "level", NsfwLevel.X)
            return ImageDecision(False, level if isinstance(level, NsfwLevel) else NsfwLevel.X, Action.block,
                                 (Reason("postcheck_failed", f"{type(exc).__name__}: {exc}"),), Severity.low)

    def _postcheck(self, scan: ScanResult, precheck: Verdict, allowed_level: NsfwLevel | str) -> ImageDecision:
        level = NsfwLevel.parse(scan.level)
        if precheck.blocked:
            return ImageDecision(False, level, Action.block, (Reason("precheck_blocked", "the request was refused"),))
        if scan.scanner_errors:
            return ImageDecision(False, level, Action.block,
                                 tuple(Reason("scan_failed", err, "image") for err in scan.scanner_errors), Severity.low)
        limit = effective_level(precheck, allowed_level)
        from_resource = TAG_MINOR_RESOURCE in precheck.tags
        from_prompt = precheck.minor_signal and ("minor" in precheck.tags or not from_resource)
        minor_sources = [name for name, on in (("prompt", from_prompt), ("resource", from_resource),
                                               ("scanner", scan.minor_signal),
                                               ("input", TAG_INPUT_MINOR in precheck.tags)) if on]
        if level > NsfwLevel.PG and minor_sources:
            # any exposure the scanner reports, not only mature levels: PG13 with a minor signal is withheld too
            rule = "mature_image_with_minor_signal" if level.mature else "exposure_with_minor_signal"
            severity = {NsfwLevel.X: Severity.critical, NsfwLevel.R: Severity.high}.get(level, Severity.medium)
            reasons = tuple(Reason(rule, f"{level.name} image with a minor signal from {src}", "image", matched=src)
                            for src in minor_sources)
            return ImageDecision(False, level, Action.review, reasons, severity)
        if level > NsfwLevel.PG13 and TAG_INPUT_FACE in precheck.tags:
            # an edit of an input that showed a face: whether or not the output's detector still finds the
            # face (turned, small, half repainted), exposure above PG13 from it is the nudify pattern
            return ImageDecision(False, level, Action.review,
                                 (Reason("edited_face_with_exposure",
                                         f"{level.name} image edited from an input showing a face", "image"),),
                                 Severity.high)
        if level.mature and TAG_POI_RESOURCE in precheck.tags:
            return ImageDecision(False, level, Action.review,
                                 (Reason("mature_image_with_poi_resource", f"{level.name} image from a real-person resource", "image"),),
                                 Severity.high)
        if level > limit:
            return ImageDecision(False, level, Action.block,
                                 (Reason("nsfw_level_exceeded", f"image is {level.name}; the request allows up to {limit.name}", "image"),),
                                 Severity.none)
        return ImageDecision(True, level, Action.allow)
