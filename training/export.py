"""Export a trained adapter as a kohya-format LoRA, with allow-listed metadata, and prove it loads.

kohya keys are `<prefix>_<module path with '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}`;
the per-module `alpha` tensor is what makes loaders scale by alpha/dim. Without it diffusers,
ComfyUI and A1111 run the LoRA at scale 1.0 (the well-known "alpha lost" bug), so every module gets
one, holding exactly the alpha the adapter was trained with.

The header carries only keys on `ALLOWED_METADATA` — never kohya's `ss_dataset_dirs`,
`ss_tag_frequency` or anything else that would leak the private dataset into a downloadable file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import genserve
from genserve.core.errors import GenserveError

# (family, PEFT prefix) -> kohya prefix
KOHYA_PREFIXES = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}

ALLOWED_METADATA = frozenset({
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_v2",
    "ss_steps",
    "ss_epoch",
    "ss_num_train_images",
    "ss_resolution",
    "ss_training_finished_at",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.trigger_phrase",
    "modelspec.date",
    "genserve.service",
    "genserve.version",
    "genserve.family",
    "genserve.base_model",
    "genserve.trigger_words",
})


class ExportError(GenserveError):
    """The exported file does not reproduce the trained adapter: never deliver it."""

    code = "lora_export_mismatch"
    http_status = 500


@dataclass(frozen=True)
class ExportInfo:
    family: str
    base_model: str
    network_dim: int
    network_alpha: float
    trigger_words: list[str]
    steps: int
    epochs: int
    resolution: int
    num_images: int
    title: str


def kohya_state_dict(adapter: Mapping[str, torch.Tensor], family: str, alpha: float,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """PEFT names (`unet.<path>.lora_A.weight`, ...) -> kohya names, with one `alpha` per module."""
    prefixes = KOHYA_PREFIXES[family]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        owner, rest = key.split(".", 1)
        if owner not in prefixes:
            raise ValueError(f"adapter key {key!r} belongs to no {family} module")
        module, _, kind = rest.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter key {key!r} is not a LoRA A/B weight")
        name = f"{prefixes[owner]}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def export_metadata(info: ExportInfo) -> dict[str, str]:
    """The header: base model, family, dim/alpha, trigger words, steps, resolution, dataset size, service."""
    res = f"{info.resolution}x{info.resolution}"
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION[info.family],
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.network_dim),
        "ss_network_alpha": _number(info.network_alpha),
        "ss_network_args": "null",
        "ss_v2": "False",
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epochs),
        "ss_num_train_images": str(info.num_images),
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_training_finished_at": str(int(dt.datetime.now(dt.timezone.utc).timestamp())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[info.family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.title,
        "modelspec.resolution": res,
        "modelspec.trigger_phrase": ", ".join(info.trigger_words),
        "modelspec.date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "genserve.service": genserve.SERVICE_NAME,
        "genserve.version": genserve.__version__,
        "genserve.family": info.family,
        "genserve.base_model": info.base_model,
        "genserve.trigger_words": json.dumps(info.trigger_words),
    }
    assert set(meta) <= ALLOWED_METADATA
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_lora(path: str | Path, adapter: Mapping[str, torch.Tensor], info: ExportInfo) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = kohya_state_dict(adapter, info.family, info.network_alpha)
    save_file(tensors, path, metadata=export_metadata(info))
    return path


@torch.no_grad()
def _unet_output(pipe, prompt: str, latents: torch.Tensor, timestep: int, family: str) -> torch.Tensor:
    """One UNet evaluation on fixed inputs through the pipeline's own prompt encoding (so text-encoder
    LoRA layers count too)."""
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        h, w = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype),
                                        "time_ids": torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype)}}
    else:
        embeds, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        kwargs = {}
    t = torch.tensor([timestep], device=device)
    return pipe.unet(latents.to(device, dtype), t, embeds.to(dtype), **kwargs).sample.float().cpu()


def verify_export(pipe, path: str | Path, family: str, *, trained_adapter: str = "default",
                  prompt: str = "a photo", resolution: int = 64, rtol: float = 1e-3) -> float:
    """Load the exported file with diffusers' `load_lora_weights` into the pipeline that holds the
    trained adapter and check the UNet output matches the trained adapter's. Returns the relative error.

    The trained adapter is active again afterwards; the exported one stays loaded beside it.
    """
    gen = torch.Generator().manual_seed(0)
    size = resolution // pipe.vae_scale_factor
    latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=gen)
    expected = _unet_output(pipe, prompt, latents, 500, family)

    pipe.load_lora_weights(load_file(str(path)), adapter_name="exported")
    pipe.set_adapters(["exported"])
    actual = _unet_output(pipe, prompt, latents, 500, family)
    pipe.set_adapters([trained_adapter])
    baseline_scale = float(expected.abs().mean())
    error = float((actual - expected).abs().max()) / max(baseline_scale, 1e-12)
    if not torch.isfinite(actual).all() or error > rtol:
        raise ExportError(f"the exported LoRA does not reproduce the trained adapter (relative error {error:.2e})")
    return error
