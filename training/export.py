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
import re
from collections.abc import Callable, Mapping
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
    network_type: str = "lora"  # lora | locon | dora
    conv_dim: int = 0
    conv_alpha: float = 0.0

    def alpha_for(self, module: str) -> float:
        """The alpha a module was trained with: LoCon's 3x3 convs have their own."""
        from training.adapters import UNET_CONV3X3

        if self.conv_dim and module.startswith("unet.") and re.search(rf"\.{UNET_CONV3X3}$", module):
            return self.conv_alpha
        return self.network_alpha

    def network_args(self) -> dict[str, str]:
        args = {}
        if self.conv_dim:
            args.update(conv_dim=str(self.conv_dim), conv_alpha=_number(self.conv_alpha))
        if self.network_type == "dora":
            args["dora_wd"] = "True"
        return args


def kohya_state_dict(adapter: Mapping[str, torch.Tensor], family: str, alpha: float,
                     dtype: torch.dtype = torch.float32,
                     alpha_for: Callable[[str], float] | None = None) -> dict[str, torch.Tensor]:
    """PEFT names (`unet.<path>.lora_A.weight`, ...) -> kohya names, with one `alpha` per module
    (`alpha_for(PEFT module path)` where modules differ, as LoCon's conv layers do), and a DoRA
    magnitude as LyCORIS's `dora_scale` ([out, 1] for a linear layer, [out, 1, 1, 1] for a conv)."""
    prefixes = KOHYA_PREFIXES[family]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        owner, rest = key.split(".", 1)
        if owner not in prefixes:
            raise ValueError(f"adapter key {key!r} belongs to no {family} module")
        if rest.endswith(".lora_magnitude_vector"):
            module = rest[: -len(".lora_magnitude_vector")]
            name = f"{prefixes[owner]}_{module.replace('.', '_')}"
            flat = tensor.reshape(-1)
            shape = (flat.numel(), 1, 1, 1) if tensor.dim() == 4 else (flat.numel(), 1)
            out[f"{name}.dora_scale"] = flat.reshape(shape).to(dtype).contiguous()
            continue
        module, _, kind = rest.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter key {key!r} is not a LoRA A/B weight")
        name = f"{prefixes[owner]}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor.to(dtype).contiguous()
        value = alpha_for(f"{owner}.{module}") if alpha_for is not None else alpha
        out[f"{name}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    return out


def export_metadata(info: ExportInfo) -> dict[str, str]:
    """The header: base model, family, dim/alpha, trigger words, steps, resolution, dataset size, service."""
    res = f"{info.resolution}x{info.resolution}"
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION[info.family],
        "ss_network_module": "lycoris.kohya" if info.network_type == "dora" else "networks.lora",
        "ss_network_dim": str(info.network_dim),
        "ss_network_alpha": _number(info.network_alpha),
        "ss_network_args": json.dumps(info.network_args()) if info.network_args() else "null",
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
    tensors = kohya_state_dict(adapter, info.family, info.network_alpha, alpha_for=info.alpha_for)
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

    tensors = load_file(str(path))
    if any(k.endswith(".dora_scale") for k in tensors):
        load_kohya_with_peft(pipe, tensors, family, "exported")  # diffusers drops kohya's dora_scale
    else:
        pipe.load_lora_weights(tensors, adapter_name="exported")
    pipe.set_adapters(["exported"])
    actual = _unet_output(pipe, prompt, latents, 500, family)
    pipe.set_adapters([trained_adapter])
    baseline_scale = float(expected.abs().mean())
    error = float((actual - expected).abs().max()) / max(baseline_scale, 1e-12)
    if not torch.isfinite(actual).all() or error > rtol:
        raise ExportError(f"the exported LoRA does not reproduce the trained adapter (relative error {error:.2e})")
    return error


def load_kohya_with_peft(pipe, tensors: Mapping[str, torch.Tensor], family: str, adapter_name: str) -> None:  # noqa: ANN001
    """Load a kohya-format LoRA / LoCon / DoRA file into `pipe` as PEFT adapter `adapter_name`.

    diffusers' SD loaders drop LyCORIS's `dora_scale`; this reads every module's down/up/alpha and
    DoRA magnitude by matching kohya names against the models' own module paths (no guessing at
    where the '_' of a name were '.'), and sets them with PEFT."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    by_prefix = {kohya: owner for owner, kohya in KOHYA_PREFIXES[family].items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        grouped.setdefault(name, {})[kind] = tensor
    per_owner: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, parts in grouped.items():
        prefix = next((p for p in sorted(by_prefix, key=len, reverse=True) if name.startswith(p + "_")), None)
        if prefix is None:
            raise ExportError(f"LoRA key {name!r} belongs to no {family} module")
        per_owner.setdefault(by_prefix[prefix], {})[name[len(prefix) + 1 :]] = parts
    for owner, modules in per_owner.items():
        model = getattr(pipe, owner)
        paths = {n.replace(".", "_"): n for n, _ in model.named_modules() if n}
        state: dict[str, torch.Tensor] = {}
        ranks, alphas, dora = {}, {}, False
        for flat, parts in modules.items():
            path = paths.get(flat)
            if path is None or "lora_down.weight" not in parts:
                raise ExportError(f"LoRA module {flat!r} is not in the {owner}")
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            ranks[path], alphas[path] = down.shape[0], float(parts.get("alpha", torch.tensor(down.shape[0])).item())
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = down, up
            if "dora_scale" in parts:
                dora = True
                scale = parts["dora_scale"].reshape(-1)
                state[f"{path}.lora_magnitude_vector"] = scale.reshape(1, -1, 1, 1) if down.dim() == 4 else scale
        first = next(iter(ranks))
        config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=list(ranks), use_dora=dora,
                            rank_pattern={re.escape(p): r for p, r in ranks.items()},
                            alpha_pattern={re.escape(p): a for p, a in alphas.items()})
        model.add_adapter(config, adapter_name=adapter_name)
        loaded = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        if getattr(loaded, "unexpected_keys", None):
            raise ExportError(f"LoRA keys not loaded into the {owner}: {loaded.unexpected_keys[:3]}")
