"""The optimizer and learning-rate schedule of a run, as the resolved parameters name them.

The optional optimizers' packages are imported only when chosen: they may be absent, and the parameter
resolver has already refused a job whose optimizer is not installed here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler

from training.params import ResolvedParams


def param_groups(unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
                 params: ResolvedParams) -> list[dict[str, Any]]:
    """The trainable (LoRA) parameters: the UNet's at `unet_lr`, the text encoders' at `text_encoder_lr`."""
    groups = [{"params": [q for q in unet.parameters() if q.requires_grad], "lr": params.unet_lr}]
    if params.train_text_encoder:
        te_params = [q for te in text_encoders for q in te.parameters() if q.requires_grad]
        groups.append({"params": te_params, "lr": params.text_encoder_lr})
    return groups


def build_optimizer(groups: list[dict[str, Any]], params: ResolvedParams) -> torch.optim.Optimizer:
    """The named optimizer over `groups`, each with its fixed weight decay (and Prodigy's own settings)."""
    if params.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=0.1)
    if params.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, weight_decay=0.5, decouple=True, betas=(0.9, 0.99), use_bias_correction=False)
    if params.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # kohya's recommended Adafactor for LoRA: the given learning rates, no relative step
        return Adafactor(groups, lr=params.unet_lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=0.0)
    return torch.optim.AdamW(groups, weight_decay=1e-2)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, params: ResolvedParams, total_steps: int) -> Any:
    """diffusers' named schedule over the whole run, with warm-up (ignored by `constant`); cycles for
    cosine_with_restarts, power for polynomial."""
    extra: dict[str, Any] = {}
    if params.lr_scheduler == "cosine_with_restarts":
        extra["num_cycles"] = params.lr_scheduler_num_cycles
    elif params.lr_scheduler == "polynomial":
        extra["power"] = params.lr_scheduler_power
    return get_scheduler(params.lr_scheduler, optimizer=optimizer, num_warmup_steps=params.lr_warmup_steps,
                         num_training_steps=total_steps, **extra)
