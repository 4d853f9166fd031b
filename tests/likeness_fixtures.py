"""Small LoRAs with real SD1/SDXL module names (dims scaled down), written in kohya, diffusers or PEFT
layout, plus the transformations someone might use to slip a blocklisted LoRA past a hash check."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from safetensors.torch import save

# (diffusers module path, out_features, in_features). Channel widths are scaled down 10×
# (320/640/1280 -> 32/64/128, context 768 -> 48, SDXL context 2048 -> 96) to keep files tiny.


def _transformer_block(prefix: str, c: int, ctx: int) -> list[tuple[str, int, int]]:
    return [
        (f"{prefix}.attn1.to_q", c, c), (f"{prefix}.attn1.to_k", c, c), (f"{prefix}.attn1.to_v", c, c),
        (f"{prefix}.attn1.to_out.0", c, c),
        (f"{prefix}.attn2.to_q", c, c), (f"{prefix}.attn2.to_k", c, ctx), (f"{prefix}.attn2.to_v", c, ctx),
        (f"{prefix}.attn2.to_out.0", c, c),
        (f"{prefix}.ff.net.0.proj", 8 * c, c), (f"{prefix}.ff.net.2", c, 4 * c),
    ]


def _text_encoder(prefix: str, width: int, layers: int) -> list[tuple[str, int, int]]:
    out = []
    for i in range(layers):
        p = f"{prefix}.text_model.encoder.layers.{i}"
        out += [(f"{p}.self_attn.{n}", width, width) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [(f"{p}.mlp.fc1", 4 * width, width), (f"{p}.mlp.fc2", width, 4 * width)]
    return out


def sd1_modules() -> list[tuple[str, int, int]]:
    mods = []
    for b, c in ((0, 32), (1, 64), (2, 128)):
        for a in (0, 1):
            mods += _transformer_block(f"unet.down_blocks.{b}.attentions.{a}.transformer_blocks.0", c, 48)
    mods += _transformer_block("unet.mid_block.attentions.0.transformer_blocks.0", 128, 48)
    for b, c in ((1, 128), (2, 64), (3, 32)):
        for a in (0, 1, 2):
            mods += _transformer_block(f"unet.up_blocks.{b}.attentions.{a}.transformer_blocks.0", c, 48)
    return mods + _text_encoder("text_encoder", 48, 2)


def sdxl_modules() -> list[tuple[str, int, int]]:
    mods = []
    for b, c, blocks in ((1, 64, 2), (2, 128, 2)):
        for a in (0, 1):
            for t in range(blocks):
                mods += _transformer_block(f"unet.down_blocks.{b}.attentions.{a}.transformer_blocks.{t}", c, 96)
    for t in range(2):
        mods += _transformer_block(f"unet.mid_block.attentions.0.transformer_blocks.{t}", 128, 96)
    return mods + _text_encoder("text_encoder", 48, 1) + _text_encoder("text_encoder_2", 80, 1)


@dataclass(frozen=True)
class Lora:
    """module path -> (up (out, r), down (r, in), alpha or None)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]

    def delta(self, path: str) -> torch.Tensor:
        up, down, alpha = self.modules[path]
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        return scale * up.double() @ down.double()

    def map(self, fn) -> Lora:  # noqa: ANN001 - fn(path, up, down, alpha) -> (up, down, alpha)
        return replace(self, modules={p: fn(p, *v) for p, v in self.modules.items()})


def random_lora(spec: list[tuple[str, int, int]], *, rank: int = 8, seed: int = 0, alpha: float | None = 4.0,
                decay: float = 0.7) -> Lora:
    """A LoRA whose ΔW has a decaying spectrum, like a trained one (so SVD truncation keeps most of it)."""
    g = torch.Generator().manual_seed(seed)
    weights = decay ** torch.arange(rank, dtype=torch.float32)
    mods = {}
    for path, out, inp in spec:
        up = torch.randn(out, rank, generator=g) * 0.02 * weights
        down = torch.randn(rank, inp, generator=g) / inp**0.5
        mods[path] = (up, down, alpha)
    return Lora(mods)


# ---- layouts ------------------------------------------------------------------------------------
_KOHYA_ROLES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}


def _kohya_name(path: str, sd1: bool) -> str:
    for prefix, kohya in sorted(_KOHYA_ROLES.items(), key=lambda kv: -len(kv[0])):
        if path.startswith(prefix):
            kohya = "lora_te_" if sd1 and kohya == "lora_te1_" else kohya
            return kohya + path[len(prefix):].replace(".", "_")
    raise ValueError(path)


