"""img2img and inpaint as A1111 runs them: resize modes, mask blur, inpaint-only-masked, paste-back.

    input ─▶ resize to width x height (just resize | crop and resize | resize and fill)
    inpaint, only masked: blur the mask ─▶ the mask's box + padding, widened to width:height
        ─▶ crop image and mask, resize to width x height ─▶ denoise ─▶ resize back, paste into the box
    inpaint, whole image: blur the mask ─▶ resize image and mask ─▶ denoise
    inpaint, both: the original is laid over the result through the inverted blurred mask (A1111's
    overlay), so every pixel the blurred mask leaves at 0 is exactly the input's

The diffusion runs on diffusers' (XL) img2img / inpaint pipelines, views over the loaded txt2img
pipeline's components (`views.pipeline_view`): the same weights, LoRAs, embeddings and safety
tokens. Each image runs alone from its own seeded CPU generator, so image i depends only on seeds[i].
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageOps

from genserve.engine.geometry import (  # noqa: F401 - crop_region, expand_to_ratio: the engine's names too
    blur_mask,
    crop_region,
    expand_to_ratio,
    only_masked_box,
)
from genserve.engine.prompt_encoding import ScheduledConditioning
from genserve.generation.worker.wire import denoise_steps

_PIPELINES: dict[tuple[type[DiffusionPipeline], str], type[DiffusionPipeline]] = {
    (StableDiffusionPipeline, "img2img"): StableDiffusionImg2ImgPipeline,
    (StableDiffusionPipeline, "inpaint"): StableDiffusionInpaintPipeline,
    (StableDiffusionXLPipeline, "img2img"): StableDiffusionXLImg2ImgPipeline,
    (StableDiffusionXLPipeline, "inpaint"): StableDiffusionXLInpaintPipeline,
}
_LANCZOS = Image.Resampling.LANCZOS


class PassSettings(Protocol):
    """One img2img / inpaint pass's settings: a request's `InitSpec`, or a face-fix pass's."""

    workflow: str
    denoise: float
    resize_mode: str
    mask_blur: int
    only_masked: bool
    padding: int


def pipeline_class(pipe: DiffusionPipeline, workflow: str) -> type[DiffusionPipeline]:
    for (base, name), cls in _PIPELINES.items():
        if name == workflow and isinstance(pipe, base):
            return cls
    raise TypeError(f"no {workflow} pipeline for {type(pipe).__name__}")


# ------------------------------------------------------------------------------ A1111's image geometry


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """A1111's resize modes: stretch; cover then centre-crop; fit then fill the bands by stretching the
    image's edge rows (or columns) outwards."""
    if mode == "just_resize":
        return image.resize((width, height), _LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    crop = mode == "crop_and_resize"
    wide = ratio > src_ratio if crop else ratio < src_ratio
    src_w = width if wide else image.width * height // image.height
    src_h = image.height * width // image.width if wide else height
    resized = image.resize((src_w, src_h), _LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if crop:
        return out
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


@dataclass(frozen=True)
class PreparedInput:
    """What one request's pipeline calls get (image and mask at the working size) and how a result goes
    back: pasted into `paste_box` of an image of the overlay's size, then the overlay laid over it."""

    image: Image.Image
    mask: Image.Image | None = None
    overlay: Image.Image | None = None  # RGBA: the input where it must stay, transparent where it is repainted
    paste_box: tuple[int, int, int, int] | None = None

    def finish(self, result: Image.Image) -> Image.Image:
        if self.overlay is None:
            return result
        if self.paste_box is not None:
            x1, y1, x2, y2 = self.paste_box
            base = Image.new("RGBA", self.overlay.size)
            base.paste(resize_image(result, x2 - x1, y2 - y1, "crop_and_resize"), (x1, y1))
            result = base
        out = result.convert("RGBA")
        out.alpha_composite(self.overlay)
        return out.convert("RGB")


def prepare(spec: PassSettings, image: Image.Image, mask: Image.Image | None, width: int, height: int) -> PreparedInput:
    if spec.workflow == "img2img" or mask is None:
        return PreparedInput(resize_image(image, width, height, spec.resize_mode))
    mask = blur_mask(mask, spec.mask_blur)
    if spec.only_masked:
        box = only_masked_box(mask, spec.padding, width, height)  # the box the input scan looked at too
        overlay = _overlay(image, mask)
        work_image = resize_image(image.crop(box), width, height, "resize_and_fill")
        work_mask = resize_image(mask.crop(box), width, height, "resize_and_fill")
        return PreparedInput(work_image, work_mask, overlay, box)
    work_image = resize_image(image, width, height, spec.resize_mode)
    work_mask = resize_image(mask, width, height, spec.resize_mode)
    return PreparedInput(work_image, work_mask, _overlay(work_image, work_mask))


def _overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The input, opaque where the mask is 0, fading out as the blurred mask rises (A1111's overlay)."""
    overlay = image.convert("RGBA")
    overlay.putalpha(ImageOps.invert(mask))
    return overlay


# ------------------------------------------------------------------------------------------ denoising


def run_one(view: DiffusionPipeline, spec: PassSettings, prepared: PreparedInput, cond: ScheduledConditioning, *,
            seed: int, steps: int, cfg_scale: float, width: int, height: int, scheduler: Any, sdxl: bool,
            on_step: Callable[[], None], cancel: threading.Event) -> Image.Image | None:
    """One image: the denoise at `spec.denoise` from `prepared`, pasted back; None when canceled. With 0
    steps to run (strength 0, or steps x strength under 1) the prepared input comes back as it is."""
    if denoise_steps(steps, spec.denoise) == 0:
        return prepared.finish(prepared.image)
    calls = {"n": 0, "total": max(1, planned_steps(scheduler, steps, spec.denoise))}

    def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict) -> dict:
        calls["n"] += 1
        on_step()
        if cancel.is_set():
            pipe._interrupt = True
        if cond.varies:  # prompt editing / alternation: the next sampling step's conditioning
            next_step = calls["n"] * cond.steps // calls["total"] + 1
            return {**kwargs, **cond.step_update(next_step, pipe.do_classifier_free_guidance, batch=1)}
        return kwargs

    extra: dict[str, Any] = {}
    if cond.varies:
        extra["callback_on_step_end_tensor_inputs"] = cond.callback_tensors(sdxl)
    if prepared.mask is not None:
        extra.update(mask_image=prepared.mask, width=width, height=height)
    view.scheduler = scheduler
    out = view(**cond.pipeline_kwargs(), image=prepared.image, strength=spec.denoise, num_inference_steps=steps,
               guidance_scale=cfg_scale, generator=torch.Generator(device="cpu").manual_seed(seed),
               callback_on_step_end=on_step_end, **extra).images
    return None if cancel.is_set() else prepared.finish(out[0])


def planned_steps(scheduler: Any, steps: int, strength: float) -> int:
    """The step callbacks the pipeline will make at `strength` (a multi-stage sampler steps more often)."""
    scheduler.set_timesteps(steps, device="cpu")
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return max(0, len(scheduler.timesteps) - t_start * getattr(scheduler, "order", 1))
