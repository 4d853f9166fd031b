"""A1111 sampler names -> a fresh diffusers scheduler for one image.

Schedulers keep per-run state (step index, solver history, noise sampler), so sharing one between
concurrent requests corrupts both (diffusers' server guide: "IndexError: index 21 is out of bounds").
Every image therefore gets its own instance, built from the checkpoint's scheduler config so the
model's training settings (betas, prediction type, timestep spacing) are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from genserve.core.errors import InvalidRequest


class UnknownSampler(InvalidRequest):
    code = "unknown_sampler"


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_cls: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # the scheduler draws its own noise from a seed rather than from the pipeline's generator
    seeded_noise: bool = False


_KARRAS_OFF = {"use_karras_sigmas": False}
_KARRAS_ON = {"use_karras_sigmas": True}
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec(EulerDiscreteScheduler, _KARRAS_OFF),
    "Euler a": SamplerSpec(EulerAncestralDiscreteScheduler),
    "Heun": SamplerSpec(HeunDiscreteScheduler, _KARRAS_OFF),
    "LMS": SamplerSpec(LMSDiscreteScheduler, _KARRAS_OFF),
    "LMS Karras": SamplerSpec(LMSDiscreteScheduler, _KARRAS_ON),
    "DDIM": SamplerSpec(DDIMScheduler),
    "DPM++ 2M": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP, **_KARRAS_OFF}),
    "DPM++ 2M Karras": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP, **_KARRAS_ON}),
    "DPM++ 2M SDE": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP_SDE, **_KARRAS_OFF}),
    "DPM++ 2M SDE Karras": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP_SDE, **_KARRAS_ON}),
    "DPM++ SDE": SamplerSpec(DPMSolverSDEScheduler, _KARRAS_OFF, seeded_noise=True),
    "DPM++ SDE Karras": SamplerSpec(DPMSolverSDEScheduler, _KARRAS_ON, seeded_noise=True),
    "UniPC": SamplerSpec(UniPCMultistepScheduler, _KARRAS_OFF),
    "LCM": SamplerSpec(LCMScheduler),
}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def sampler_spec(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(
            f"unknown sampler {name!r}", details={"sampler": name, "known": sampler_names()}
        ) from None


def make_scheduler(name: str, base_config: Mapping[str, Any], seed: int | None = None) -> SchedulerMixin:
    """A new scheduler `name` built from a checkpoint's scheduler config; never shared.

    `seed` feeds samplers that draw their own noise (the SDE family's Brownian tree), so that the
    same seed gives the same image with them too.
    """
    spec = sampler_spec(name)
    overrides = dict(spec.overrides)
    if spec.seeded_noise and seed is not None:
        overrides["noise_sampler_seed"] = int(seed)
    return spec.scheduler_cls.from_config(dict(base_config), **overrides)
