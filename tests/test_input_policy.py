"""The input-image policy's rules, one by one, on scan results (what the scanners would report)."""

from __future__ import annotations

import pytest

from safety.image_scan import FACE_SCORE_FLOOR, Detection, ScanResult
from safety.input_policy import judge_input
from safety.levels import NsfwLevel

FACE = Detection("FACE_FEMALE", 0.8, (10, 10, 20, 20))
WEAK_FACE = Detection("FACE_MALE", FACE_SCORE_FLOOR - 0.1, (10, 10, 20, 20))  # under the face floor


def _rules(scan: ScanResult, *, workflow: str = "img2img", mature: bool = False,
           allowed: NsfwLevel = NsfwLevel.PG13, **kw) -> list[str]:
    decision = judge_input(scan, workflow=workflow, prompt_mature=mature, allowed=allowed, **kw)
    assert decision.verdict.blocked == bool(decision.verdict.rule_ids)
    return decision.verdict.rule_ids


def test_a_plain_input_is_allowed_and_its_faces_reported():
    decision = judge_input(ScanResult(NsfwLevel.PG, (FACE, WEAK_FACE)), workflow="img2img", prompt_mature=False,
                           allowed=NsfwLevel.PG13)
    assert not decision.verdict.blocked and decision.faces == (FACE,)


@pytest.mark.parametrize("mature, allowed, level", [
    (True, NsfwLevel.PG13, NsfwLevel.PG),   # a mature prompt
    (False, NsfwLevel.R, NsfwLevel.PG),     # a mature allowed level
    (False, NsfwLevel.X, NsfwLevel.PG13),   # nudity in the input
])
def test_a_face_with_anything_mature_is_the_nudify_pattern(mature, allowed, level):
    assert "input.likeness_nudify" in _rules(ScanResult(level, (FACE,)), mature=mature, allowed=allowed)
    assert "input.likeness_nudify" in _rules(ScanResult(level, (FACE,)), workflow="inpaint", mature=mature,
                                             allowed=allowed)
    # under the face score, or no face: not this rule
    assert "input.likeness_nudify" not in _rules(ScanResult(level, (WEAK_FACE,)), mature=mature, allowed=allowed)


def test_level_minor_scan_failure_and_hash_rules():
    assert _rules(ScanResult(NsfwLevel.R)) == ["input.level_above_allowed"]
    assert _rules(ScanResult(NsfwLevel.PG, minor_signal=True)) == []  # nothing mature about it
    assert _rules(ScanResult(NsfwLevel.PG, minor_signal=True), allowed=NsfwLevel.X) == ["input.minor_mature"]
    assert _rules(ScanResult(NsfwLevel.PG), allowed=NsfwLevel.R, request_minor=True) == ["input.minor_mature"]
    assert _rules(ScanResult(NsfwLevel.X, scanner_errors=("nudenet: timeout",))) == [
        "input.scan_failed", "input.level_above_allowed"]
    assert _rules(ScanResult(NsfwLevel.PG), blocklisted=True) == ["input.hash_blocklisted"]
