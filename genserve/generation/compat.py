"""What A1111, Civitai and ComfyUI clients send, folded into the `/v1/generations` body before validation.

* `infotext`: A1111's "parameters" text stands in for the fields it names; fields given next to it win.
* `sampler_name` (A1111's name of the field) is `sampler`; `scheduler` (A1111 >= 1.9, ComfyUI) is the
  schedule type that goes with it ("DPM++ 2M" + "Karras" = "DPM++ 2M Karras"); A1111, Civitai and
  ComfyUI spellings of a sampler all become the engine's name (`engine.schedulers.canonical_sampler`).
* `seed: -1` means random, as in A1111 and Civitai's API: the same as leaving `seed` out.
* `override_settings` (A1111's API): `sd_vae` is `vae` ("Automatic" and "None" mean the checkpoint's
  own) and `CLIP_stop_at_last_layers` is `clip_skip`; any other setting is refused by name, since
  silently ignoring it would give another image than the sender expects.
* A1111's img2img API fields: `init_images` (a list of one base64 image), `mask` as a base64 string,
  `denoising_strength`, `resize_mode` 0 / 1 / 2, `inpaint_full_res`, `inpaint_full_res_padding`; the
  workflow follows from them (a mask: inpaint; an image: img2img) unless `workflow` is given.

Anything not recognised is left as it is, so the request model's own validation reports it.
"""

from __future__ import annotations

from typing import Any

from genserve.engine.infotext import request_fields
from genserve.engine.schedulers import UnknownSampler, canonical_sampler

RANDOM_SEED = -1
# A1111's override_settings keys that map onto request fields
_OVERRIDES = {"sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip"}
_CHECKPOINT_OWN_VAE = frozenset({"automatic", "none"})  # A1111's names for "no separate VAE"
# A1111's `resize_mode` numbers (3, "latent upscale", has no counterpart here and is left to validation)
A1111_RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill"}
_A1111_RENAMES = {"denoising_strength": "denoise", "inpaint_full_res": "inpaint_only_masked",
                  "inpaint_full_res_padding": "inpaint_padding"}


def _same_sampler(a: Any, b: Any) -> bool:
    try:
        return canonical_sampler(a) == canonical_sampler(b)
    except (UnknownSampler, AttributeError):
        return a == b


def _fold_overrides(data: dict[str, Any]) -> None:
    overrides = data.pop("override_settings")
    if not isinstance(overrides, dict):
        raise ValueError("override_settings must be an object of A1111 setting names")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"override_settings not supported: {unknown}; supported: {sorted(_OVERRIDES)}")
    for key, field in _OVERRIDES.items():
        if key not in overrides:
            continue
        value = overrides[key]
        if field == "vae" and isinstance(value, str) and value.strip().lower() in _CHECKPOINT_OWN_VAE:
            value = None
        if field in data and data[field] != value:
            raise ValueError(f"{field} and override_settings.{key} disagree")
        data[field] = value


def fold_aliases(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "override_settings" in data:
        _fold_overrides(data)
    if "sampler_name" in data:
        alias = data.pop("sampler_name")
        if "sampler" in data and not _same_sampler(data["sampler"], alias):
            raise ValueError("sampler and sampler_name name different samplers")
        data["sampler"] = alias
    if "infotext" in data:
        text = data.pop("infotext")
        if not isinstance(text, str):
            raise ValueError("infotext must be A1111's parameters text")
        fields = request_fields(text)
        if "sampler" in data or "scheduler" in data:  # the body's sampler replaces the infotext's, whole
            fields.pop("sampler", None)
            fields.pop("scheduler", None)
        data = {**fields, **data}
    schedule = data.pop("scheduler", None)
    sampler = data.get("sampler")
    if isinstance(sampler, str) or schedule is not None:
        if not isinstance(schedule, str | None):
            raise ValueError("scheduler must be a schedule type's name")
        try:
            data["sampler"] = canonical_sampler(sampler if isinstance(sampler, str) else "Euler a", schedule)
        except UnknownSampler as exc:
            if schedule is not None or exc.code != "unknown_sampler":
                raise ValueError(str(exc)) from None
            # an unknown name is left for the enum, whose error lists the known ones
    seed = data.get("seed")
    if type(seed) is int and seed == RANDOM_SEED:
        del data["seed"]
    return _a1111_img2img(data)


def _a1111_img2img(data: dict[str, Any]) -> dict[str, Any]:
    for alias, name in _A1111_RENAMES.items():
        if alias in data:
            if name in data:
                raise ValueError(f"{alias} and {name} name the same field")
            data[name] = data.pop(alias)
    if "init_images" in data:
        images = data.pop("init_images")
        if "init_image" in data or not isinstance(images, list) or len(images) != 1:
            raise ValueError("init_images takes one base64 image (and not beside init_image)")
        data["init_image"] = {"data": images[0]}
    if isinstance(data.get("mask"), str):
        data["mask"] = {"data": data["mask"]}
    mode = data.get("resize_mode")
    if type(mode) is int and mode in A1111_RESIZE_MODES:
        data["resize_mode"] = A1111_RESIZE_MODES[mode]
    if "workflow" not in data and data.get("init_image") is not None:
        data["workflow"] = "inpaint" if data.get("mask") is not None else "img2img"
    return data
