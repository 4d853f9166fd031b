"""The admission's part for img2img, inpaint and face fix: the fields each workflow needs, its inputs
decoded and judged before any hold, and the face fix as priced. Pure functions of the request, the
input store and the safety gate; `admission.Admission.plan` calls them in that order."""

from __future__ import annotations

from dataclasses import dataclass

from genserve.billing.pricing import FaceFixParams
from genserve.core import metrics
from genserve.core.errors import InputImageRefused, InvalidRequest, SafetyBlocked, Unavailable
from genserve.engine.geometry import Box, inpaint_work_box
from genserve.engine.prompt_syntax import extract_extra_networks
from genserve.generation.inputs import DecodedInput, InputImages, check_mask
from genserve.generation.protocol import GenerationRequest
from genserve.generation.worker.wire import denoise_steps
from safety.gate import SafetyGate
from safety.input_policy import carry_findings
from safety.levels import NsfwLevel
from safety.verdict import Verdict


@dataclass(frozen=True)
class PlanInputs:
    """An img2img/inpaint request's decoded input (and mask), judged safe, not yet stored."""

    image: DecodedInput
    mask: DecodedInput | None = None


# an input refusal's code: the gravest rule that fired names it (every rule is in `details`)
_INPUT_CODES = (("input.strikes", "input_image_strikes"), ("input.hash_blocklisted", "input_image_hash_blocked"),
                ("input.likeness_nudify", "input_image_nudify"), ("input.minor_mature", "input_image_minor"),
                ("input.level_above_allowed", "input_image_level"), ("input.scan_failed", "input_image_scan_failed"))


def check_workflow(request: GenerationRequest) -> None:
    """The fields a workflow needs, and none it cannot use (stable codes, before anything is decoded)."""
    wants_image, wants_mask = request.workflow != "txt2img", request.workflow == "inpaint"
    if wants_image and request.init_image is None:
        raise InputImageRefused(f"{request.workflow} needs `init_image`", code="input_image_missing",
                                details={"field": "init_image"})
    if wants_mask and request.mask is None:
        raise InputImageRefused("inpaint needs `mask`", code="input_image_missing", details={"field": "mask"})
    for name, given, wanted in (("init_image", request.init_image, wants_image), ("mask", request.mask, wants_mask)):
        if given is not None and not wanted:
            raise InputImageRefused(f"`{name}` is not used by {request.workflow}", code="input_image_unexpected",
                                    details={"field": name, "workflow": request.workflow})
    if request.face_fix and extract_extra_networks(request.face_fix.prompt).loras:
        # a LoRA tag here would load a LoRA the admission never checked against the blocklist
        raise InvalidRequest("the face-fix prompt cannot add LoRAs; list them in the request",
                             code="face_fix_lora_tag")
    if wants_image and request.hires is not None:
        raise InputImageRefused("hires fix is a txt2img pass; send the size you want instead",
                                code="input_image_with_hires")


def face_fix_params(request: GenerationRequest, size: tuple[int, int]) -> FaceFixParams | None:
    """The face fix as priced: `max_faces` inpaint passes at the working size, each its run steps."""
    ff = request.face_fix
    if ff is None:
        return None
    return FaceFixParams(size[0], size[1], denoise_steps(request.steps, ff.denoise), ff.max_faces)


def decode_inputs(inputs: InputImages | None, user_id: str, request: GenerationRequest,
                  max_pixels: int) -> PlanInputs | None:
    """The request's inputs decoded. An only-masked inpaint delivers the input's own size (the repainted
    box is pasted back into it), so that size is held to the worker's pixel limit like any output."""
    if request.init_image is None:
        return None
    if inputs is None:
        raise Unavailable("this service takes no input images", code="input_images_unavailable")
    image = inputs.load(request.init_image, user_id, field="init_image")
    mask = None
    if request.mask is not None:
        mask = inputs.load(request.mask, user_id, field="mask", mask=True)
        check_mask(mask, image)
        width, height = image.image.size
        if request.inpaint_only_masked and width * height > max_pixels:
            raise InputImageRefused(f"an only-masked inpaint delivers the input's {width}x{height}, over the "
                                    f"{max_pixels}-pixel limit", code="input_image_dimensions",
                                    details={"field": "init_image", "size": [width, height],
                                             "max_pixels": max_pixels})
    return PlanInputs(image, mask)


def work_regions(request: GenerationRequest, inputs: PlanInputs, size: tuple[int, int]) -> list[Box]:
    """The boxes of the input the engine works on at their own scale: an only-masked inpaint's padded
    crop, computed by the engine's own geometry from the mask as decoded."""
    if request.workflow != "inpaint" or not request.inpaint_only_masked or inputs.mask is None:
        return []
    return [inpaint_work_box(inputs.mask.image, mask_blur=request.mask_blur, padding=request.inpaint_padding,
                             width=size[0], height=size[1])]


def judge_inputs(safety: SafetyGate, user_id: str, request_id: str | None, request: GenerationRequest,
                 inputs: PlanInputs, verdict: Verdict, allowed: NsfwLevel, size: tuple[int, int]) -> Verdict:
    """The input image judged like a delivered one, plus the nudify rule; refused before any hold. It is
    scanned whole and in the region the engine works on (`work_regions`). The mask is binarised at
    decode, a shape rather than a picture: it is not scanned. Returns the request's verdict with the
    input's face and minor findings added (tags the output postcheck reads)."""
    decision = safety.check_input_image(
        inputs.image.image, workflow=request.workflow, prompt_verdict=verdict, allowed_level=allowed,
        regions=work_regions(request, inputs, size),
        subject=inputs.image.sha256, user_id=user_id, request_id=request_id,
        face_min_score=request.face_fix.confidence if request.face_fix else None)
    if decision.verdict.blocked:
        rules = decision.verdict.rule_ids
        for rule in rules:
            metrics.inc("genserve_prompts_blocked_total", rule=rule)
        code = next((c for rule, c in _INPUT_CODES if rule in rules), "input_image_blocked")
        raise SafetyBlocked("the input image was refused by the safety policy", code=code,
                            details={"rules": rules, "reasons": [r.to_dict() for r in decision.verdict.reasons]})
    return carry_findings(verdict, decision)
