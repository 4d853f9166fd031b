"""One generation on a loaded pipeline: synchronous, meant to run in a worker thread.

The txt2img and img2img pipelines are views over the loaded pipeline's components (`from_pipe`, no
weight copies), built once per loaded pipeline and used by one request at a time (the caller holds
the checkpoint's lock). Per image there is a new scheduler and seeded generator, so image i depends
only on `seeds[i]` and the parameters: a batch of N is N reproducible single images. The prompts always pass through
the safety embeddings' `inject` here, whatever the caller already did, and are encoded here from those
strings (A1111 syntax, `prompt_encoding`): no caller-supplied embeddings ever reach the pipeline. A step callback reports progress and turns a set
cancel event into diffusers' interrupt flag, so a cancel takes effect within one step. An img2img or
inpaint request (an input image) and the face fix after any image run in `passes`, on the same
conditioning and safety tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from genserve.core.config.worker import WorkerConfig
from genserve.engine import passes
from genserve.engine.face_fix import FaceDetector
from genserve.engine.infotext import build_infotext, encode_image
from genserve.engine.prompt_encoding import (
    PromptEncoder,
    ScheduledConditioning,
    encode_scheduled,
)
from genserve.engine.prompt_syntax import extract_extra_networks, lora_tag
from genserve.engine.schedulers import infotext_sampler, make_scheduler, sampler_spec
from genserve.engine.views import pipeline_view
from genserve.generation.worker.wire import WorkerRequest, hires_size
from safety.embeddings import InjectedPrompts

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, int], None]  # (image index, step, total steps)

_IMG2IMG: dict[type[DiffusionPipeline], type[DiffusionPipeline]] = {
    StableDiffusionPipeline: StableDiffusionImg2ImgPipeline,
    StableDiffusionXLPipeline: StableDiffusionXLImg2ImgPipeline,
}
_UPSCALER_NAMES = {"latent": "Latent", "lanczos": "Lanczos"}


class PromptInjector(Protocol):
    """The safety embeddings' prompt rewrite (`safety.embeddings.SafetyEmbeddings.inject`)."""

    def inject(self, *, prompt: str, negative_prompt: str, mature: bool) -> InjectedPrompts: ...


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int
    image: Image.Image
    infotext: str  # A1111's `parameters` text
    face_passes: int = 0  # face-fix passes run on it (each priced; the ones held but not run are given back)

    def encode(self, fmt: str = "png", quality: int = 90) -> bytes:
        """The image with its infotext as PNG, JPEG or WebP (a 1024² PNG takes 0.1-0.2 s of CPU: the caller
        does it off the GPU's path)."""
        return encode_image(self.image, self.infotext, fmt, quality)


@dataclass
class GenerationOutcome:
    """`images` holds only finished images; `canceled` says the run stopped early; `failed` names the
    images a later pass (the face fix) failed on, index -> (seed, reason): not delivered, not charged."""

    images: list[GeneratedImage]
    canceled: bool
    final_prompt: str
    final_negative_prompt: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    failed: dict[int, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What the infotext says about the checkpoint, the LoRAs (name -> AutoV3 hash) and the VAE."""

    name: str
    model_hash: str
    lora_hashes: Mapping[str, str] = field(default_factory=dict)
    ti_hashes: Mapping[str, str] = field(default_factory=dict)
    # a VAE other than the checkpoint's own: its name and AutoV2 hash
    vae_name: str | None = None
    vae_hash: str | None = None


class _QuietCastWarning(logging.Filter):
    """`from_pipe` casts to the dtype the components already have; diffusers then warns about keeping an
    empty list of modules in float32 on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_QuietCastWarning())


# ------------------------------------------------------------------------------------- pipeline set-up


def prepare_pipeline(pipe: DiffusionPipeline, config: WorkerConfig) -> DiffusionPipeline:
    """Device-specific speed settings, applied once after loading.

    CUDA: channels_last UNet and xformers attention when configured and installed, else torch SDPA
    (diffusers' default processor). CPU: nothing beyond the fp32 the loader picked.
    """
    pipe.set_progress_bar_config(disable=True)
    if pipe.device.type != "cuda":
        return pipe
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if config.enable_xformers:
        try:
            import xformers  # noqa: F401

            pipe.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # noqa: BLE001 - fall back to SDPA, the default
            logger.warning("xformers unavailable (%s); using torch SDPA attention", exc)
    return pipe


