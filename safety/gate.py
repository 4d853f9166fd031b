"""The one builder of the safety components, and the two checks every caller runs through it.

Every caller (the generation ingress, the worker, the training service and its job process, the
command line) builds its safety from the `safety:` settings section with `SafetyGate.build`, so
every one of them reads the same rule files: the prompt rules, the likeness thresholds and the
image-scan configuration. The checks write their own audit rows, so no caller can run a check
and forget to record it:

- `precheck_request`: prompt audit + resource flags + likeness hits -> `Verdict` (audited);
- `judge_image`: one image's scan against the request's verdict and level -> `ImageDecision` (audited);
- `check_input_image`: an img2img/inpaint input's scan against the request -> `InputDecision` (audited).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from safety.audit_log import AuditLog
from safety.config import SafetyConfig
from safety.embeddings import SafetyEmbeddings
from safety.image_hash import ImageHashBlocklist
from safety.image_scan import FACE_SCORE_FLOOR, ImageScanner, ScanResult
from safety.input_policy import InputDecision, judge_input
from safety.input_scan import scan_views
from safety.levels import NsfwLevel
from safety.likeness import LikenessBlocklist, LikenessConfig
from safety.policy import ImageDecision, LikenessHit, ResourceFlags, SafetyPolicy
from safety.prompt_audit import PromptAuditor
from safety.store import person_names
from safety.verdict import Action, Reason, Verdict

SessionFactory = Callable[[], Session]
log = logging.getLogger(__name__)


@dataclass
class SafetyGate:
    """Prompt audit, policy, likeness blocklist and audit log, built from one configuration."""

    config: SafetyConfig
    rules_dir: Path
    session_factory: SessionFactory
    auditor: PromptAuditor
    blocklist: LikenessBlocklist
    audit: AuditLog
    image_hashes: ImageHashBlocklist = field(init=False)
    policy: SafetyPolicy = field(init=False)
    # the scanner inputs are judged with, built on first use (the ingress holds no other); settable (tests)
    input_scanner: ImageScanner | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policy = SafetyPolicy(self.auditor)
        self.image_hashes = ImageHashBlocklist(self.session_factory, self.config.image_hash_max_distance)

    @classmethod
    def build(cls, config: SafetyConfig, config_dir: Path, session_factory: SessionFactory) -> SafetyGate:
        """The gate of `config` (its files under `config_dir / config.rules_dir`); a missing or
        invalid rule file raises here, at start, never later."""
        rules_dir = Path(config_dir) / config.rules_dir
        audit = AuditLog(session_factory)
        likeness = LikenessConfig.load(rules_dir / config.likeness_file)
        return cls(config, rules_dir, session_factory, cls._auditor(rules_dir, session_factory),
                   LikenessBlocklist(session_factory, likeness, audit_log=audit), audit)

    @staticmethod
    def _auditor(rules_dir: Path, session_factory: SessionFactory) -> PromptAuditor:
        with session_factory() as s:
            names = person_names(s)
        return PromptAuditor.from_dir(rules_dir, extra_person_names=names)

    # -- the components other parts build from the same files ------------------------------------

    @property
    def likeness_config(self) -> LikenessConfig:
        return self.blocklist.config

    def image_scanner(self, *, threads: int = 0) -> ImageScanner:
        return ImageScanner.from_config(self.rules_dir / self.config.image_scan_file, threads=threads)

    @staticmethod
    def embeddings(family: str, config: Mapping[str, Mapping[str, Any]], models_dir: Path) -> SafetyEmbeddings:
        return SafetyEmbeddings.from_config(family, config, models_dir)

    # -- rule updates without a restart ------------------------------------------------------------

    def refresh_person_names(self) -> None:
        """Names added by approved takedowns reach the prompt audit without a restart."""
        with self.session_factory() as s:
            names = person_names(s)
        with self._lock:
            known = set(self.auditor.extra_person_names)
            if set(names) != known:
                self.auditor = self.auditor.with_person_names([n for n in names if n not in known])
                self.policy = SafetyPolicy(self.auditor)

    def reload_rules(self) -> None:
        """Re-read the prompt rule files. The new auditor is built completely before it replaces the
        old one, so a bad file leaves the running rules in force (and raises RulesInvalid)."""
        auditor = self._auditor(self.rules_dir, self.session_factory)
        with self._lock:
            self.auditor, self.policy = auditor, SafetyPolicy(auditor)

    # -- the checks ----------------------------------------------------------------------------------

    def precheck_request(self, prompt: str, negative: str, *, resources: Sequence[ResourceFlags] = (),
                         likeness_hits: Sequence[LikenessHit] = (), allowed_level: NsfwLevel = NsfwLevel.PG13,
                         kind: str = "precheck", subject: str | Iterable[str] | None = None,
                         user_id: str | None = None, request_id: str | None = None, job_id: str | None = None,
                         details: dict | None = None) -> Verdict:
        """The verdict on a request before anything is charged; its audit row is written here."""
        verdict = self.policy.precheck(prompt, negative, resources=resources, likeness_hits=likeness_hits,
                                       allowed_level=allowed_level)
        self.audit.append_verdict(verdict, kind=kind, subject=subject, request_id=request_id, user_id=user_id,
                                  job_id=job_id, details=details)
        return verdict

    def judge_image(self, scan: ScanResult, precheck: Verdict, allowed_level: NsfwLevel, *,
                    withheld_because: str | None = None, kind: str = "postcheck", subject: str | None = None,
                    user_id: str | None = None, request_id: str | None = None, job_id: str | None = None,
                    details: dict | None = None) -> ImageJudgement:
        """What happens to one image; its audit row is written here. `withheld_because` (the image is
        missing, its face fix failed, or its scan did not finish) withholds an image the policy would let
        through."""
        decision = self.policy.postcheck(scan, precheck, allowed_level)
        deliver = decision.deliver and withheld_because is None
        if withheld_because in ("image_missing", "face_fix_failed"):  # nothing the policy could judge
            reasons = [withheld_because]
        else:
            reasons = decision.rule_ids or ([] if deliver else [withheld_because or "scan_failed"])
        # review = withheld and queued for a moderator; an undeliverable image the policy let through is a block
        action = "allow" if deliver else ("block" if decision.deliver else decision.action.value)
        self.audit.append(kind, action, rules=reasons, subject=subject, job_id=job_id, user_id=user_id,
                          request_id=request_id,
                          details={**(details or {}), "level": decision.level.to_wire(),
                                   "allowed": NsfwLevel.parse(allowed_level).to_wire(),
                                   "severity": decision.severity.value, "scan_errors": list(scan.scanner_errors)})
        return ImageJudgement(deliver, decision.level, tuple(reasons), decision)


    def check_input_image(self, image: Any, *, workflow: str, prompt_verdict: Verdict, allowed_level: NsfwLevel,
                          field_name: str = "init_image", subject: str | None = None, user_id: str | None = None,
                          request_id: str | None = None, face_min_score: float | None = None,
                          regions: Sequence[tuple[int, int, int, int]] = ()) -> InputDecision:
        """Scan an input image, compare its perceptual hash with the known-abusive ones, and judge it before
        anything is charged; its audit row is written here. A scanner or a hash lookup that errors fails
        closed (`input.scan_failed`). Faces count from the scan config's `face_min_score`, or from
        `face_min_score` where that is lower (a face fix asked to detect from a lower confidence). The
        image is scanned whole, in each of `regions` (the boxes the engine will work on at full scale),
        in tiles when large, and turned when no face is upright (`safety.input_scan`)."""
        struck = self._struck_out(user_id)
        if struck is not None:
            self.audit.append_verdict(struck.verdict, kind="input_image", subject=subject, request_id=request_id,
                                      user_id=user_id, details={"field": field_name, "workflow": workflow})
            return struck
        hash_match, hash_error = None, None
        try:
            hash_match = self.image_hashes.match(image)
        except Exception as exc:  # noqa: BLE001 - fail closed
            hash_error = f"image hash lookup: {type(exc).__name__}: {exc}"
        try:
            with self._lock:
                if self.input_scanner is None:
                    self.input_scanner = self.image_scanner(threads=1)
                scanner = self.input_scanner
            scan = scan_views(scanner, image, regions)
        except Exception as exc:  # noqa: BLE001 - fail closed
            scanner, scan = None, ScanResult(NsfwLevel.X, scanner_errors=(f"{type(exc).__name__}: {exc}",))
        floor = min(getattr(scanner, "face_min_score", FACE_SCORE_FLOOR), face_min_score or FACE_SCORE_FLOOR)
        if hash_error:
            scan = ScanResult(scan.level, scan.detections, scan.minor_signal, (*scan.scanner_errors, hash_error))
        decision = judge_input(scan, workflow=workflow, prompt_mature=prompt_verdict.mature,
                               allowed=NsfwLevel.parse(allowed_level), blocklisted=hash_match is not None,
                               request_minor=prompt_verdict.minor_signal, face_min_score=floor,
                               prompt_suggestive="suggestive" in prompt_verdict.tags)
        self.audit.append_verdict(decision.verdict, kind="input_image", subject=subject, request_id=request_id,
                                  user_id=user_id, details={"field": field_name, "workflow": workflow,
                                                            "scan": scan.to_dict(),
                                                            "regions": [list(r) for r in regions],
                                                            "hash_match": hash_match.to_dict() if hash_match
                                                            else None,
                                                            "allowed": NsfwLevel.parse(allowed_level).to_wire()})
        return decision


    def _struck_out(self, user_id: str | None) -> InputDecision | None:
        """A refusal, without scanning, for a user with `input_strikes` refused inputs within the window
        (the refusals are the audit log's own rows, so every replica counts the same). A count that
        fails refuses too (fail closed)."""
        if user_id is None:
            return None
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.config.input_strike_window_s)
        try:
            refused = self.audit.count_since(since, kind="input_image", action="block", user_id=user_id)
        except Exception as exc:  # noqa: BLE001 - fail closed
            log.error("input strikes of %s not counted: %s", user_id, type(exc).__name__)
            refused = self.config.input_strikes
        if refused < self.config.input_strikes:
            return None
        reason = Reason("input.strikes", f"{refused} input images refused within "
                                         f"{self.config.input_strike_window_s // 3600} h; edits are paused")
        return InputDecision(Verdict(Action.block, (reason,)), NsfwLevel.X, ())


@dataclass(frozen=True)
class ImageJudgement:
    """The outcome for one image: delivered or not, at which level, and the rule ids why not."""

    deliver: bool
    level: NsfwLevel
    reasons: tuple[str, ...]
    decision: ImageDecision
