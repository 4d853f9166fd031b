"""The denoising objective of a training step: the noise added to the latents, the timesteps, what
the UNet must predict, and how each sample's loss is weighted.

The draws take the trainer's checkpointed generator, and the trainer makes them in a fixed order
(noise, its offset, then timesteps), so a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def draw_noise(shape: torch.Size, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise for latents of `shape`, plus `offset` times one draw per image and channel.

    The offset (kohya's noise_offset) shifts a whole channel at once, which plain per-pixel noise
    almost never does; without it a model struggles to make images much darker or brighter than average.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def draw_timesteps(scheduler: DDPMScheduler, count: int, generator: torch.Generator) -> torch.Tensor:
    """One training timestep per image, uniform over the scheduler's range."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)


def is_v_prediction(scheduler: DDPMScheduler) -> bool:
    return scheduler.config.prediction_type == "v_prediction"


def prediction_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output: the noise itself, or the velocity for v-prediction models."""
    if is_v_prediction(scheduler):
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, *,
                    v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weights: timesteps with little noise (high SNR) are weighted down so they stop
    dominating the gradient. Each weight brings the loss to min(SNR, γ) times the loss on the clean
    latents; the noise target's loss is SNR times that, the velocity target's SNR + 1 times.
    """
    ac = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = ac / (1 - ac)
    if v_prediction:
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def denoising_loss(scheduler: DDPMScheduler, alphas_cumprod: torch.Tensor, pred: torch.Tensor,
                   latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   min_snr_gamma: float) -> torch.Tensor:
    """Mean squared error against the prediction target, per image in float32, min-SNR weighted when
    `min_snr_gamma` > 0, averaged over the batch."""
    target = prediction_target(scheduler, latents, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        loss = loss * min_snr_weights(alphas_cumprod, timesteps, min_snr_gamma,
                                      v_prediction=is_v_prediction(scheduler))
    return loss.mean()
