"""LyCORIS LoHa and LoKr modules rewritten exactly as plain LoRA (kohya `lora_down`/`lora_up`) pairs.

diffusers loads LoRA, LoCon (kohya convolution LoRAs) and DoRA for SD1/SDXL, but not LoHa or LoKr.
Both are low-rank in disguise, so each module converts without loss:

- LoHa: ΔW = s · (A₁B₁) ⊙ (A₂B₂). A Hadamard product of rank-r factors is a rank-r² product of their
  face-splitting (row-wise Khatri-Rao) factors: up[i, (j,k)] = A₁[i,j]·A₂[i,k],
  down[(j,k), l] = B₁[j,l]·B₂[k,l].
- LoKr: ΔW = s · W₁ ⊗ W₂, with each factor full or a product UV. (U₁V₁) ⊗ (U₂V₂) = (U₁⊗U₂)(V₁⊗V₂); a
  full factor is written as identity times itself on its smaller side.

The scale s is LyCORIS's (alpha / rank of the decomposed factor; LoKr with two full factors has none)
and is baked into `up`, as is every plain module's alpha/rank, and no alpha is kept (see `bake_alphas`). Convolution modules store their
input flattened (in·kh·kw): the kernel comes from the module's own shape when `shapes` knows it,
else from SD's layer names (3×3 for the convolutions, 1×1 otherwise). Tucker (`hada_t1`, `lokr_t2`)
modules are refused by the uploader and here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from genserve.core.errors import InvalidRequest

_LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_SUFFIX = re.compile(r"\.(hada_w[12]_[ab]|lokr_w[12](_[ab])?|hada_t[12]|lokr_t[12]|alpha|dora_scale)$")
# SD UNet convolutions with 3x3 kernels, in diffusers and in SGM (input_blocks) naming
_CONV3 = re.compile(r"(_conv[12]?|_conv_in|_conv_out|_op|_in_layers_2|_out_layers_3|_downsamplers_0_conv|"
                    r"_upsamplers_0_conv)$")

ShapeOf = Callable[[str], tuple[int, ...] | None]


class LycorisInvalid(InvalidRequest):
    code = "lycoris_invalid"


def is_lycoris(state_dict: Mapping[str, Any]) -> bool:
    return any(k.rsplit(".", 1)[-1] in _LOHA_PARTS + _LOKR_PARTS for k in state_dict)


def _kernel(module: str, flat_in: int, out: int, shapes: ShapeOf | None) -> tuple[int, ...]:
    """(in, kh, kw) of a convolution, or (in,) of a linear module, for a flattened input width."""
    shape = shapes(module) if shapes is not None else None
    if shape is not None:
        if len(shape) == 4 and shape[1] * shape[2] * shape[3] == flat_in:
            return tuple(shape[1:])
        if len(shape) == 2 and shape[1] == flat_in:
            return (flat_in,)
        raise LycorisInvalid(f"{module}: the file's shape does not fit the model's {tuple(shape)}")
    if _CONV3.search(module) and flat_in % 9 == 0:
        return (flat_in // 9, 3, 3)
    return (flat_in,)


def _face_split_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """up[i, (j,k)] = a1[i,j] · a2[i,k]."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def _face_split_cols(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """down[(j,k), l] = b1[j,l] · b2[k,l]."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def _as_product(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                module: str, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as (U, V) with W = U @ V (V's columns may be a convolution's flattened input)."""
    if full is not None:
        w = full.reshape(full.shape[0], -1).float()
        rows, cols = w.shape
        if rows <= cols:
            return torch.eye(rows), w
        return w, torch.eye(cols)
    if a is None or b is None:
        raise LycorisInvalid(f"{module}: LoKr factor {which} is neither full nor a complete a/b pair")
    return a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()