def img2img_class(pipe: DiffusionPipeline) -> type[DiffusionPipeline]:
    for base, img2img in _IMG2IMG.items():
        if isinstance(pipe, base):
            return img2img
    raise TypeError(f"no img2img pipeline for {type(pipe).__name__}")


# ------------------------------------------------------------------------------------------ helpers


def safety_prefix(safety: PromptInjector, mature: bool) -> str:
    """The safety tokens the injector puts first in every negative prompt (its output for an empty one)."""
    return safety.inject(prompt="", negative_prompt="", mature=mature)[1]


def split_negative(negative: str, prefix: str) -> str:
    """The user's part of an injected negative prompt (after the safety prefix). Fails closed when the
    injected prompt does not start with the prefix."""
    if not negative.startswith(prefix):
        raise RuntimeError("the injected negative prompt does not start with the safety tokens")
    return negative[len(prefix):]


def infotext_prompt(prompt: str, loras: Mapping[str, float], negative: str = "") -> str:
    """The prompt as the infotext records it: the LoRAs listed as resources become `<lora:id:w>` tags
    (A1111's way of naming them), so the infotext alone asks for the same LoRAs again."""
    tagged = {tag.name for text in (prompt, negative) for tag in extract_extra_networks(text).loras}
    extra = [lora_tag(name, w) for name, w in loras.items() if name not in tagged]
    return " ".join([prompt, *extra]) if extra else prompt


def hires_inference_steps(steps: int, denoise: float) -> int:
    """A1111 runs exactly `steps` second-pass steps; diffusers runs about `n * strength` of `n`."""
    return max(steps, int(steps / min(denoise, 0.999)))


def _planned_steps(scheduler: Any, num_inference_steps: int, strength: float | None = None) -> int:
    """How many times the step callback will fire (multi-stage samplers like Heun step more often)."""
    try:
        scheduler.set_timesteps(num_inference_steps, device="cpu")
        total = len(scheduler.timesteps)
    except Exception:  # noqa: BLE001 - only used for the progress total
        return num_inference_steps if strength is None else max(1, int(num_inference_steps * strength))
    if strength is None:
        return total
    init = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init, 0))
    return max(0, total - t_start * getattr(scheduler, "order", 1))


# ---------------------------------------------------------------------------------------- generate


