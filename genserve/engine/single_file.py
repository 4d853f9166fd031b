"""Export a diffusers SD1.x / SDXL pipeline as one original-layout (LDM/CompVis) state dict.

This is the inverse of diffusers' single-file converters, so a pipeline saved this way loads back
with `from_single_file(path, config=<diffusers config folder>)`, and also in A1111/ComfyUI-style
tools, which expect the LDM layout (4-D VAE attention weights, fused OpenCLIP attention).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D submodule -> LDM ResBlock submodule
_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE mid-block attention submodule -> LDM AttnBlock submodule
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_key(parts: list[str]) -> str:
    return ".".join([_RESNET_RENAMES.get(parts[0], parts[0]), *parts[1:]])


def _unet_top_level_keys(config) -> dict[str, str]:
    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]
    keys = {**mapping["layers"]}
    if config.get("addition_embed_type") == "text_time":
        keys.update(mapping["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        keys.update(mapping["class_embed_type"])
    return keys


def _unet_block_key(key: str, config) -> str:
    """Map one down/mid/up block key. LDM numbers blocks flatly: each level holds L layers plus a resampler."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block has no LDM single-file layout")
    stride = layers + 1
    p = key.split(".")
    if p[0] == "down_blocks":
        level = int(p[1])
        if p[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
            return f"input_blocks.{(level + 1) * stride}.0.op." + ".".join(p[5:])
        block = 1 + level * stride + int(p[3])
        if p[2] == "resnets":
            return f"input_blocks.{block}.0." + _resnet_key(p[4:])
        return f"input_blocks.{block}.1." + ".".join(p[4:])
    if p[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        rest = _resnet_key(p[3:]) if p[1] == "resnets" else ".".join(p[3:])
        return f"middle_block.{index}." + rest
    if p[0] == "up_blocks":
        level = int(p[1])
        if p[2] == "upsamplers":  # the upsampler follows the attention when the block has one
            slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            return f"output_blocks.{level * stride + layers}.{slot}.conv." + ".".join(p[5:])
        block = level * stride + int(p[3])
        if p[2] == "resnets":
            return f"output_blocks.{block}.0." + _resnet_key(p[4:])
        return f"output_blocks.{block}.1." + ".".join(p[4:])
    raise KeyError(f"UNet key with no LDM equivalent: {key}")


def unet_to_ldm(unet: UNet2DConditionModel, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    top_level = _unet_top_level_keys(unet.config)
    return {
        prefix + (top_level[k] if k in top_level else _unet_block_key(k, unet.config)): v
        for k, v in unet.state_dict().items()
    }


def _vae_key(key: str, num_levels: int) -> tuple[str, bool]:
    """LDM key for one VAE key, and whether it is an attention projection (stored as a 1x1 conv in LDM)."""
    top_level = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top_level:
        return top_level[key], False
    p = key.split(".")
    coder, kind = p[0], p[1]
    if kind in ("down_blocks", "up_blocks"):
        # the LDM decoder lists its levels from the lowest resolution up: reversed order
        level = int(p[2]) if kind == "down_blocks" else num_levels - 1 - int(p[2])
        base = f"{coder}.{'down' if kind == 'down_blocks' else 'up'}.{level}."
        if p[3] == "resnets":
            return base + f"block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut"), False
        resampler = "downsample" if kind == "down_blocks" else "upsample"
        return base + f"{resampler}.conv." + ".".join(p[6:]), False
    if kind == "mid_block":
        if p[2] == "resnets":  # LDM numbers the mid resnets from 1
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(p[3]) + 1}." + rest, False
        rest = ".".join(p[4:])
        for diffusers_name, ldm_name in _VAE_ATTENTION_RENAMES.items():
            if rest.startswith(diffusers_name + "."):
                return f"{coder}.mid.attn_1.{ldm_name}." + rest[len(diffusers_name) + 1 :], ldm_name != "norm"
    raise KeyError(f"VAE key with no LDM equivalent: {key}")


def vae_to_ldm(vae: AutoencoderKL, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    num_levels = len(vae.config["block_out_channels"])
    out = {}
    for key, value in vae.state_dict().items():
        ldm_key, is_projection = _vae_key(key, num_levels)
        if is_projection and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + ldm_key] = value
    return out


def clip_to_ldm(text_encoder: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> `<prefix>text_model.*`.

    transformers >= 5.6 dropped the `text_model.` wrapper from `CLIPTextModel`'s state dict; LDM keeps it.
    """
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in text_encoder.state_dict().items()
    }


def openclip_to_ldm(
    text_encoder: CLIPTextModelWithProjection, prefix: str = SDXL_OPENCLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """HF CLIP text model with projection -> OpenCLIP layout (fused q/k/v, `[hidden, proj]` projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    out = {
        prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous(),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    for i in range(text_encoder.config.num_hidden_layers):
        hf, ldm = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[ldm + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(hf + f"self_attn.{q}_proj.{kind}") for q in "qkv"], dim=0
            )
            out[ldm + f"attn.out_proj.{kind}"] = sd.pop(hf + f"self_attn.out_proj.{kind}")
            out[ldm + f"ln_1.{kind}"] = sd.pop(hf + f"layer_norm1.{kind}")
            out[ldm + f"ln_2.{kind}"] = sd.pop(hf + f"layer_norm2.{kind}")
            out[ldm + f"mlp.c_fc.{kind}"] = sd.pop(hf + f"mlp.fc1.{kind}")
            out[ldm + f"mlp.c_proj.{kind}"] = sd.pop(hf + f"mlp.fc2.{kind}")
    if sd:
        raise KeyError(f"OpenCLIP keys with no LDM equivalent: {sorted(sd)}")
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, one or two text encoders) as one flat LDM state dict.

    SDXL is recognised by its second text encoder. Tensors are detached and contiguous, ready for
    `safetensors.torch.save_file`.
    """
    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_L_PREFIX))
        sd.update(openclip_to_ldm(pipe.text_encoder_2))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder, SD1_CLIP_PREFIX))
    return {k: v.detach().contiguous() for k, v in sd.items()}