def _loha(module: str, t: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    a1, b1, a2, b2 = (t[f"{module}.{p}"].float() for p in _LOHA_PARTS)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != b1.shape[0] or a2.shape[1] != b2.shape[0] \
            or a1.shape[0] != a2.shape[0] or b1.reshape(b1.shape[0], -1).shape[1] != b2.reshape(b2.shape[0], -1).shape[1]:
        raise LycorisInvalid(f"{module}: LoHa factors do not pair")
    rank = b1.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    up = _face_split_rows(a1, a2) * scale
    down = _face_split_cols(b1.reshape(rank, -1), b2.reshape(b2.shape[0], -1))
    return up, down


def _lokr(module: str, t: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    def get(p: str) -> torch.Tensor | None:
        return t.get(f"{module}.{p}")

    u1, v1 = _as_product(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), module, "w1")
    u2, v2 = _as_product(get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b"), module, "w2")
    decomposed = get("lokr_w2_b") if get("lokr_w2") is None else get("lokr_w1_b") if get("lokr_w1") is None else None
    scale = 1.0
    if decomposed is not None and alpha is not None:
        scale = alpha / decomposed.shape[0]
    # the flattened input of a convolution is (in_channel, kh, kw): W1's input index is the outer one
    return torch.kron(u1, u2) * scale, torch.kron(v1, v2)


def lycoris_to_lora(state_dict: Mapping[str, torch.Tensor], shapes: ShapeOf | None = None) -> dict[str, torch.Tensor]:
    """A state dict whose LoHa/LoKr modules are rewritten as exact kohya LoRA pairs; other keys pass."""
    modules: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key in state_dict:
        m = _SUFFIX.search(key)
        part = m.group(1) if m else None
        if part in ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2"):
            raise LycorisInvalid(f"Tucker-decomposed LyCORIS modules are not supported ({key!r})")
        if part in _LOHA_PARTS:
            modules[key[: m.start()]] = "loha"
        elif part in _LOKR_PARTS:
            modules[key[: m.start()]] = "lokr"
    for key, tensor in state_dict.items():
        m = _SUFFIX.search(key)
        if m is None or key[: m.start()] not in modules:
            out[key] = tensor
    for module, kind in modules.items():
        alpha_t = state_dict.get(f"{module}.alpha")
        alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else None
        try:
            up, down = (_loha if kind == "loha" else _lokr)(module, state_dict, alpha)
        except KeyError as exc:
            raise LycorisInvalid(f"{module}: LoHa module without {exc}") from None
        rank = down.shape[0]
        kernel = _kernel(module, down.shape[1], up.shape[0], shapes)
        if len(kernel) == 3:
            down = down.reshape(rank, *kernel)
            up = up.reshape(up.shape[0], rank, 1, 1)
        dtype = state_dict[next(k for k in state_dict if k.startswith(module + "."))].dtype
        out[f"{module}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{module}.lora_up.weight"] = up.to(dtype).contiguous()
    return bake_alphas(out)


def bake_alphas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each kohya module's alpha/rank multiplied into its `lora_up`, and the alpha keys dropped.

    Without alphas diffusers runs every module at scale 1 whatever its rank; with alphas of mixed
    values it builds an `alpha_pattern` whose keys miss attention modules (it warns "alpha_pattern keys
    did not match any targeted module"), running those at the wrong scale."""
    out = dict(state_dict)
    for key in [k for k in out if k.endswith(".lora_down.weight")]:
        module = key.removesuffix(".lora_down.weight")
        alpha = out.pop(f"{module}.alpha", None)
        if alpha is not None:
            rank = out[key].shape[0]
            up = out[f"{module}.lora_up.weight"]
            out[f"{module}.lora_up.weight"] = (up.float() * (float(alpha) / rank)).to(up.dtype)
    return out


def kohya_shapes(pipe: Any) -> ShapeOf:
    """Weight shapes of a pipeline's modules under their kohya names (diffusers naming)."""
    table: dict[str, tuple[int, ...]] = {}
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    parts = [("lora_unet_", getattr(pipe, "unet", None)),
             ("lora_te1_" if sdxl else "lora_te_", getattr(pipe, "text_encoder", None)),
             ("lora_te2_", getattr(pipe, "text_encoder_2", None))]
    for prefix, component in parts:
        if component is None:
            continue
        for name, mod in component.named_modules():
            weight = getattr(mod, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim in (2, 4):
                name = name.removesuffix(".base_layer")
                flat = name.replace(".", "_")
                table[prefix + flat] = tuple(weight.shape)
                if prefix != "lora_unet_" and not flat.startswith("text_model_"):
                    table[prefix + "text_model_" + flat] = tuple(weight.shape)
    return table.get


class DoraUnsupported(InvalidRequest):
    code = "dora_unsupported"


def kohya_dora_to_diffusers(state_dict: dict[str, torch.Tensor], unet_config: Any | None = None
                            ) -> dict[str, torch.Tensor] | None:
    """A kohya/LyCORIS DoRA state dict (`dora_scale` next to `lora_down`/`lora_up`) in diffusers' PEFT
    layout (`lora_magnitude_vector`), or None when the file has no DoRA module.

    diffusers' SD/SDXL loader drops `dora_scale` keys (with only a warning), which would run a DoRA
    file as a plain LoRA. Its own kohya converter maps them; it is called here with each module's
    alpha/rank baked into `lora_up` (the converted dict carries no alphas), on magnitudes taken per
    output row (LyCORIS `wd_on_out`, PEFT's DoRA). Magnitudes per input column have no PEFT form."""
    if not any(k.endswith(".dora_scale") for k in state_dict):
        return None
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sd = bake_alphas(state_dict)
    for key in [k for k in sd if k.endswith(".dora_scale")]:
        scale = sd[key]
        module = key.removesuffix(".dora_scale")
        up = sd.get(f"{module}.lora_up.weight")
        if up is None:
            raise DoraUnsupported(f"{module}: a DoRA magnitude without its LoRA pair")
        if scale.numel() != up.shape[0] or (scale.ndim >= 2 and scale.shape[0] != up.shape[0]):
            raise DoraUnsupported(f"{module}: DoRA magnitudes per input column (shape {tuple(scale.shape)}) "
                                  "are not supported; per output row they are")
        # PEFT keeps a linear layer's magnitudes as (out,), a convolution's as (1, out, 1, 1)
        sd[key] = scale.reshape(1, -1, 1, 1) if up.ndim == 4 else scale.reshape(-1)
    if unet_config is not None and any(k.startswith("lora_unet_input_blocks") for k in sd):
        sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    return converted
