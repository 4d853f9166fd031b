"""Training parameters: what a user may ask for, checked against the limits and completed with defaults.

`TrainingRequest` is the user-facing shape (every field optional, kohya/Civitai names);
`resolve()` turns it into `ResolvedParams`, the one concrete set the trainer, the quote and the
stored job all use, so what is billed is exactly what runs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genserve.core.errors import InvalidRequest
from training.config import TrainingLimits

Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
NetworkType = Literal["lora", "locon", "dora"]

# optimizer -> (the module that must be importable for it, the extra that installs it)
OPTIONAL_OPTIMIZERS = {"adamw8bit": ("bitsandbytes", "train"), "prodigy": ("prodigyopt", "train")}
MAX_SAMPLE_PROMPTS = 8
TRIGGER_RE = re.compile(r"^[\w\- .'<>:]+$", re.UNICODE)


class TrainingRequest(BaseModel):
    """Parameters a submitter may set; None means the configured default."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1)
    # kohya's max_train_steps / ai-toolkit's steps: whole epochs covering at least this many steps
    # (when `epochs` is not given; as in kohya, epochs win)
    max_train_steps: int | None = Field(None, ge=1)
    repeats: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    resolution: int | None = Field(None, ge=1)
    enable_bucket: bool | None = None
    unet_lr: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, ge=0)
    lr_scheduler: Scheduler | None = None
    lr_scheduler_num_cycles: int | None = Field(None, ge=1, le=8)
    lr_warmup_steps: int | None = Field(None, ge=0)
    lr_scheduler_power: float | None = Field(None, gt=0, le=10)
    optimizer: Optimizer | None = None
    network_type: NetworkType | None = None
    network_dim: int | None = Field(None, ge=1)
    network_alpha: float | None = Field(None, gt=0)
    conv_dim: int | None = Field(None, ge=1)
    conv_alpha: float | None = Field(None, gt=0)
    noise_offset: float | None = Field(None, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, ge=0, le=20)
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)
    caption_dropout_rate: float | None = Field(None, ge=0, le=1)
    gradient_checkpointing: bool | None = None
    mixed_precision: MixedPrecision | None = None
    cache_latents: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    sample_prompts: list[str] | None = Field(None, max_length=MAX_SAMPLE_PROMPTS)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    save_every_n_epochs: int | None = Field(None, ge=1)


class ResolvedParams(BaseModel):
    """Every knob with its concrete value; stored with the job and handed to the trainer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    epochs: int
    repeats: int
    batch_size: int
    resolution: int
    enable_bucket: bool
    bucket_step: int
    unet_lr: float
    text_encoder_lr: float
    lr_scheduler: Scheduler
    lr_scheduler_num_cycles: int
    lr_warmup_steps: int
    optimizer: Optimizer
    network_dim: int
    network_alpha: float
    noise_offset: float
    min_snr_gamma: float
    shuffle_caption: bool
    keep_tokens: int
    caption_dropout_rate: float
    gradient_checkpointing: bool
    mixed_precision: MixedPrecision
    cache_latents: bool
    seed: int
    # added later: defaults keep the parameters stored with older jobs valid
    lr_scheduler_power: float = 1.0
    network_type: NetworkType = "lora"
    conv_dim: int = 0  # 0: no conv-layer adapters (LoCon uses network_dim when not given)
    conv_alpha: float = 0.0
    sample_prompts: tuple[str, ...] = ()  # kohya sample-prompt lines; empty: previews from the captions
    sample_every_n_epochs: int = 1
    save_every_n_epochs: int = 1

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_lr > 0


def _invalid(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_training_params", details={"field": field})


def parse_request(data: dict) -> TrainingRequest:
    try:
        return TrainingRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        raise InvalidRequest("invalid training parameters", code="invalid_training_params",
                             details={"errors": errors}) from exc


def check_trigger_words(words: list[str], limits: TrainingLimits) -> list[str]:
    """Trigger words are plain short phrases: they end up in prompts and in the file's metadata."""
    lim = limits.limits
    cleaned = [" ".join(w.split()) for w in words if w and w.strip()]
    if len(cleaned) > lim.max_trigger_words:
        raise _invalid(f"at most {lim.max_trigger_words} trigger words", "trigger_words")
    for word in cleaned:
        if len(word) > lim.max_trigger_chars or not TRIGGER_RE.match(word) or "," in word:
            raise _invalid(f"trigger word {word!r} must be a short phrase of letters, digits and - . ' < > :",
                           "trigger_words")
    return cleaned


