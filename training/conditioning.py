"""What the UNet is conditioned on besides the noisy latents, per model family.

SD1 takes the last hidden state of its one CLIP text encoder. SDXL takes the penultimate hidden
states of both encoders side by side, plus the second encoder's pooled embedding and six
"micro-conditioning" numbers describing how the training image was resized and cropped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from training.buckets import Bucket


def encode_prompts(captions: list[str], tokenizers: list[Any], text_encoders: list[Any], device: torch.device,
                   *, sdxl: bool, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, SDXL pooled embedding); with gradients when the encoders train."""
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        ids = [
            tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids.to(device)
            for tok in tokenizers
        ]
        if not sdxl:
            return text_encoders[0](ids[0])[0], None
        out1 = text_encoders[0](ids[0], output_hidden_states=True)
        out2 = text_encoders[1](ids[1], output_hidden_states=True)
        embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return embeds, out2.text_embeds


def sdxl_time_ids(width: int, height: int, bucket: Bucket) -> list[int]:
    """SDXL micro-conditioning (original h, w, crop top, left, target h, w), as `fit_to_bucket` crops."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    return [height, width, (rh - bh) // 2, (rw - bw) // 2, bh, bw]


def sdxl_added_conditioning(pooled: torch.Tensor, time_ids: list[list[int]], device: torch.device,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for a batch: pooled text embedding and one row of time ids per image."""
    return {
        "text_embeds": pooled.to(dtype),
        "time_ids": torch.tensor(time_ids, device=device, dtype=dtype),
    }