def to_kohya(lora: Lora, *, sd1: bool = True) -> dict[str, torch.Tensor]:
    sd = {}
    for path, (up, down, alpha) in lora.modules.items():
        k = _kohya_name(path, sd1)
        sd[f"{k}.lora_up.weight"] = up.contiguous()
        sd[f"{k}.lora_down.weight"] = down.contiguous()
        sd[f"{k}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return sd


def _baked(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """up with alpha/rank folded in, for layouts that carry no alpha."""
    return (up * (1.0 if alpha is None else alpha / down.shape[0])).to(up.dtype)


def to_diffusers(lora: Lora) -> dict[str, torch.Tensor]:
    sd = {}
    for path, (up, down, alpha) in lora.modules.items():
        sd[f"{path}.lora.up.weight"] = _baked(up, down, alpha).contiguous()
        sd[f"{path}.lora.down.weight"] = down.contiguous()
    return sd


def to_peft(lora: Lora, *, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Raw PEFT keys of a UNet model (`base_model.model.` + module path); unet modules only."""
    mid = f".{adapter}" if adapter else ""
    sd = {}
    for path, (up, down, alpha) in lora.modules.items():
        if not path.startswith("unet."):
            continue
        p = "base_model.model." + path.removeprefix("unet.")
        sd[f"{p}.lora_A{mid}.weight"] = down.contiguous()
        sd[f"{p}.lora_B{mid}.weight"] = _baked(up, down, alpha).contiguous()
    return sd


def write(path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):  # noqa: ANN001, ANN201
    data = save(state_dict, metadata=metadata)
    path.write_bytes(data)
    return path


# ---- transformations ----------------------------------------------------------------------------
def change_alpha(lora: Lora, factor: float) -> Lora:
    """alpha × factor with up ÷ factor: the same ΔW."""
    return lora.map(lambda p, up, down, a: (up / factor, down, (a if a is not None else down.shape[0]) * factor))


def rescale(lora: Lora, factor: float) -> Lora:
    return lora.map(lambda p, up, down, a: (up * factor, down, a))


def mix_basis(lora: Lora, seed: int = 1) -> Lora:
    """up·Q, Q⁻¹·down with a random invertible Q: the same ΔW, different factors."""
    g = torch.Generator().manual_seed(seed)

    def f(p, up, down, a):  # noqa: ANN001, ANN202
        r = down.shape[0]
        q = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
        return (up.double() @ q).float(), (torch.linalg.inv(q) @ down.double()).float(), a

    return lora.map(f)


def refactor(lora: Lora, rank: int) -> Lora:
    """SVD of ΔW re-split at `rank` (zero-padded above ΔW's rank, truncated below it)."""

    def f(p, up, down, a):  # noqa: ANN001, ANN202
        delta = (1.0 if a is None else a / down.shape[0]) * up.double() @ down.double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.shape[0])
        new_up = torch.zeros(up.shape[0], rank, dtype=torch.float64)
        new_down = torch.zeros(rank, down.shape[1], dtype=torch.float64)
        new_up[:, :k] = u[:, :k] * s[:k].sqrt()
        new_down[:k] = s[:k].sqrt()[:, None] * vh[:k]
        return new_up.float(), new_down.float(), float(rank)

    return lora.map(f)


def cast(lora: Lora, dtype: torch.dtype) -> Lora:
    return lora.map(lambda p, up, down, a: (up.to(dtype), down.to(dtype), a))


def add_noise(lora: Lora, rel: float, seed: int = 2) -> Lora:
    g = torch.Generator().manual_seed(seed)

    def f(p, up, down, a):  # noqa: ANN001, ANN202
        return (up + rel * up.std() * torch.randn(up.shape, generator=g),
                down + rel * down.std() * torch.randn(down.shape, generator=g), a)

    return lora.map(f)


def sgm_renamed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL kohya keys renamed to sd-scripts' SGM U-Net names (input_blocks / middle_block)."""
    table = {
        "lora_unet_down_blocks_1_attentions_0_": "lora_unet_input_blocks_4_1_",
        "lora_unet_down_blocks_1_attentions_1_": "lora_unet_input_blocks_5_1_",
        "lora_unet_down_blocks_2_attentions_0_": "lora_unet_input_blocks_7_1_",
        "lora_unet_down_blocks_2_attentions_1_": "lora_unet_input_blocks_8_1_",
        "lora_unet_mid_block_attentions_0_": "lora_unet_middle_block_1_",
    }
    out = {}
    for k, v in state_dict.items():
        for old, new in table.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out
