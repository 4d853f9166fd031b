"""Face fix as ADetailer does it: detect faces, inpaint each face's box at the working size, paste back.

    image ─▶ faces (detector, score >= confidence, largest first, at most max_faces)
        ─▶ per face: box dilated by 4 px as the mask ─▶ inpaint only masked (mask blur, padding) at the
        image's width x height with the face prompt (or the image's), the image's seed ─▶ pasted back

The detector is the image scanner's NudeNet model (its FACE_FEMALE / FACE_MALE classes), handed in by
the worker: it is already loaded on every replica for the safety scan, so the face fix costs no other
model, install or memory; ADetailer's YOLO face models would need `ultralytics` (torch-side, AGPL).
Pixels outside each face's blurred, dilated box are the image's: the inpaint overlay keeps them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from genserve.engine import img2img
from genserve.engine.prompt_encoding import ScheduledConditioning
from genserve.generation.worker.wire import FaceFixSpec

Box = tuple[int, int, int, int]  # x1, y1, x2, y2
# (image, minimum score) -> face boxes with their scores
FaceDetector = Callable[[Image.Image, float], Sequence[tuple[Box, float]]]
DILATE_PX = 4  # ADetailer's default "dilate/erode"
DETECTOR_NAME = "nudenet-320n-face"


@dataclass(frozen=True)
class _FacePass:
    """A face's inpaint pass in the terms `img2img.prepare` / `run_one` read."""

    denoise: float
    mask_blur: int
    padding: int
    workflow: str = "inpaint"
    resize_mode: str = "just_resize"
    only_masked: bool = True


def faces(image: Image.Image, spec: FaceFixSpec, detector: FaceDetector) -> list[Box]:
    """The boxes to fix: at or above the confidence, largest first (ADetailer's order), at most max_faces."""
    found = [(box, score) for box, score in detector(image, spec.confidence) if score >= spec.confidence]
    found.sort(key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]), reverse=True)
    return [box for box, _ in found[:spec.max_faces]]


def face_mask(size: tuple[int, int], box: Box) -> Image.Image:
    x1, y1, x2, y2 = box
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((max(x1 - DILATE_PX, 0), max(y1 - DILATE_PX, 0),
                                    min(x2 + DILATE_PX, size[0]) - 1, min(y2 + DILATE_PX, size[1]) - 1), fill=255)
    return mask


def fix_faces(view: DiffusionPipeline, image: Image.Image, spec: FaceFixSpec, detector: FaceDetector,
              cond: ScheduledConditioning, *, seed: int, steps: int, cfg_scale: float, width: int, height: int,
              make_scheduler: Callable[[], Any], sdxl: bool, on_step: Callable[[], None],
              cancel: threading.Event) -> tuple[Image.Image | None, int]:
    """`image` with its faces inpainted (None when canceled), and how many faces were fixed."""
    settings = _FacePass(spec.denoise, spec.mask_blur, spec.padding)
    boxes = faces(image, spec, detector)
    for box in boxes:
        prepared = img2img.prepare(settings, image, face_mask(image.size, box), width, height)
        fixed = img2img.run_one(view, settings, prepared, cond, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                width=width, height=height, scheduler=make_scheduler(), sdxl=sdxl,
                                on_step=on_step, cancel=cancel)
        if fixed is None:
            return None, 0
        image = fixed
    return image, len(boxes)


def infotext_fields(spec: FaceFixSpec) -> dict[str, object]:
    """ADetailer's infotext fields for its first tab."""
    fields: dict[str, object] = {"ADetailer model": DETECTOR_NAME}
    if spec.prompt:
        fields["ADetailer prompt"] = spec.prompt
    fields.update({
        "ADetailer confidence": float(spec.confidence), "ADetailer dilate erode": DILATE_PX,
        "ADetailer mask blur": spec.mask_blur, "ADetailer denoising strength": float(spec.denoise),
        "ADetailer inpaint only masked": True, "ADetailer inpaint padding": spec.padding,
    })
    return fields
