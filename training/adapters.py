"""The LoRA adapters a run trains: which layers get one, and their weights in and out of the models.

Adapter weights are keyed by PEFT's names prefixed with the module they belong to (`unet.`,
`text_encoder.`, `text_encoder_2.`), the layout checkpoints and the kohya export read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from training.params import ResolvedParams

# kohya's default targets: the Linear / 1x1 conv layers of the transformer blocks, and CLIP attention + MLP
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# LoCon (kohya's conv_dim network_args): also the ResNet blocks and the down/up-samplers, as kohya's
# ResnetBlock2D / Downsample2D / Upsample2D targets; the 3x3 convs at conv_dim, the rest at network_dim
UNET_CONV3X3 = r"(?:resnets\.\d+\.(?:conv1|conv2)|(?:downsamplers|upsamplers)\.0\.conv)"
UNET_RESNET_OTHER = r"resnets\.\d+\.(?:conv_shortcut|time_emb_proj)"

Unwrap = Callable[[torch.nn.Module], torch.nn.Module]


def unet_lora_config(params: ResolvedParams) -> LoraConfig:
    """The UNet's adapter: LoRA on the transformer blocks; LoCon adds the conv layers; DoRA decomposes."""
    dora = params.network_type == "dora"
    if not params.conv_dim:
        return LoraConfig(r=params.network_dim, lora_alpha=params.network_alpha, init_lora_weights="gaussian",
                          target_modules=UNET_TARGETS, use_dora=dora)
    linear = "|".join(t.replace(".", r"\.") for t in UNET_TARGETS)
    pattern = rf".*\.(?:{linear}|{UNET_CONV3X3}|{UNET_RESNET_OTHER})$"
    return LoraConfig(r=params.network_dim, lora_alpha=params.network_alpha, init_lora_weights="gaussian",
                      target_modules=pattern, use_dora=dora,
                      rank_pattern={UNET_CONV3X3: params.conv_dim},
                      alpha_pattern={UNET_CONV3X3: params.conv_alpha})


def add_lora_adapters(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], params: ResolvedParams,
                      weight_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Add the adapters (text encoders' only when they train) and return the trained modules by prefix.

    The adapters' weights are kept in float32 under half-precision models: their updates are too
    small for fp16/bf16 to hold.
    """
    unet.add_adapter(unet_lora_config(params))
    trained = [unet]
    if params.train_text_encoder:
        for te in text_encoders:
            te.add_adapter(LoraConfig(r=params.network_dim, lora_alpha=params.network_alpha,
                                      init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS,
                                      use_dora=params.network_type == "dora"))
            trained.append(te)
    if weight_dtype != torch.float32:
        cast_training_params(trained, dtype=torch.float32)
    modules = {"unet": unet}
    if params.train_text_encoder:
        modules["text_encoder"] = text_encoders[0]
        if len(text_encoders) > 1:
            modules["text_encoder_2"] = text_encoders[1]
    return modules


def adapter_weights(modules: dict[str, torch.nn.Module], unwrap: Unwrap) -> dict[str, torch.Tensor]:
    """The LoRA weights of the trained modules, prefixed, as float32 tensors on the CPU."""
    out = {}
    for prefix, module in modules.items():
        state = get_peft_model_state_dict(unwrap(module))
        out.update({f"{prefix}.{k}": v.detach().float().cpu() for k, v in state.items()})
    return out


def load_adapter_weights(modules: dict[str, torch.nn.Module], unwrap: Unwrap, weights: dict[str, torch.Tensor],
                         folder: str | Path) -> None:
    """Load prefixed LoRA weights read from checkpoint `folder`; a key no adapter has is an error."""
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}
        loaded = set_peft_model_state_dict(unwrap(module), sub)
        if getattr(loaded, "unexpected_keys", None):
            raise ValueError(f"checkpoint {folder} has unexpected {prefix} keys: {loaded.unexpected_keys[:3]}")
