"""The policy on input images (img2img, inpaint): decided before anything is charged.

An input image is scanned like a delivered one (NudeNet and every extra scanner, the age slot too),
then refused when:

- `input.hash_blocklisted`: its perceptual hash is within the configured distance of a known-abusive
  image's (`safety.image_hash`);
- `input.scan_failed`: a scanner (or the hash lookup) errored or timed out (fail closed: an input nobody could look at is
  never run);
- `input.level_above_allowed`: the input itself is above the level the caller may see;
- `input.minor_mature`: a minor signal (a scanner on the input, or the prompt or a resource flag, from the
  precheck's verdict) while anything about the request could sexualise it (below);
- `input.likeness_nudify`: the input shows a face (NudeNet's FACE_FEMALE / FACE_MALE at or above
  `face_min_score`, never above `FACE_SCORE_FLOOR`) and the request could sexualise it. This is the
  "nudify" pattern: a photograph of a real person turned into sexual imagery. Every detected face
  counts as possibly a real person's, drawn or photographed: the scanner cannot tell a photograph from
  a realistic render, and a wrongly refused drawing costs the user a resubmission, a wrongly allowed
  photograph costs a real person far more.

"Could sexualise it" is wider than "mature": a prompt the audit tags mature or suggestive (a
"see-through wet shirt" at PG13 is the first step of the pattern), an allowed level above PG13, or an
input already above PG.

An input that is allowed still hands its findings on: `TAG_INPUT_FACE` and `TAG_INPUT_MINOR` go into
the request's verdict (`carry_findings`), and the output postcheck withholds an edited image above
PG13 from an input with a face, and any exposure from one with a minor signal (a second line at
delivery, and the only one for minors where no age model is configured).

Plain Python, no I/O: `SafetyGate.check_input_image` scans, calls `judge_input` and audits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from safety.image_scan import FACE_LABELS, FACE_SCORE_FLOOR, Detection, ScanResult
from safety.levels import NsfwLevel
from safety.verdict import Action, Reason, Verdict

TAG_INPUT_FACE = "input:face"
TAG_INPUT_MINOR = "input:minor"


@dataclass(frozen=True)
class InputDecision:
    """The verdict on one input image, with the faces the scan found (face fix and moderators use them)."""

    verdict: Verdict
    level: NsfwLevel
    faces: tuple[Detection, ...]


def faces_in(scan: ScanResult, min_score: float = FACE_SCORE_FLOOR) -> tuple[Detection, ...]:
    # never above the floor the face fix detects from, whatever the caller passes
    floor = min(min_score, FACE_SCORE_FLOOR)
    return tuple(d for d in scan.detections if d.label in FACE_LABELS and d.score >= floor)


def judge_input(scan: ScanResult, *, workflow: str, prompt_mature: bool, allowed: NsfwLevel,
                blocklisted: bool = False, request_minor: bool = False, face_min_score: float = FACE_SCORE_FLOOR,
                prompt_suggestive: bool = False) -> InputDecision:
    reasons: list[Reason] = []
    if blocklisted:
        reasons.append(Reason("input.hash_blocklisted", "the input image matches a known-abusive image"))
    faces = faces_in(scan, face_min_score)
    if scan.failed:
        reasons.append(Reason("input.scan_failed", "the input image could not be scanned: "
                              + "; ".join(scan.scanner_errors)))
    if scan.level > allowed:
        reasons.append(Reason("input.level_above_allowed",
                              f"the input image is {scan.level.to_wire()}, above the allowed {allowed.to_wire()}"))
    mature = prompt_mature or allowed.mature or scan.level > NsfwLevel.PG
    # allowed.mature is "above PG13": a face edited at R or X could be turned nude whatever the prompt says
    sexualising = mature or prompt_suggestive
    if (scan.minor_signal or request_minor) and sexualising:
        reasons.append(Reason("input.minor_mature", "a minor signal on the input image with mature or "
                              "suggestive content"))
    if faces and sexualising and workflow in ("img2img", "inpaint"):
        reasons.append(Reason("input.likeness_nudify", "an input image showing a person's face cannot be "
                              "edited towards suggestive or mature content"))
    action = Action.block if reasons else Action.allow
    tags = frozenset({TAG_INPUT_FACE} if faces else set()) | frozenset({TAG_INPUT_MINOR} if scan.minor_signal
                                                                       else set())
    return InputDecision(Verdict(action, tuple(reasons), mature=mature, minor_signal=scan.minor_signal or request_minor,
                                 tags=tags), scan.level, faces)


def carry_findings(verdict: Verdict, decision: InputDecision) -> Verdict:
    """The request's verdict with the input's face and minor findings added as tags, for the postcheck."""
    found = decision.verdict.tags & {TAG_INPUT_FACE, TAG_INPUT_MINOR}
    return replace(verdict, tags=verdict.tags | found) if found else verdict
