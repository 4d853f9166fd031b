"""A1111 sampler names -> a fresh diffusers scheduler for one image; the one sampler list the API exposes.

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
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
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
    base: str = ""  # A1111's sampler without the schedule type
    schedule: str | None = None  # A1111's "Schedule type" (None: the sampler's own)


_PLAIN = {"use_karras_sigmas": False}
# A1111's "Schedule type" (>= 1.9; before, part of the sampler's name) -> the scheduler's sigma options
SCHEDULE_TYPES: dict[str, Mapping[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_karras_sigmas": False, "use_exponential_sigmas": True},
}
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_DPMPP_3M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}

# A1111 sampler -> (scheduler, overrides, draws its own seeded noise, takes a schedule type)
_BASES: dict[str, tuple[type[SchedulerMixin], Mapping[str, Any], bool, bool]] = {
    "Euler": (EulerDiscreteScheduler, _PLAIN, False, True),
    "Euler a": (EulerAncestralDiscreteScheduler, {}, False, False),
    "Heun": (HeunDiscreteScheduler, _PLAIN, False, True),
    "LMS": (LMSDiscreteScheduler, _PLAIN, False, True),
    "DPM2": (KDPM2DiscreteScheduler, _PLAIN, False, True),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, _PLAIN, False, True),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {**_DPMPP, **_PLAIN}, False, True),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {**_DPMPP_SDE, **_PLAIN}, False, True),
    "DPM++ 3M SDE": (DPMSolverMultistepScheduler, {**_DPMPP_3M_SDE, **_PLAIN}, False, True),
    "DPM++ SDE": (DPMSolverSDEScheduler, _PLAIN, True, True),
    "DDIM": (DDIMScheduler, {}, False, False),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}, False, False),
    "UniPC": (UniPCMultistepScheduler, _PLAIN, False, True),
    "LCM": (LCMScheduler, {}, False, False),
}


def _build() -> dict[str, SamplerSpec]:
    out: dict[str, SamplerSpec] = {}
    for name, (cls, overrides, seeded, schedules) in _BASES.items():
        out[name] = SamplerSpec(cls, overrides, seeded, base=name)
        if schedules:
            for schedule, sigmas in SCHEDULE_TYPES.items():
                out[f"{name} {schedule}"] = SamplerSpec(cls, {**overrides, **sigmas}, seeded, base=name,
                                                        schedule=schedule)
    return out


# Every A1111 sampler diffusers can express, under A1111's (and Civitai's) names. Not expressible:
# "DPM++ 2S a" (no ancestral single-step solver), "DPM fast", "DPM adaptive", "Restart".
SAMPLERS: dict[str, SamplerSpec] = _build()

# ComfyUI's KSampler names (`sampler_name` / `scheduler` inputs)
COMFY_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "lms": "LMS", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE", "ddim": "DDIM", "uni_pc": "UniPC",
    "uni_pc_bh2": "UniPC", "lcm": "LCM",
}
# schedule names meaning "the sampler's own" (A1111 "Automatic", ComfyUI "normal"/"simple")
DEFAULT_SCHEDULES = {"automatic", "normal", "simple", "uniform", ""}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


_BY_KEY = {_key(n): n for n in SAMPLERS} | {_key(n.replace("++", "pp")): n for n in SAMPLERS}
_COMFY_BY_KEY = {_key(k): v for k, v in COMFY_SAMPLERS.items()}
_SCHEDULES_BY_KEY = {_key(k): k for k in SCHEDULE_TYPES}


def canonical_sampler(name: str, schedule: str | None = None) -> str:
    """The engine's name for a sampler as A1111, Civitai or ComfyUI spell it, with an optional separate
    schedule type (A1111 >= 1.9 `scheduler`, ComfyUI `scheduler`): "DPM++ 2M" + "Karras", "dpmpp_2m" +
    "karras", "DPM++ 2M Karras" and "dpmpp_2m_karras" are all "DPM++ 2M Karras". Case and `_` vs space
    do not matter. Raises `UnknownSampler`."""
    key = _key(name)
    base = _BY_KEY.get(key) or _COMFY_BY_KEY.get(key)
    if base is None:
        raise UnknownSampler(f"unknown sampler {name!r}", details={"sampler": name, "known": sampler_names()})
    sched_key = _key(schedule or "")
    if sched_key in DEFAULT_SCHEDULES:
        return base
    sched = _SCHEDULES_BY_KEY.get(sched_key)
    if sched is None:
        raise UnknownSampler(f"unknown schedule type {schedule!r}", code="unknown_schedule_type",
                             details={"scheduler": schedule, "known": ["Automatic", *SCHEDULE_TYPES]})
    spec = SAMPLERS[base]
    if spec.schedule not in (None, sched):
        raise UnknownSampler(f"{base} already names the {spec.schedule} schedule, not {sched}",
                             code="sampler_schedule_conflict", details={"sampler": name, "scheduler": schedule})
    combined = f"{spec.base} {sched}"
    if combined not in SAMPLERS:
        raise UnknownSampler(f"{spec.base} takes no schedule type", code="unknown_schedule_type",
                             details={"sampler": name, "scheduler": schedule})
    return combined


def sampler_catalog() -> list[dict[str, Any]]:
    """`GET /v1/samplers`: every sampler the API accepts, with its A1111 parts and its ComfyUI names."""
    comfy: dict[str, list[str]] = {}
    for cname, base in COMFY_SAMPLERS.items():
        comfy.setdefault(base, []).append(cname)
    comfy_schedule = {None: "normal", "Karras": "karras", "Exponential": "exponential"}
    return [{"name": name, "sampler": spec.base, "schedule_type": spec.schedule or "Automatic",
             "comfyui": {"sampler_name": comfy.get(spec.base, []), "scheduler": comfy_schedule[spec.schedule]}}
            for name, spec in SAMPLERS.items()]


def sampler_spec(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(
            f"unknown sampler {name!r}", details={"sampler": name, "known": sampler_names()}
        ) from None


def infotext_sampler(name: str) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them in infotext."""
    spec = sampler_spec(name)
    return spec.base, spec.schedule


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