def generate(
    pipe: DiffusionPipeline,
    request: WorkerRequest,
    *,
    safety: PromptInjector,
    model: ModelInfo,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    on_image: Callable[[GeneratedImage], None] | None = None,
    batch_size: int = 1,
    init: tuple[Image.Image, Image.Image | None] | None = None,
    face_detector: FaceDetector | None = None,
) -> GenerationOutcome:
    """Generate `len(request.seeds)` images on `pipe`; the caller holds the pipeline's lock.

    Up to `batch_size` images run in one pipeline call, each from its own seeded generator, so a batch
    gives the images one-by-one runs give (samplers that seed their own noise run one by one).
    `on_image` sees each finished image as soon as its batch is decoded, before the next batch starts.
    No PNG is encoded here: the worker encodes and scans each image on other threads, so the
    pipeline (and its lock) is free for the next image or request meanwhile. `init` is the decoded input
    image and mask of an img2img / inpaint request (`request.init`); `face_detector` finds the faces a
    `request.face_fix` repaints (`passes`)."""
    sampler_spec(request.sampler)  # an unknown sampler is refused before any work
    cancel = cancel or threading.Event()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    prompt, negative = safety.inject(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                     mature=request.mature)
    prefix = safety_prefix(safety, request.mature)
    user_negative = split_negative(negative, prefix)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    base_config = pipe.scheduler.config
    txt2img = pipeline_view(pipe, type(pipe))
    img2img = None
    hires = request.hires
    if hires is not None and hires.denoise > 0:
        img2img = pipeline_view(pipe, img2img_class(pipe))
    # the prompts are encoded here, A1111's way (weights, BREAK, long prompts, editing); LoRA tags are
    # no words: the admission turned them into the request's LoRAs
    encoder = PromptEncoder(pipe, request.clip_skip)
    texts = dict(prompt=extract_extra_networks(prompt).text,
                 negative=extract_extra_networks(user_negative).text, protected_negative_prefix=prefix)
    with torch.no_grad():
        first_cond = encode_scheduled(encoder, steps=request.steps, **texts)
        second_cond = None
        if img2img is not None and hires is not None:
            second_cond = encode_scheduled(encoder, steps=hires.steps or request.steps, **texts)
    timings["encode_ms"] = (time.perf_counter() - started) * 1000
    timings["setup_ms"] = (time.perf_counter() - started) * 1000
    sampler_base, schedule_type = infotext_sampler(request.sampler)
    info_prompt = infotext_prompt(prompt, {x.resource_id: x.strength for x in request.loras}, negative)

    images: list[GeneratedImage] = []
    spec = request.init
    pass_fields = passes.infotext_fields(request)  # img2img / inpaint / face fix
    failed: dict[int, tuple[int, str]] = {}
    fixer = passes.FaceFixer.build(pipe, request, face_detector, safety, encoder, sdxl, on_progress, cancel)

    def emit(index: int, seed: int, image: Image.Image) -> bool:
        """Finish one image (its face fix) and hand it on; False when a cancel stopped the face fix."""
        face_passes = 0
        if fixer is not None:
            try:
                fixed, face_passes = fixer.apply(index, seed, image)
            except Exception as exc:  # noqa: BLE001 - one image's face fix failing costs only that image
                logger.warning("face fix failed on image %d: %s", index, exc)
                failed[index] = (seed, f"{type(exc).__name__}: {exc}")
                return True
            if fixed is None:
                return False
            image = fixed
        info = build_infotext(
            prompt=info_prompt, negative_prompt=negative, steps=request.steps, sampler=sampler_base,
            schedule_type=schedule_type,
            cfg_scale=request.cfg_scale, seed=seed, width=request.width, height=request.height,
            model_hash=model.model_hash, model_name=model.name, clip_skip=request.clip_skip,
            lora_hashes=model.lora_hashes, ti_hashes=model.ti_hashes, vae_name=model.vae_name, vae_hash=model.vae_hash,
            hires_scale=hires.scale if hires else None,
            hires_steps=(hires.steps or request.steps) if hires else None,
            hires_denoise=hires.denoise if hires else None,
            hires_upscaler=_UPSCALER_NAMES[hires.upscaler] if hires else None, extra=pass_fields,
        )
        images.append(GeneratedImage(index=index, seed=seed, image=image, infotext=info.render(),
                                     face_passes=face_passes))
        if on_image is not None:
            on_image(images[-1])
        return True

    canceled = False
    if spec is not None:
        if init is None:
            raise ValueError("an img2img / inpaint request needs its decoded input")
        canceled, denoise_ms = passes.run_init(pipe, request, init, first_cond, sdxl, emit, on_progress, cancel)
        timings.update(denoise_ms=denoise_ms, generate_ms=(time.perf_counter() - started) * 1000, batch_size=1.0)
        return GenerationOutcome(images=images, canceled=canceled, final_prompt=prompt,
                                 final_negative_prompt=negative, timings_ms=timings, failed=failed)
    denoise_ms = 0.0
    size = 1 if sampler_spec(request.sampler).seeded_noise else max(1, batch_size)
    seeds = list(enumerate(request.seeds))
    for start in range(0, len(seeds), size):
        batch = seeds[start:start + size]
        if cancel.is_set():
            canceled = True
            break
        t0 = time.perf_counter()
        out = _batch(
            txt2img, img2img, request, first_index=batch[0][0], seeds=[s for _, s in batch], first_cond=first_cond,
            second_cond=second_cond, sdxl=sdxl, base_config=base_config, on_progress=on_progress, cancel=cancel,
        )
        denoise_ms += (time.perf_counter() - t0) * 1000
        if out is None or cancel.is_set():  # interrupted mid-batch: the partial images are dropped
            canceled = True
            break
        if not all(emit(index, seed, image) for (index, seed), image in zip(batch, out, strict=True)):
            canceled = True
            break
    timings["denoise_ms"] = denoise_ms
    timings["generate_ms"] = (time.perf_counter() - started) * 1000
    timings["batch_size"] = float(size)
    return GenerationOutcome(images=images, canceled=canceled, final_prompt=prompt,
                             final_negative_prompt=negative, timings_ms=timings, failed=failed)


