"""Dataset images as the latents the UNet trains on.

Pixels are fitted to their bucket and encoded by the VAE in float32; a step draws a sample of each
image's latent distribution, so caching the distribution (mean, std) gives exactly the numbers that
encoding every step would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.buckets import Bucket, fit_to_bucket


def bucket_pixels(path: Path, bucket: Bucket) -> torch.Tensor:
    """The image's pixels in [-1, 1], channels first, fitted to `bucket`."""
    with Image.open(path) as img:
        fitted = fit_to_bucket(img.convert("RGB"), bucket)
    arr = np.asarray(fitted.image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def vae_latents(sample: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """A VAE latent sample in the scaled space the UNet works in."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (sample - shift) * vae_config.scaling_factor


def vae_sample(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """UNet-space latents back in the VAE's own space (the inverse of `vae_latents`)."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift
