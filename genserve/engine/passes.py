"""The passes around a generation's denoise: img2img / inpaint from an input, and the face fix after it.

Both run on views of the loaded pipeline (`views.pipeline_view`), image by image from each image's
own seed, with the conditioning `generate` encoded from the safety-injected prompts: a face-fix
prompt goes through the same `inject` (safety tokens first in the negative prompt) and encoder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from genserve.engine import face_fix, img2img
from genserve.engine.prompt_encoding import PromptEncoder, ScheduledConditioning, encode_scheduled
from genserve.engine.prompt_syntax import extract_extra_networks
from genserve.engine.schedulers import make_scheduler
from genserve.engine.views import pipeline_view
from genserve.generation.worker.wire import FaceFixSpec, WorkerRequest

ProgressCallback = Callable[[int, int, int], None]


def infotext_fields(request: WorkerRequest) -> dict[str, object]:
    """The img2img / inpaint and face-fix fields of an image's infotext, as A1111 and ADetailer name them."""
    fields: dict[str, object] = {}
    spec = request.init
    if spec is not None:
        fields["Denoising strength"] = float(spec.denoise)
        if spec.workflow == "inpaint":
            fields["Mask blur"] = spec.mask_blur
            if spec.only_masked:
                fields.update({"Inpaint area": "Only masked", "Masked area padding": spec.padding})
    if request.face_fix is not None:
        fields.update(face_fix.infotext_fields(request.face_fix))
    return fields


def _stepper(index: int, total: int, on_progress: ProgressCallback | None) -> Callable[[], None]:
    done = [0]

    def step() -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(index, min(done[0], total), total)

    return step


def run_init(pipe: DiffusionPipeline, request: WorkerRequest, init: tuple[Image.Image, Image.Image | None],
             cond: ScheduledConditioning, sdxl: bool, emit: Callable[[int, int, Image.Image], bool],
             on_progress: ProgressCallback | None, cancel: threading.Event) -> tuple[bool, float]:
    """The img2img / inpaint images one by one, each handed to `emit`; (canceled, denoise ms)."""
    spec = request.init
    assert spec is not None
    view = pipeline_view(pipe, img2img.pipeline_class(pipe, spec.workflow))
    prepared = img2img.prepare(spec, init[0], init[1], request.width, request.height)
    started = time.perf_counter()
    for index, seed in enumerate(request.seeds):
        if cancel.is_set():
            return True, (time.perf_counter() - started) * 1000
        total = img2img.planned_steps(make_scheduler(request.sampler, pipe.scheduler.config, seed), request.steps,
                                      spec.denoise)
        image = img2img.run_one(view, spec, prepared, cond, seed=seed, steps=request.steps,
                                cfg_scale=request.cfg_scale, width=request.width, height=request.height,
                                scheduler=make_scheduler(request.sampler, pipe.scheduler.config, seed), sdxl=sdxl,
                                on_step=_stepper(index, max(1, total), on_progress), cancel=cancel)
        if image is None or not emit(index, seed, image):
            return True, (time.perf_counter() - started) * 1000
    return False, (time.perf_counter() - started) * 1000


@dataclass
class FaceFixer:
    """One request's face fix: its inpaint view, its conditioning and the replica's face detector."""

    pipe: DiffusionPipeline
    request: WorkerRequest
    spec: FaceFixSpec
    detector: face_fix.FaceDetector
    view: DiffusionPipeline
    cond: ScheduledConditioning
    sdxl: bool
    on_progress: ProgressCallback | None
    cancel: threading.Event
    fixed: int = 0

    @classmethod
    def build(cls, pipe: DiffusionPipeline, request: WorkerRequest, detector: face_fix.FaceDetector | None,
              safety: Any, encoder: PromptEncoder, sdxl: bool, on_progress: ProgressCallback | None,
              cancel: threading.Event) -> FaceFixer | None:
        spec = request.face_fix
        if spec is None:
            return None
        if detector is None:  # asked for and impossible: the request fails rather than skip it silently
            raise RuntimeError("face fix needs the image scanner's face detector, which is unavailable")
        prompt, negative = safety.inject(prompt=spec.prompt or request.prompt,
                                         negative_prompt=request.negative_prompt, mature=request.mature)
        prefix = safety.inject(prompt="", negative_prompt="", mature=request.mature)[1]
        if not negative.startswith(prefix):
            raise RuntimeError("the injected negative prompt does not start with the safety tokens")
        with torch.no_grad():
            cond = encode_scheduled(encoder, steps=request.steps, prompt=extract_extra_networks(prompt).text,
                                    negative=extract_extra_networks(negative[len(prefix):]).text,
                                    protected_negative_prefix=prefix)
        view = pipeline_view(pipe, img2img.pipeline_class(pipe, "inpaint"))
        return cls(pipe, request, spec, detector, view, cond, sdxl, on_progress, cancel)

    def apply(self, index: int, seed: int, image: Image.Image) -> tuple[Image.Image | None, int]:
        """`image` with its faces fixed at the request's working size (None when a cancel stopped it),
        and how many face passes ran (the capture gives back the ones held but not needed)."""
        r = self.request
        total = max(1, img2img.planned_steps(make_scheduler(r.sampler, self.pipe.scheduler.config, seed), r.steps,
                                             self.spec.denoise) * self.spec.max_faces)
        out, count = face_fix.fix_faces(
            self.view, image, self.spec, self.detector, self.cond, seed=seed, steps=r.steps, cfg_scale=r.cfg_scale,
            width=r.width, height=r.height, sdxl=self.sdxl, cancel=self.cancel,
            make_scheduler=lambda: make_scheduler(r.sampler, self.pipe.scheduler.config, seed),
            on_step=_stepper(index, total, self.on_progress))
        self.fixed += count
        return out, count