def resolve(request: TrainingRequest, family: str, limits: TrainingLimits, num_images: int,
            *, default_seed: int) -> ResolvedParams:
    """Fill defaults and enforce the limits; raises `InvalidRequest` (code `invalid_training_params`)."""
    if family not in limits.base_models:
        raise InvalidRequest(f"unknown model family {family!r}; expected one of {sorted(limits.base_models)}",
                             code="unknown_family")
    d, lim = limits.defaults, limits.limits
    values = {k: v for k, v in request.model_dump(exclude={"max_train_steps"}).items() if v is not None}
    merged = {**d.model_dump(exclude={"target_images_per_epoch"}), **values}
    merged.setdefault("resolution", limits.base_models[family].resolution)
    merged.setdefault("repeats", min(max(math.ceil(d.target_images_per_epoch / max(num_images, 1)), 1), lim.max_repeats))
    merged.setdefault("seed", default_seed)

    checks = [
        ("epochs", merged["epochs"] <= lim.max_epochs, f"at most {lim.max_epochs}"),
        ("repeats", merged["repeats"] <= lim.max_repeats, f"at most {lim.max_repeats}"),
        ("batch_size", merged["batch_size"] <= lim.max_batch_size, f"at most {lim.max_batch_size}"),
        ("resolution", lim.min_resolution <= merged["resolution"] <= lim.max_resolution
         and merged["resolution"] % lim.bucket_step == 0,
         f"{lim.min_resolution}..{lim.max_resolution} in steps of {lim.bucket_step}"),
        ("network_dim", merged["network_dim"] <= lim.max_network_dim, f"at most {lim.max_network_dim}"),
        ("network_alpha", merged["network_alpha"] <= lim.max_network_alpha, f"at most {lim.max_network_alpha}"),
        ("unet_lr", merged["unet_lr"] <= lim.max_lr, f"at most {lim.max_lr}"),
        ("text_encoder_lr", merged["text_encoder_lr"] <= lim.max_lr, f"at most {lim.max_lr}"),
        ("keep_tokens", merged["keep_tokens"] <= lim.max_keep_tokens, f"at most {lim.max_keep_tokens}"),
    ]
    for field, ok, rule in checks:
        if not ok:
            raise _invalid(f"{field}={merged[field]} is out of range ({rule})", field)
    if merged.get("network_type") == "locon" or (merged.get("conv_dim") and "network_type" not in merged):
        merged["network_type"] = "locon"
        merged.setdefault("conv_dim", merged["network_dim"])
        merged.setdefault("conv_alpha", merged["network_alpha"])
    elif merged.get("conv_dim") or merged.get("conv_alpha"):
        raise _invalid(f"conv_dim/conv_alpha need network_type locon, not {merged.get('network_type')}", "conv_dim")
    if merged.get("conv_dim", 0) > lim.max_network_dim:
        raise _invalid(f"conv_dim={merged['conv_dim']} is out of range (at most {lim.max_network_dim})", "conv_dim")
    if merged.get("conv_alpha", 0) > lim.max_network_alpha:
        raise _invalid(f"conv_alpha={merged['conv_alpha']} is out of range (at most {lim.max_network_alpha})",
                       "conv_alpha")
    if merged.get("sample_prompts"):
        from training.sample_prompts import parse_line, parse_sample_prompts

        parse_sample_prompts(merged["sample_prompts"], limits, merged["resolution"])  # refuses bad lines
        merged["sample_prompts"] = tuple(line.strip() for entry in merged["sample_prompts"]
                                         for line in str(entry).splitlines() if parse_line(line) is not None)
    check_optimizer(merged["optimizer"])
    return ResolvedParams(family=family, bucket_step=lim.bucket_step, **merged)


@functools.cache
def optimizer_problem(name: str) -> str | None:
    """Why `name` cannot run in this process (None when it can): its package is missing or unusable.

    bitsandbytes is probed with one real 8-bit step (on CUDA when this process has a GPU): a wheel that
    imports but has no kernel for this machine is refused at submit time, not in the middle of a paid job."""
    entry = OPTIONAL_OPTIMIZERS.get(name)
    if entry is None:
        return None
    module, extra = entry
    if importlib.util.find_spec(module) is None:
        return f"optimizer {name} needs {module} (install genserve[{extra}]), which is not installed here"
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"  # where this process would train
            weight = torch.nn.Parameter(torch.ones(64, 64, device=device))  # >= 4096 values: 8-bit state
            opt = bnb.optim.AdamW8bit([weight], lr=1e-3)
            weight.grad = torch.ones_like(weight)
            opt.step()
            if not torch.isfinite(weight).all():
                raise RuntimeError("non-finite result")
        except Exception as exc:  # noqa: BLE001 - any failure means it cannot train here
            return f"optimizer {name}: bitsandbytes cannot run on this machine ({type(exc).__name__}: {exc})"[:500]
    return None


def check_optimizer(name: str) -> None:
    """Refuse (code `optimizer_unavailable`, naming the extra) an optimizer this deployment cannot run."""
    problem = optimizer_problem(name)
    if problem:
        module, extra = OPTIONAL_OPTIMIZERS[name]
        raise InvalidRequest(problem, code="optimizer_unavailable",
                             details={"field": "optimizer", "package": module, "extra": extra})
