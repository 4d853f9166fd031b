"""Safety policy: precheck (audit + resource flags + likeness hits) and per-image postcheck, fail closed."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from safety.image_scan import Detection, ImageScanner, ScanResult
from safety.levels import NsfwLevel
from safety.policy import (
    ImageDecision,
    LikenessHit,
    ResourceFlags,
    SafetyPolicy,
    Severity,
    effective_level,
)
from safety.verdict import Action

RULES_DIR = Path(__file__).resolve().parents[1] / "configs" / "safety"
CKPT = ResourceFlags("ckpt-1")


@pytest.fixture(scope="module")
def policy() -> SafetyPolicy:
    return SafetyPolicy.from_dir(RULES_DIR)


def scan(level: NsfwLevel, minor: bool = False, errors: tuple[str, ...] = ()) -> ScanResult:
    return ScanResult(level, (Detection("X", 0.9, (), "test", level),), minor, errors)


# -- precheck ------------------------------------------------------------------------------------


def test_clean_request_is_allowed(policy):
    v = policy.precheck("a red fox in the snow", "blurry", [CKPT, ResourceFlags("lora-1")], [], "X")
    assert v.action is Action.allow and not v.minor_signal and not v.mature


def test_prompt_audit_verdict_flows_through(policy):
    v = policy.precheck("nude, 15yo", "", [CKPT], [], NsfwLevel.X)
    assert v.action is Action.block and "minor_with_mature" in v.rule_ids


def test_likeness_hit_blocks(policy):
    hit = LikenessHit("lora-7", "likeness.fingerprint", "matches a blocklisted likeness")
    v = policy.precheck("a portrait", "", [CKPT, ResourceFlags("lora-7")], [hit], "PG")
    assert v.action is Action.block
    (reason,) = [r for r in v.reasons if r.rule_id == "likeness.fingerprint"]
    assert reason.matched == "lora-7" and reason.field == "resources"


def test_poi_resource_blocks_only_with_a_mature_prompt(policy):
    poi = ResourceFlags("lora-poi", poi=True)
    assert policy.precheck("portrait, studio light", "", [CKPT, poi], [], "X").action is Action.allow
    v = policy.precheck("portrait, nude", "", [CKPT, poi], [], "X")
    assert v.action is Action.block and "poi_resource_with_mature" in v.rule_ids


def test_minor_resource_sets_minor_signal_and_caps_level(policy):
    minor = ResourceFlags("lora-kid", minor=True)
    v = policy.precheck("a portrait in a park", "", [CKPT, minor], [], "X")
    assert v.action is Action.allow and v.minor_signal and "resource.minor" in v.rule_ids
    assert effective_level(v, "X") is NsfwLevel.PG13
    assert effective_level(v, "PG") is NsfwLevel.PG
    v = policy.precheck("a portrait, lingerie", "", [CKPT, minor], [], "X")
    assert v.action is Action.block and "minor_resource_with_mature" in v.rule_ids


def test_sfw_only_resource_caps_level_without_minor_signal(policy):
    v = policy.precheck("a portrait, nude", "", [CKPT, ResourceFlags("lora-sfw", sfw_only=True)], [], "X")
    assert v.action is Action.allow and not v.minor_signal and v.mature
    assert effective_level(v, "R") is NsfwLevel.PG13


def test_precheck_fails_closed(policy):
    class BrokenAuditor:
        def audit(self, prompt, negative=""):
            raise RuntimeError("rules vanished")

    v = SafetyPolicy(BrokenAuditor()).precheck("a cat", "", [CKPT], [], "PG")
    assert v.action is Action.block and v.rule_ids == ["precheck_failed"]
    v = policy.precheck("a cat", "", [CKPT], [], "ULTRA")  # unknown level
    assert v.action is Action.block and v.rule_ids == ["precheck_failed"]


def test_takedown_names_reach_the_policy(policy):
    assert policy.precheck("jane example, nude", "", [CKPT], [], "X").action is Action.allow
    v = policy.with_person_names(["Jane Example"]).precheck("jane example, nude", "", [CKPT], [], "X")
    assert v.action is Action.block and "person_with_mature" in v.rule_ids


# -- postcheck -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "allowed", "deliver"),
    [(NsfwLevel.PG, "PG", True), (NsfwLevel.PG13, "PG", False), (NsfwLevel.R, "R", True),
     (NsfwLevel.X, "R", False), (NsfwLevel.X, "X", True)],
)
def test_images_above_the_allowed_level_are_withheld(policy, level, allowed, deliver):
    pre = policy.precheck("a woman on a beach", "", [CKPT], [], allowed)
    d = policy.postcheck(scan(level), pre, allowed)
    assert d.deliver is deliver and d.level is level
    assert d.action is (Action.allow if deliver else Action.block)
    assert d.rule_ids == ([] if deliver else ["nsfw_level_exceeded"])


@pytest.mark.parametrize(
    ("prompt", "resources", "scanner_minor", "source"),
    [
        ("a child flying a kite", [CKPT], False, "prompt"),
        ("a portrait", [CKPT, ResourceFlags("lora-kid", minor=True)], False, "resource"),
        ("a portrait", [CKPT], True, "scanner"),
    ],
)
def test_mature_image_with_any_minor_signal_goes_to_review(policy, prompt, resources, scanner_minor, source):
    pre = policy.precheck(prompt, "", resources, [], "X")
    assert pre.action is Action.allow
    for level, severity in ((NsfwLevel.R, Severity.high), (NsfwLevel.X, Severity.critical)):
        d = policy.postcheck(scan(level, minor=scanner_minor), pre, "X")
        assert not d.deliver and d.action is Action.review and d.severity is severity
        assert d.rule_ids and set(d.rule_ids) == {"mature_image_with_minor_signal"}
        assert source in [r.matched for r in d.reasons]
    # A PG image with the same signals is fine.
    assert policy.postcheck(scan(NsfwLevel.PG, minor=scanner_minor), pre, "X").deliver


def test_negative_prompt_minor_signal_counts(policy):
    pre = policy.precheck("a portrait", "adult, mature body", [CKPT], [], "X")
    assert pre.action is Action.allow and pre.minor_signal
    d = policy.postcheck(scan(NsfwLevel.R), pre, "X")
    assert d.action is Action.review and not d.deliver


def test_mature_image_from_poi_resource_goes_to_review(policy):
    pre = policy.precheck("portrait", "", [CKPT, ResourceFlags("lora-poi", poi=True)], [], "X")
    d = policy.postcheck(scan(NsfwLevel.R), pre, "X")
    assert d.action is Action.review and d.rule_ids == ["mature_image_with_poi_resource"]
    assert policy.postcheck(scan(NsfwLevel.PG13), pre, "X").deliver


def test_sfw_only_resource_withholds_mature_images(policy):
    pre = policy.precheck("portrait", "", [CKPT, ResourceFlags("lora-sfw", sfw_only=True)], [], "X")
    assert not policy.postcheck(scan(NsfwLevel.R), pre, "X").deliver
    assert policy.postcheck(scan(NsfwLevel.PG13), pre, "X").deliver


def test_scan_failure_withholds(policy):
    pre = policy.precheck("a cat", "", [CKPT], [], "X")
    d = policy.postcheck(scan(NsfwLevel.PG, errors=("nudenet: TimeoutError: no answer",)), pre, "X")
    assert not d.deliver and d.action is Action.block and d.rule_ids == ["scan_failed"]


def test_refused_request_never_delivers(policy):
    pre = policy.precheck("bestiality", "", [CKPT], [], "X")
    d = policy.postcheck(scan(NsfwLevel.PG), pre, "X")
    assert not d.deliver and d.rule_ids == ["precheck_blocked"]


def test_postcheck_fails_closed(policy):
    pre = policy.precheck("a cat", "", [CKPT], [], "X")
    d = policy.postcheck(ScanResult("NOT-A-LEVEL"), pre, "X")  # type: ignore[arg-type]
    assert isinstance(d, ImageDecision) and not d.deliver and d.rule_ids == ["postcheck_failed"]
    d = policy.postcheck(scan(NsfwLevel.PG), pre, "SOMETHING")
    assert not d.deliver and d.rule_ids == ["postcheck_failed"]


def test_end_to_end_with_the_scanner(policy):
    """Prompt minor signal + a detector that reports explicit exposure (mocked: no such image here)."""

    class Detector:
        def detect(self, image):
            return [{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.8, "box": [0, 0, 8, 8]}]

    scanner = ImageScanner.from_config(RULES_DIR, detector=Detector())
    pre = policy.precheck("a child flying a kite in a park", "", [CKPT], [], "X")
    d = policy.postcheck(scanner.scan(Image.new("RGB", (16, 16))), pre, "X")
    assert d.level is NsfwLevel.X and d.action is Action.review and d.severity is Severity.critical
    assert d.to_dict()["rules"] == ["mature_image_with_minor_signal"]


@pytest.mark.parametrize("source", ["prompt", "scanner"])
def test_any_exposure_with_a_minor_signal_is_withheld_for_review(policy, source):
    """PG13 exposure (not only R/X) with a minor signal from the prompt or a scanner is withheld."""
    prompt = "a child flying a kite" if source == "prompt" else "a portrait"
    pre = policy.precheck(prompt, "", [CKPT], [], "X")
    d = policy.postcheck(scan(NsfwLevel.PG13, minor=source == "scanner"), pre, "X")
    assert not d.deliver and d.action is Action.review and d.rule_ids == ["exposure_with_minor_signal"]
    assert source in [r.matched for r in d.reasons]
