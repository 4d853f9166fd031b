"""Requests as A1111, Civitai and ComfyUI clients send them are accepted and mean what their senders meant."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from genserve.engine.infotext import build_infotext
from genserve.engine.schedulers import (
    COMFY_SAMPLERS,
    SAMPLERS,
    canonical_sampler,
    sampler_names,
)
from genserve.generation.protocol import GenerationRequest, Sampler

BASE = {"prompt": "a red fox", "checkpoint": "tiny-sd1"}


def _req(**kw) -> GenerationRequest:
    return GenerationRequest.model_validate({**BASE, **kw})


def test_seed_minus_one_is_random():
    assert _req(seed=-1).seed is None
    assert _req(seed=5).seed == 5


@pytest.mark.parametrize(("body", "sampler"), [
    ({"sampler_name": "Euler a"}, "Euler a"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras"),
    ({"sampler": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras"),
    ({"sampler": "DPM++ 2M SDE", "scheduler": "Automatic"}, "DPM++ 2M SDE"),
    ({"sampler": "DPM++ 2M SDE Karras"}, "DPM++ 2M SDE Karras"),
    ({"sampler": "DPM++ SDE Karras"}, "DPM++ SDE Karras"),
    ({"sampler": "LMS Karras"}, "LMS Karras"),
    ({"sampler": "euler_ancestral", "scheduler": "normal"}, "Euler a"),
    ({"sampler": "dpmpp_2m", "scheduler": "karras"}, "DPM++ 2M Karras"),
    ({"sampler": "dpmpp_3m_sde_gpu", "scheduler": "exponential"}, "DPM++ 3M SDE Exponential"),
    ({"sampler": "dpm_2_ancestral"}, "DPM2 a"),
    ({"sampler": "dpmpp_2m_karras"}, "DPM++ 2M Karras"),
    ({"sampler": "dpm++ 2m karras"}, "DPM++ 2M Karras"),
])
def test_sampler_spellings(body, sampler):
    assert _req(**body).sampler.value == sampler


def test_every_engine_sampler_is_in_the_api_and_every_comfy_name_maps():
    assert [s.value for s in Sampler] == sampler_names()
    for name in sampler_names():
        assert canonical_sampler(name) == name
    for comfy, a1111 in COMFY_SAMPLERS.items():
        assert canonical_sampler(comfy) == a1111 in SAMPLERS
    assert {"DPM2", "DPM2 a", "DPM++ 3M SDE", "PLMS", "Euler Karras", "DPM++ 2M SDE Karras"} <= set(SAMPLERS)


@pytest.mark.parametrize("body", [
    {"sampler": "Euler b"},
    {"sampler": "Euler a", "scheduler": "Karras"},  # no schedule type for an ancestral Euler
    {"sampler": "DPM++ 2M Karras", "scheduler": "Exponential"},
    {"sampler": "DPM++ 2M", "scheduler": "warp"},
    {"sampler": "Euler", "sampler_name": "DDIM"},
    {"hires": {"upscaler": "R-ESRGAN 4x+"}},
])
def test_what_cannot_be_honoured_is_refused(body):
    with pytest.raises(ValidationError):
        _req(**body)


def test_hires_upscaler_takes_a1111_names():
    assert _req(hires={"upscaler": "Latent"}).hires.upscaler == "latent"
    assert _req(hires={"upscaler": "Lanczos"}).hires.upscaler == "lanczos"


def test_infotext_in_place_of_fields_round_trips_genserves_own():
    info = build_infotext(
        prompt="a (red:1.2) fox <lora:style:0.5>", negative_prompt="<gs-safe-neg>, blurry", steps=12,
        sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=5.5, seed=42, width=64, height=96,
        model_hash="0123456789", model_name="tiny-sd1", clip_skip=2, hires_scale=1.5, hires_steps=3,
        hires_denoise=0.4, hires_upscaler="Latent",
    ).render()
    req = GenerationRequest.model_validate({"infotext": info})
    assert req.prompt == "a (red:1.2) fox <lora:style:0.5>" and req.negative_prompt == "<gs-safe-neg>, blurry"
    assert (req.steps, req.sampler.value, req.cfg_scale, req.seed, req.width, req.height, req.clip_skip) == (
        12, "DPM++ 2M Karras", 5.5, 42, 64, 96, 2)
    assert req.checkpoint == "tiny-sd1"
    assert (req.hires.scale, req.hires.denoise, req.hires.steps, req.hires.upscaler) == (1.5, 0.4, 3, "latent")
    # fields given next to it win
    assert GenerationRequest.model_validate({"infotext": info, "seed": 7, "checkpoint": "other"}).seed == 7
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate({"infotext": "a fox\nSteps: many, Sampler: Euler, Seed: 1"})


def test_the_example_catalog_for_real_checkpoints_loads():
    from pathlib import Path

    from genserve.resources.catalog import load_model_catalog

    catalog = load_model_catalog(Path(__file__).resolve().parents[1] / "configs" / "models.example.yaml")
    assert catalog.family("sd1").default_size == (512, 768) and (1024, 1024) in catalog.family("sdxl").allowed_sizes
    assert {c.family for c in catalog.checkpoints} == {"sd1", "sdxl"}
    assert all(c.config for c in catalog.checkpoints if c.format == "safetensors")


def test_sampler_catalog_lists_every_sampler_with_its_parts():
    from genserve.engine.schedulers import sampler_catalog

    rows = {r["name"]: r for r in sampler_catalog()}
    assert list(rows) == sampler_names()
    assert rows["DPM++ 2M Karras"]["sampler"] == "DPM++ 2M" and rows["DPM++ 2M Karras"]["schedule_type"] == "Karras"
    assert rows["DPM++ 2M Karras"]["comfyui"] == {"sampler_name": ["dpmpp_2m"], "scheduler": "karras"}
    assert rows["Euler a"]["schedule_type"] == "Automatic"


def test_aliases_agree_and_the_bodys_sampler_replaces_the_infotexts():
    assert _req(sampler="Euler a", sampler_name="euler_ancestral").sampler.value == "Euler a"
    info = "a fox\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1, Size: 64x64, Model: tiny-sd1"
    assert GenerationRequest.model_validate({"infotext": info, "sampler_name": "Euler"}).sampler.value == "Euler"
    assert GenerationRequest.model_validate({"infotext": info}).sampler.value == "DPM++ 2M Karras"


def test_generate_from_png_sends_the_images_infotext(tmp_path):
    from PIL import Image

    from genserve.cli.generate import _body_from_image
    from genserve.engine.infotext import encode_image

    text = "a (red:1.2) fox <lora:style:0.5>\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, " \
           "Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 64x64, Model: tiny-sd1"
    path = tmp_path / "image.webp"
    path.write_bytes(encode_image(Image.new("RGB", (64, 64)), text, "webp"))
    opts = dict(from_png=path, quantity=2, priority="normal", output_format="jpeg", quality=80, seed=None,
                nsfw_level=None, idempotency_key=None)
    req = GenerationRequest.model_validate(_body_from_image(None, **opts))
    assert (req.prompt, req.seed, req.steps, req.sampler.value, req.quantity, req.output_format) == (
        "a (red:1.2) fox <lora:style:0.5>", 42, 12, "DPM++ 2M Karras", 2, "jpeg")
    assert GenerationRequest.model_validate(_body_from_image("a cat", **{**opts, "seed": 7})).seed == 7


def test_a1111_override_settings_choose_the_vae_and_clip_skip_and_refuse_the_rest_by_name():
    """A1111's API sends the VAE and clip skip as `override_settings`; they mean the request's fields,
    "Automatic"/"None" is the checkpoint's own VAE, and a setting that cannot be honoured is named."""
    req = _req(override_settings={"sd_vae": "kl-f8-anime.safetensors", "CLIP_stop_at_last_layers": 2})
    assert (req.vae, req.clip_skip) == ("kl-f8-anime.safetensors", 2)
    assert _req(override_settings={"sd_vae": "Automatic"}).vae is None
    assert _req(override_settings={"sd_vae": "None"}, vae=None).vae is None
    with pytest.raises(ValidationError, match="sd_model_checkpoint"):
        _req(override_settings={"sd_model_checkpoint": "other.safetensors", "sd_vae": "x"})
    with pytest.raises(ValidationError, match="disagree"):
        _req(clip_skip=1, override_settings={"CLIP_stop_at_last_layers": 2})
