"""Random LoRAs shaped for the tiny test pipelines, in kohya or diffusers/PEFT key layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linears(module: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Target projections by their base names (a module already holding adapters wraps them)."""
    out = []
    for name, m in module.named_modules():
        # transformers 5 flattened CLIPTextModel but not CLIPTextModelWithProjection: name both alike
        name = name.removesuffix(".base_layer").removeprefix("text_model.")
        if isinstance(m, torch.nn.Linear) and name.endswith(targets):
            out.append((name, m.out_features, m.in_features))
    return out


def make_lora(pipe, *, seed: int, fmt: str = "kohya", rank: int = 4, scale: float = 0.5,
              text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA touching every attention projection of the UNet (and of the text encoders)."""
    g = torch.Generator().manual_seed(seed)
    parts = [("unet", _linears(pipe.unet, _UNET_TARGETS))]
    if text_encoder:
        parts.append(("text_encoder", _linears(pipe.text_encoder, _TE_TARGETS)))
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(("text_encoder_2", _linears(pipe.text_encoder_2, _TE_TARGETS)))
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_" if sdxl else "lora_te_text_model_",
                    "text_encoder_2": "lora_te2_text_model_"}
    out: dict[str, torch.Tensor] = {}
    for component, linears in parts:
        for path, n_out, n_in in linears:
            down = torch.randn(rank, n_in, generator=g) * scale
            up = torch.randn(n_out, rank, generator=g) * scale
            if fmt == "kohya":
                key = kohya_prefix[component] + path.replace(".", "_")
                out[f"{key}.lora_down.weight"] = down
                out[f"{key}.lora_up.weight"] = up
                out[f"{key}.alpha"] = torch.tensor(float(rank))
            else:
                middle = "text_model." if component != "unet" else ""
                out[f"{component}.{middle}{path}.lora_A.weight"] = down
                out[f"{component}.{middle}{path}.lora_B.weight"] = up
    return out


def write_lora(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata=metadata or {"format": "pt"})
    return path
