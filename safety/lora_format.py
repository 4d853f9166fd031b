"""Read a LoRA state dict of any common layout into canonical modules: (name, up, down, alpha).

Layouts understood (see the kohya/diffusers/PEFT notes):
  kohya      `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale = alpha/rank)
  diffusers  `unet.<path>.lora.down.weight` / `.lora.up.weight`, older `...processor.to_q_lora.down.weight`
             and text-encoder `...q_proj.lora_linear_layer.down.weight`
  PEFT       `[base_model.model.]<path>.lora_A[.adapter].weight` / `.lora_B...` (alpha from the
             `lora_adapter_metadata` header, else alpha = rank)
Every layout maps to one canonical module name `<role>.<path with _>` (role unet / te1 / te2 / ...), so
the same weights under another layout land on the same module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from safety.errors import SafetyError


class LoraFormatError(SafetyError):
    """The state dict holds LoRA keys that do not form consistent (up, down) pairs."""

    code = "lora_format_invalid"


_KEY = re.compile(
    r"^(?P<module>.+?)(?:"
    r"\.lora_(?P<kohya>down|up)\.weight"
    r"|\.lora_(?P<peft>A|B)(?:\.[^.]+)?\.weight"
    r"|\.lora(?:_linear_layer)?\.(?P<diffusers>down|up)\.weight"
    r"|_lora\.(?P<processor>down|up)\.weight"
    r"|\.(?P<alpha>alpha)"
    r")$"
)

# Leading parts of a module path -> role. Checked in order; the first match wins.
_ROLE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("transformer.", "transformer"),
    ("diffusion_model.", "unet"),
)
# PEFT models saved without a role prefix: recognise the text encoder by its own module names.
_TEXT_ENCODER_ROOTS = ("text_model.", "encoder.layers.")


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: ΔW = scale · up @ down, with scale = alpha / rank (1 when alpha is absent)."""

    name: str
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def up_matrix(self) -> torch.Tensor:
        return self.up.reshape(self.up.shape[0], -1)

    def down_matrix(self) -> torch.Tensor:
        return self.down.reshape(self.down.shape[0], -1)

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Input size of the flattened ΔW (in·kh·kw for a convolution)."""
        return int(self.down_matrix().shape[1])


def canonical_module_name(path: str) -> str:
    """`<role>.<path with _>` for a module path in any layout (without the lora suffix)."""
    path = path.removeprefix("base_model.model.")
    role = None
    for prefix, r in _ROLE_PREFIXES:
        if path.startswith(prefix):
            role, path = r, path[len(prefix) :]
            break
    if role is None:
        role = "te1" if path.startswith(_TEXT_ENCODER_ROOTS) else "unet"
    flat = path.replace(".processor.", ".").replace(".", "_").removeprefix("text_model_")
    if flat.endswith("_to_out"):  # attention-processor layout names the output projection `to_out_lora`
        flat += "_0"
    return f"{role}.{flat}"


def _adapter_alphas(metadata: Mapping[str, str] | None) -> dict[str, float]:
    """Per-role `lora_alpha / r`-style alpha from diffusers' `lora_adapter_metadata` header, if present."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"lora_adapter_metadata is not JSON: {exc}") from exc
    configs = {"": data} if "lora_alpha" in data else {
        k.removesuffix("_lora_adapter_metadata"): v for k, v in data.items() if isinstance(v, dict)
    }
    roles = {"": "*", "unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2", "transformer": "transformer"}
    return {roles.get(k, k): float(v["lora_alpha"]) for k, v in configs.items() if "lora_alpha" in v}


def read_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, LoraModule]:
    """Canonical modules of a LoRA state dict. Keys that are not LoRA weights (DoRA magnitudes,
    embeddings, ...) are left out; a half pair or mismatched ranks raise LoraFormatError."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    raw_names: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            continue
        slot = "alpha" if m["alpha"] else (
            "down" if (m["kohya"] or m["diffusers"] or m["processor"]) == "down" or m["peft"] == "A" else "up"
        )
        name = canonical_module_name(m["module"])
        seen = raw_names.setdefault(name, m["module"])
        if seen != m["module"] or slot in parts.get(name, {}):
            raise LoraFormatError(f"two keys name the same module {name!r}: {seen!r} and {m['module']!r}")
        parts.setdefault(name, {})[slot] = tensor

    header_alphas = _adapter_alphas(metadata)
    modules: dict[str, LoraModule] = {}
    for name, p in parts.items():
        if "up" not in p and "down" not in p:
            continue  # a stray alpha
        if "up" not in p or "down" not in p:
            raise LoraFormatError(f"module {name!r} has only its {'up' if 'up' in p else 'down'} weight")
        up, down = p["up"], p["down"]
        if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoraFormatError(f"module {name!r}: up {tuple(up.shape)} and down {tuple(down.shape)} do not pair")
        if "alpha" in p:
            alpha = float(p["alpha"].float().reshape(-1)[0])
        else:
            role = name.split(".", 1)[0]
            alpha = header_alphas.get(role, header_alphas.get("*"))
        modules[name] = LoraModule(name=name, up=up, down=down, alpha=alpha)
    return modules
