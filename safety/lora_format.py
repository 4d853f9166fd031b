"""Read an adapter state dict of any common layout into canonical modules, each able to give its ΔW.

Layouts understood (see the kohya/diffusers/PEFT/LyCORIS notes):
  kohya      `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale = alpha/rank),
             convolutions (LoCon) with 4-D factors and an optional Tucker core `.lora_mid.weight`
  diffusers  `unet.<path>.lora.down.weight` / `.lora.up.weight`, older `...processor.to_q_lora.down.weight`
             and text-encoder `...q_proj.lora_linear_layer.down.weight`
  PEFT       `[base_model.model.]<path>.lora_A[.adapter].weight` / `.lora_B...` (alpha from the
             `lora_adapter_metadata` header, else alpha = rank)
  LoHa       `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b` (+ `.alpha`): ΔW = scale·(w1a·w1b) ⊙ (w2a·w2b)
  LoKr       `.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b` (+ `.alpha`): ΔW = scale·kron(w1, w2)
  full       `.diff` (LyCORIS "full"): ΔW itself; `.diff_b` (its bias) is not part of the fingerprint
  DoRA       a LoRA pair plus `.dora_scale` (kohya/LyCORIS) or `.lora_magnitude_vector` (PEFT)

Every layout maps to one canonical module name `<role>.<diffusers path with _>` (role unet / te1 / te2 /
vae / ...); the original SD/SGM U-Net names that sd-scripts writes for SDXL (`input_blocks_4_1_...`) and
the single-file checkpoint prefixes are mapped to the diffusers names, so the same weights under another
layout land on the same module.

Fail closed: a module with a half pair, mismatched shapes, or keys of an adapter kind
this reader does not know (OFT, BOFT, (IA)³, GLoRA, Tucker-form LoHa/LoKr, trained norms, ...) raises
LoraFormatError (`lora_format_invalid`) or LoraFormatUnsupported (`lora_format_unsupported`): a file the
blocklist cannot fingerprint must not be usable.

DoRA limitation: a DoRA layer's effect is m·(W₀+ΔW)/‖W₀+ΔW‖ − W₀, which needs the base weight W₀. From
the file alone the fingerprint takes the directional update ΔW = scale·up·down; the magnitude vector is
read (so the file is recognised) but its rescaling of the base's columns is not fingerprinted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from safety.errors import SafetyError


class LoraFormatError(SafetyError):
    """The state dict holds adapter keys that do not form consistent modules."""

    code = "lora_format_invalid"


class LoraFormatUnsupported(LoraFormatError):
    """The state dict holds adapter keys of a kind that cannot be fingerprinted (refused: fail closed)."""

    code = "lora_format_unsupported"


_SLOTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha", "dora_scale": "dora",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
    "diff": "diff", "diff_b": "diff_b",
}
_KEY = re.compile(
    r"^(?P<module>.+?)(?:"
    r"\.(?P<slot>" + "|".join(re.escape(s) for s in sorted(_SLOTS, key=len, reverse=True)) + r")"
    r"|\.lora_(?P<peft>A|B)(?:\.[^.]+)?\.weight"
    r"|\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?"
    r"|_lora\.(?P<processor>down|up)\.weight"
    r")$"
)
_KIND_OF_SLOT = {slot: "loha" if slot.startswith("hada") else "lokr" if slot.startswith("lokr") else "lora"
                 for slot in _SLOTS.values() if slot.startswith(("hada", "lokr")) or slot in ("up", "down", "mid")}
_KIND_OF_SLOT["diff"] = "full"
# Keys of adapter kinds nobody here can turn into a ΔW: their presence refuses the file.
_UNKNOWN_ADAPTER = re.compile(
    r"(?:^|[._])(?:oft_|boft_|hada_|lokr_|lora_|ia3|glora|dora|w_norm|b_norm|a1\.weight|b1\.weight)"
    r"|\.(?:oft_blocks|oft_diag|rescale|on_input|scalar)$"
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
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("cond_stage_model.transformer.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"),
    ("conditioner.embedders.1.model.", "te2"),
    ("first_stage_model.", "vae"),
)
# PEFT models saved without a role prefix: recognise the text encoder by its own module names.
_TEXT_ENCODER_ROOTS = ("text_model.", "encoder.layers.")

# Original (SGM) U-Net names -> diffusers names. Block numbering is the same for SD1 and SDXL:
# input_blocks 3b+1+a are down block b's a-th layer, output_blocks 3b+a are up block b's a-th layer.
_RESNET_PARTS = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj",
                 "out_layers_0": "norm2", "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
            "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
            "input_blocks_0_0": "conv_in", "out_0": "conv_norm_out", "out_2": "conv_out"}
_SGM = re.compile(r"^(?P<where>input_blocks|output_blocks|middle_block)_(?:(?P<i>\d+)_)?(?P<j>\d+)(?:_(?P<rest>.*))?$")
# OpenCLIP (SDXL's second text encoder in single-file checkpoints) -> transformers CLIP names.
_OPENCLIP = re.compile(r"^transformer_resblocks_(\d+)_(attn_out_proj|mlp_c_fc|mlp_c_proj)$")
_OPENCLIP_PARTS = {"attn_out_proj": "self_attn_out_proj", "mlp_c_fc": "mlp_fc1", "mlp_c_proj": "mlp_fc2"}


def _resnet(prefix: str, rest: str | None) -> str:
    for sgm, diffusers in _RESNET_PARTS.items():
        if rest == sgm or (rest or "").startswith(sgm + "_"):
            return f"{prefix}_{diffusers}{rest[len(sgm):]}"
    return f"{prefix}_{rest}" if rest else prefix


def _sgm_to_diffusers(flat: str) -> str:
    """`input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `down_blocks_1_attentions_0_...`; others unchanged."""
    for sgm, diffusers in _SGM_TOP.items():
        if flat == sgm or flat.startswith(sgm + "_"):
            return diffusers + flat[len(sgm):]
    m = _SGM.match(flat)
    if m is None:
        return flat
    where, j, rest = m["where"], int(m["j"]), m["rest"]
    if where == "middle_block":
        if m["i"] is not None:  # middle_block_<j>_<i...>: the regex took the first number as i
            j, rest = int(m["i"]), f"{m['j']}_{rest}" if rest else m["j"]
        return f"mid_block_attentions_0_{rest}" if j == 1 else _resnet(f"mid_block_resnets_{j // 2}", rest)
    if m["i"] is None:
        return flat
    i = int(m["i"])
    if where == "input_blocks":
        b, a = divmod(i - 1, 3)
        if a == 2:  # the downsampler after block b
            return f"down_blocks_{b}_downsamplers_0_conv" + (rest or "").removeprefix("op")
        return f"down_blocks_{b}_attentions_{a}_{rest}" if j == 1 else _resnet(f"down_blocks_{b}_resnets_{a}", rest)
    b, a = divmod(i, 3)
    if j == 0:
        return _resnet(f"up_blocks_{b}_resnets_{a}", rest)
    if rest is not None and rest.startswith("conv"):  # upsampler: index 1 without attention, 2 with
        return f"up_blocks_{b}_upsamplers_0_{rest}"
    return f"up_blocks_{b}_attentions_{a}_{rest}"


def canonical_module_name(path: str) -> str:
    """`<role>.<path with _>` for a module path in any layout (without the adapter suffix)."""
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
    if role == "unet":
        flat = _sgm_to_diffusers(flat)
    elif role == "te2" and (m := _OPENCLIP.match(flat)):
        flat = f"encoder_layers_{m[1]}_{_OPENCLIP_PARTS[m[2]]}"
    return f"{role}.{flat}"


def is_adapter_key(key: str) -> bool:
    """Whether a tensor name belongs to an adapter (of a kind read here or not)."""
    return bool(_KEY.match(key) or _UNKNOWN_ADAPTER.search(key))


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


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix it multiplies: (out, in·kh·kw) for a convolution."""
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True)
class LoraModule:
    """One low-rank adapted layer: ΔW = scale · up @ [mid] @ down, scale = alpha / rank (1 without alpha).

    `mid` is LoCon's Tucker core (rank, rank, kh, kw) for convolutions; `kind` is "lora", "locon" or "dora"
    (see the module docstring for what a DoRA layer's fingerprint covers)."""

    name: str
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    alpha: float | None = None
    mid: torch.Tensor | None = None
    kind: str = "lora"

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
        if self.mid is not None:
            return int(self.down.shape[1]) * int(self.mid[0, 0].numel())
        return int(self.down_matrix().shape[1])

    @property
    def factored(self) -> bool:
        """True when ΔW is exactly `scale · up_matrix() @ down_matrix()` (no Tucker core)."""
        return self.mid is None

    def delta(self) -> torch.Tensor:
        """ΔW as an (out, in_features) float64 matrix."""
        up, down = self.up_matrix().double(), self.down_matrix().double()
        if self.mid is None:
            return self.scale * up @ down
        core = self.mid.double()  # (r, r, kh, kw): ΔW[o,i,h,w] = Σ up[o,a] mid[a,b,h,w] down[b,i]
        return self.scale * _flat(torch.einsum("oa,abhw,bi->oihw", up, core, down))


@dataclass(frozen=True)
class DenseModule:
    """A layer whose ΔW is cheapest built in full (LoHa, LoKr, LyCORIS full): `weight` is ΔW·(1/scale)."""

    name: str
    weight: torch.Tensor  # (out, in·kh·kw), before `scale`
    scale: float
    kind: str

    out_features = property(lambda self: int(self.weight.shape[0]))
    in_features = property(lambda self: int(self.weight.shape[1]))
    factored = False

    def delta(self) -> torch.Tensor:
        return self.scale * self.weight.double()


Module = LoraModule | DenseModule


def _alpha(p: dict[str, torch.Tensor]) -> float | None:
    return float(p["alpha"].float().reshape(-1)[0]) if "alpha" in p else None


def _loha(name: str, p: dict[str, torch.Tensor]) -> DenseModule:
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(s not in p for s in parts):
        raise LoraFormatError(f"LoHa module {name!r} lacks {[s for s in parts if s not in p]}")
    w1a, w1b, w2a, w2b = (_flat(p[s]).double() for s in parts)
    if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise LoraFormatError(f"LoHa module {name!r}: factor ranks do not pair")
    a, b = w1a @ w1b, w2a @ w2b
    if a.shape != b.shape:
        raise LoraFormatError(f"LoHa module {name!r}: {tuple(a.shape)} ⊙ {tuple(b.shape)} do not match")
    alpha = _alpha(p)
    return DenseModule(name, a * b, 1.0 if alpha is None else alpha / w1b.shape[0], "loha")


def _lokr(name: str, p: dict[str, torch.Tensor]) -> DenseModule:
    sides = []
    for side in ("w1", "w2"):
        full, fa, fb = p.get(f"lokr_{side}"), p.get(f"lokr_{side}_a"), p.get(f"lokr_{side}_b")
        if full is not None and fa is None and fb is None:
            sides.append((_flat(full).double(), None))
        elif full is None and fa is not None and fb is not None and _flat(fa).shape[1] == fb.shape[0]:
            sides.append((_flat(fa).double() @ _flat(fb).double(), int(fb.shape[0])))
        else:
            raise LoraFormatError(f"LoKr module {name!r}: {side} must be one full matrix or an a/b pair")
    (w1, r1), (w2, r2) = sides
    # As ComfyUI/LyCORIS load it: alpha/rank of the factorised side (w2 first), no scale when both are full.
    rank = r2 if r2 is not None else r1
    alpha = _alpha(p)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return DenseModule(name, torch.kron(w1, w2), scale, "lokr")


def _low_rank(name: str, p: dict[str, torch.Tensor], header_alpha: float | None) -> LoraModule:
    if "up" not in p or "down" not in p:
        raise LoraFormatError(f"module {name!r} has only its {'up' if 'up' in p else 'down'} weight")
    up, down, mid = p["up"], p["down"], p.get("mid")
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        raise LoraFormatError(f"module {name!r}: up {tuple(up.shape)} and down {tuple(down.shape)} do not pair")
    if mid is not None and (mid.ndim != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]):
        raise LoraFormatError(f"module {name!r}: Tucker core {tuple(mid.shape)} does not pair with its factors")
    alpha = _alpha(p) if "alpha" in p else header_alpha
    return LoraModule(name=name, up=up, down=down, alpha=alpha, mid=mid,
                      kind="dora" if "dora" in p else ("locon" if up.ndim == 4 else "lora"))


def read_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, Module]:
    """Canonical modules of an adapter state dict. Keys that are no adapter weights (embeddings bundled
    with a LoRA, ...) are left out; malformed or unknown adapter keys raise (see the module docstring)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    raw_names: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            if _UNKNOWN_ADAPTER.search(key):
                raise LoraFormatUnsupported(f"adapter key {key!r} is of a kind that cannot be fingerprinted")
            continue
        if m["slot"]:
            slot = _SLOTS[m["slot"]]
        elif m["peft"]:
            slot = "down" if m["peft"] == "A" else "up"
        elif m["processor"]:
            slot = m["processor"]
        else:
            slot = "dora"  # PEFT's lora_magnitude_vector
        name = canonical_module_name(m["module"])
        seen = raw_names.setdefault(name, m["module"])
        if seen != m["module"] or slot in parts.get(name, {}):
            raise LoraFormatError(f"two keys name the same module {name!r}: {seen!r} and {m['module']!r}")
        parts.setdefault(name, {})[slot] = tensor

    header_alphas = _adapter_alphas(metadata)
    modules: dict[str, Module] = {}
    for name, p in parts.items():
        kinds = {_KIND_OF_SLOT[s] for s in p if s in _KIND_OF_SLOT}
        if len(kinds) > 1:
            raise LoraFormatError(f"module {name!r} mixes adapter kinds {sorted(kinds)}")
        if not kinds:
            if "dora" in p:
                raise LoraFormatUnsupported(f"module {name!r} has a DoRA magnitude but no direction update")
            if "diff_b" in p:
                raise LoraFormatUnsupported(f"module {name!r} has a bias update only")
            continue  # a stray alpha
        kind = kinds.pop()
        if kind == "loha":
            modules[name] = _loha(name, p)
        elif kind == "lokr":
            modules[name] = _lokr(name, p)
        elif kind == "full":
            modules[name] = DenseModule(name, _flat(p["diff"]).double(), 1.0, "full")
        else:
            role = name.split(".", 1)[0]
            modules[name] = _low_rank(name, p, header_alphas.get(role, header_alphas.get("*")))
    return modules
