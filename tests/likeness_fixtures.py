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


def _svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of up @ down through QR of the thin factors (no large SVD)."""
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, vh @ q2.T


def refactor(lora: Lora, rank: int) -> Lora:
    """SVD of ΔW re-split at `rank` (zero-padded above ΔW's rank, truncated below it)."""

    def f(p, up, down, a):  # noqa: ANN001, ANN202
        scale = 1.0 if a is None else a / down.shape[0]
        u, s, vh = _svd_of_product(scale * up.double(), down.double())
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


# ---- whole-ΔW encodings (LyCORIS kinds), decoys, partial copies, splits ------------------------------
def kohya_key(path: str, sd1: bool = True) -> str:
    return _kohya_name(path, sd1)


def conv_modules() -> list[tuple[str, int, int]]:
    """Resnet 3×3 convolutions (in_features = in·9) of the SD1-like U-Net, for LoCon-style LoRAs."""
    return [(f"unet.down_blocks.{b}.resnets.{a}.conv{k}", c, c * 9) for b, c in ((0, 32), (1, 64)) for a in (0, 1)
            for k in (1, 2)]


def to_locon(lora: Lora, conv_paths: set[str], sd1: bool = True) -> dict[str, torch.Tensor]:
    """kohya layout with 4-D factors for `conv_paths` (down (r, in, 3, 3), up (out, r, 1, 1))."""
    sd = to_kohya(lora, sd1=sd1)
    for path in conv_paths:
        k = _kohya_name(path, sd1)
        down = sd[f"{k}.lora_down.weight"]
        sd[f"{k}.lora_down.weight"] = down.reshape(down.shape[0], -1, 3, 3).contiguous()
        sd[f"{k}.lora_up.weight"] = sd[f"{k}.lora_up.weight"][:, :, None, None].contiguous()
    return sd


def to_loha(lora: Lora, sd1: bool = True, seed: int = 3) -> dict[str, torch.Tensor]:
    """The same ΔW as LoHa: (w1a·w1b) ⊙ (w2a·w2b) with w1 = ΔW·c and w2 = 1/c everywhere (c random)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (up, down, _) in lora.modules.items():
        k, r = _kohya_name(path, sd1), down.shape[0]
        c = float(torch.rand(1, generator=g)) * 4 + 0.5
        sd[f"{k}.hada_w1_a"] = (_scaled_up(lora, path) * c).float()
        sd[f"{k}.hada_w1_b"] = down.float().reshape(r, -1)
        sd[f"{k}.hada_w2_a"] = torch.full((up.shape[0], r), 1.0 / (r * c))
        sd[f"{k}.hada_w2_b"] = torch.ones(r, down.reshape(r, -1).shape[1])
        sd[f"{k}.alpha"] = torch.tensor(float(r))
    return sd


def _scaled_up(lora: Lora, path: str) -> torch.Tensor:
    up, down, alpha = lora.modules[path]
    return up.reshape(up.shape[0], -1).double() * (1.0 if alpha is None else alpha / down.shape[0])


def to_lokr(lora: Lora, sd1: bool = True) -> dict[str, torch.Tensor]:
    """The same ΔW as LoKr: kron(w1, w2) with a 1×1 w1 and w2 = w2_a·w2_b (alpha/rank of w2 applies)."""
    sd = {}
    for path, (_up, down, _) in lora.modules.items():
        k, r = _kohya_name(path, sd1), down.shape[0]
        sd[f"{k}.lokr_w1"] = torch.tensor([[2.0]])
        sd[f"{k}.lokr_w2_a"] = (_scaled_up(lora, path) / 2).float()
        sd[f"{k}.lokr_w2_b"] = down.float().reshape(r, -1)
        sd[f"{k}.alpha"] = torch.tensor(float(r))
    return sd


def to_full(lora: Lora, sd1: bool = True) -> dict[str, torch.Tensor]:
    """LyCORIS "full": ΔW itself under `.diff`."""
    return {f"{_kohya_name(p, sd1)}.diff": lora.delta(p).float() for p in lora.modules}


def to_dora(lora: Lora, sd1: bool = True, seed: int = 4) -> dict[str, torch.Tensor]:
    """kohya DoRA: the LoRA pair plus a `dora_scale` magnitude per output row."""
    g = torch.Generator().manual_seed(seed)
    sd = to_kohya(lora, sd1=sd1)
    for path, (up, _, _) in lora.modules.items():
        sd[f"{_kohya_name(path, sd1)}.dora_scale"] = torch.rand(up.shape[0], 1, generator=g) + 0.5
    return sd


def from_deltas(deltas: dict[str, torch.Tensor]) -> Lora:
    """An exact LoRA (full rank of each ΔW, alpha = None) holding the given ΔW per module."""
    mods = {}
    for path, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 1
        mods[path] = ((u[:, :k] * s[:k]).float(), vh[:k].float(), None)
    return Lora(mods)


def lokr_native(spec: list[tuple[str, int, int]], seed: int = 0, sd1: bool = True) -> tuple[dict, Lora]:
    """A LoKr trained as such (w1 4×4 full, w2 factorised at rank 4) and the same ΔW as a plain LoRA."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for path, out, inp in spec:
        if out % 4 or inp % 4:
            continue
        k = _kohya_name(path, sd1)
        w1 = torch.randn(4, 4, generator=g)
        w2a, w2b = torch.randn(out // 4, 4, generator=g) * 0.02, torch.randn(4, inp // 4, generator=g) / inp**0.5
        sd.update({f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(4.0)})
        deltas[path] = torch.kron(w1.double(), w2a.double() @ w2b.double())
    return sd, from_deltas(deltas)


def with_decoys(sd: dict[str, torch.Tensor], decoy_spec: list[tuple[str, int, int]], *, sd1: bool = True,
                magnitude: float = 1e-6, seed: int = 5) -> dict[str, torch.Tensor]:
    """`sd` plus near-zero modules on layers it does not adapt (their effect ~`magnitude`)."""
    decoys = random_lora(decoy_spec, seed=seed).map(lambda p, up, down, a: (up * magnitude / 0.02, down, a))
    return {**sd, **to_kohya(decoys, sd1=sd1)}


def rescale_modules(lora: Lora, seed: int = 6) -> Lora:
    """Each module's ΔW times its own random factor in [0.3, 3]."""
    g = torch.Generator().manual_seed(seed)
    return lora.map(lambda p, up, down, a: (up * (0.3 + 2.7 * float(torch.rand(1, generator=g))), down, a))


def keep_modules(lora: Lora, keep) -> Lora:  # noqa: ANN001 - keep(path) -> bool
    return Lora({p: v for p, v in lora.modules.items() if keep(p)})


def some_modules(lora: Lora, share: float, seed: int = 7) -> Lora:
    """A random `share` of the modules."""
    g = torch.Generator().manual_seed(seed)
    paths = list(lora.modules)
    order = torch.randperm(len(paths), generator=g).tolist()
    chosen = {paths[i] for i in order[: round(share * len(paths))]}
    return keep_modules(lora, lambda p: p in chosen)


def rank_slice(lora: Lora, start: int, stop: int | None = None) -> Lora:
    """The rank components [start:stop] of every module, at the original scale."""
    def f(p, up, down, a):  # noqa: ANN001, ANN202
        r = down.shape[0]
        scale = 1.0 if a is None else a / r
        u, d = up[:, start:stop] * scale, down[start:stop]
        return u, d, None
    return lora.map(f)


def add_loras(*loras: Lora) -> Lora:
    """One LoRA whose ΔW is the sum (ranks concatenated, scales baked in)."""
    mods = {}
    for lora in loras:
        for p, (up, down, a) in lora.modules.items():
            u = up * (1.0 if a is None else a / down.shape[0])
            if p in mods:
                mods[p] = (torch.cat([mods[p][0], u], 1), torch.cat([mods[p][1], down], 0), None)
            else:
                mods[p] = (u, down, None)
    return Lora(mods)


def sgm_checkpoint_key(path: str) -> str:
    """A fixture module path as an original single-file SD1 checkpoint key (without `.weight`)."""
    import re

    if path.startswith("text_encoder."):
        return "cond_stage_model.transformer." + path.removeprefix("text_encoder.")
    p = path.removeprefix("unet.")
    if m := re.match(r"down_blocks\.(\d)\.attentions\.(\d)\.(.*)", p):
        return f"model.diffusion_model.input_blocks.{3 * int(m[1]) + 1 + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", p):
        return f"model.diffusion_model.output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", p):
        return f"model.diffusion_model.middle_block.1.{m[1]}"
    raise ValueError(path)


def sd1_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny original-layout SD1 checkpoint: every fixture module's weight, plus biases and a VAE conv."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, out, inp in sd1_modules():
        key = sgm_checkpoint_key(path)
        sd[f"{key}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        sd[f"{key}.bias"] = torch.zeros(out)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(16, 4, 3, 3, generator=g) * 0.1
    return sd


def merge_into(checkpoint: dict[str, torch.Tensor], lora: Lora, strength: float = 1.0) -> dict[str, torch.Tensor]:
    out = dict(checkpoint)
    for path in lora.modules:
        key = f"{sgm_checkpoint_key(path)}.weight"
        out[key] = (out[key].double() + strength * lora.delta(path)).float()
    return out


def drift(checkpoint: dict[str, torch.Tensor], rel: float, seed: int = 8) -> dict[str, torch.Tensor]:
    """Every weight moved by `rel` of its scale (a fine-tune that does not aim at anything in particular)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim >= 2 else v for k, v in checkpoint.items()}
