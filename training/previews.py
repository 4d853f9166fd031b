"""Preview images rendered after an epoch with the adapter as trained so far.

With safety embeddings, previews go through the generator's safety path: the mandatory negative
embeddings are injected into every prompt, with the minor-protection embedding always on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from PIL import Image

from safety.embeddings import SafetyEmbeddings
from training.config import SampleSettings
from training.latents import vae_sample


def preview_prompts(captions: list[str], count: int, safety: SafetyEmbeddings | None,
                    negative: str = "") -> tuple[list[str], list[str] | None]:
    """`count` prompts (the captions given, the last repeated to fill) and their negative prompts
    (`negative`, after the mandatory safety embeddings)."""
    prompts = captions + [captions[-1]] * (count - len(captions))
    if safety is None:
        return prompts, ([negative] * len(prompts) if negative else None)
    pairs = [safety.inject(prompt=p, negative_prompt=negative, mature=True) for p in prompts]
    return [p for p, _ in pairs], [n for _, n in pairs]


@torch.no_grad()
def render_previews(pipe: Any, vae: Any, prompts: list[str], negatives: list[str] | None,
                    settings: SampleSettings, *, resolution: int, seed: int,
                    autocast: Callable[[], AbstractContextManager], width: int | None = None,
                    height: int | None = None) -> list[Image.Image]:
    """One image per prompt (square at `resolution` unless `width`/`height`) from `seed`, denoised by
    `pipe` and decoded by `vae`."""
    generator = torch.Generator().manual_seed(seed)
    with autocast():
        latents = pipe(prompt=prompts, negative_prompt=negatives, num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance_scale, height=height or resolution, width=width or resolution,
                       generator=generator, output_type="latent").images
    # decoded here by the full-precision VAE the trainer keeps (the pipeline's own decode assumes
    # the VAE has the UNet's half precision)
    pixels = vae.decode(vae_sample(latents.to(torch.float32), vae.config)).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")