def _batch(
    txt2img: DiffusionPipeline,
    img2img: DiffusionPipeline | None,
    request: WorkerRequest,
    *,
    first_index: int,
    seeds: list[int],
    first_cond: ScheduledConditioning,
    second_cond: ScheduledConditioning | None,
    sdxl: bool,
    base_config: Mapping[str, Any],
    on_progress: ProgressCallback | None,
    cancel: threading.Event,
) -> list[Image.Image] | None:
    """One image per seed in one pipeline call, or None when the cancel event stopped them. Progress is
    reported under the batch's first image index."""
    hires = request.hires
    n = len(seeds)
    first = make_scheduler(request.sampler, base_config, seeds[0])
    total = _planned_steps(first, request.steps)
    second = None
    second_steps = 0
    if img2img is not None and hires is not None:
        second = make_scheduler(request.sampler, base_config, seeds[0])
        second_steps = hires_inference_steps(hires.steps or request.steps, hires.denoise)
        total += _planned_steps(second, second_steps, hires.denoise)
    done = 0
    first_total = total - (_planned_steps(second, second_steps, hires.denoise) if second is not None else 0)
    state = {"cond": first_cond, "calls": max(1, first_total), "base": 0}

    def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict) -> dict:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(first_index, min(done, total), total)
        if cancel.is_set():
            pipe._interrupt = True
        cond: ScheduledConditioning = state["cond"]
        if cond.varies:  # prompt editing / alternation: the next sampling step's conditioning
            calls = done - state["base"]
            next_step = calls * cond.steps // state["calls"] + 1
            return {**kwargs, **cond.step_update(next_step, pipe.do_classifier_free_guidance, batch=n)}
        return kwargs

    def run(view: DiffusionPipeline, cond: ScheduledConditioning, **kw: Any) -> Any:
        extra: dict[str, Any] = {}
        if cond.varies:
            extra["callback_on_step_end_tensor_inputs"] = cond.callback_tensors(sdxl)
        return view(**cond.pipeline_kwargs(), guidance_scale=request.cfg_scale, generator=generator,
                    num_images_per_prompt=n, callback_on_step_end=on_step_end, **extra, **kw)

    # the CPU generator gives the same noise on every device, so a seed reproduces across hardware; one
    # generator per image, so image i of a batch draws exactly the noise it draws alone
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    generator: Any = generators[0] if n == 1 else generators
    txt2img.scheduler = first
    latent_upscale = hires is not None and img2img is not None and hires.upscaler == "latent"
    out = run(
        txt2img, first_cond, width=request.width, height=request.height, num_inference_steps=request.steps,
        output_type="latent" if latent_upscale else "pil",
    ).images
    if cancel.is_set():
        return None
    if hires is None:
        return list(out)

    width, height = hires_size(request.width, request.height, hires.scale)
    if latent_upscale:
        factor = txt2img.vae_scale_factor
        upscaled: Any = F.interpolate(out, size=(height // factor, width // factor), mode="bilinear",
                                      align_corners=False)
    else:
        upscaled = [image.resize((width, height), Image.Resampling.LANCZOS) for image in out]
    if img2img is None:  # denoise 0: the upscaled first images are the result
        return list(upscaled)
    img2img.scheduler = second
    assert second_cond is not None
    state.update(cond=second_cond, calls=max(1, total - first_total), base=done)
    images = run(img2img, second_cond, image=upscaled if n > 1 or latent_upscale else upscaled[0],
                 strength=hires.denoise, num_inference_steps=second_steps).images
    return None if cancel.is_set() else list(images)
