"""LyCORIS LoHa/LoKr and DoRA files in the LoRA adapter cache, checked against their own formulas on the
tiny SD1 pipeline: what PEFT runs after loading equals the weight update the format defines."""

from __future__ import annotations

import pytest
import torch
from engine_loras import write_lora

from genserve.engine.lora_cache import LikenessBlocked, LoraCache
from genserve.engine.lycoris import LycorisInvalid, lycoris_to_lora
from genserve.tinymodels import build_tiny_pipeline

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 64 -> 64
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 32 -> 32, 3x3
R = 4


class NoBlock:
    def __init__(self, blocked: bool = False):
        self.blocked = blocked
        self.weights_checked = 0

    def check(self, _path):
        return None

    def check_state_dict(self, _sd, _meta=None):
        self.weights_checked += 1
        return "match" if self.blocked else None


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture()
def pipe():
    return build_tiny_pipeline("sd1")


def _modules(pipe):
    return (pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q,
            pipe.unet.down_blocks[0].resnets[0].conv1)


def _load(pipe, tmp_path, sd, blocklist=None):
    path = write_lora(tmp_path / "adapter.safetensors", sd)
    cache = LoraCache(pipe, blocklist or NoBlock(), max_adapters=4, max_bytes=1 << 30)
    adapter = cache.ensure("a" * 64, path)
    cache.activate([(adapter.name, 1.0)])
    return adapter


def _loha(g, out, flat_in, alpha=2.0):
    return {"hada_w1_a": _rand(g, out, R), "hada_w1_b": _rand(g, R, flat_in), "hada_w2_a": _rand(g, out, R),
            "hada_w2_b": _rand(g, R, flat_in), "alpha": torch.tensor(alpha)}


def test_loha_linear_and_conv_load_exactly(pipe, tmp_path):
    g = _g()
    parts = {LIN: _loha(g, 64, 64), CONV: _loha(g, 32, 32 * 9)}
    sd = {f"{m}.{k}": v for m, p in parts.items() for k, v in p.items()}
    adapter = _load(pipe, tmp_path, sd)
    lin, conv = _modules(pipe)
    for layer, name, shape in ((lin, LIN, (64, 64)), (conv, CONV, (32, 32, 3, 3))):
        p = parts[name]
        expected = (2.0 / R) * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        got = layer.get_delta_weight(adapter.name)
        assert got.shape == shape
        torch.testing.assert_close(got, expected.reshape(shape), atol=1e-5, rtol=1e-4)


def test_lokr_full_and_decomposed_factors_load_exactly(pipe, tmp_path):
    g = _g(1)
    sd = {  # linear: w1 full (8x8), w2 = a @ b (8x8 at rank 2), alpha 1 -> scale 1/2
        f"{LIN}.lokr_w1": _rand(g, 8, 8), f"{LIN}.lokr_w2_a": _rand(g, 8, 2), f"{LIN}.lokr_w2_b": _rand(g, 2, 8),
        f"{LIN}.alpha": torch.tensor(1.0),
        # conv: both factors full (no alpha scaling): w1 4x4, w2 8x8x3x3
        f"{CONV}.lokr_w1": _rand(g, 4, 4), f"{CONV}.lokr_w2": _rand(g, 8, 8, 3, 3),
        f"{CONV}.alpha": torch.tensor(7.0),
    }
    adapter = _load(pipe, tmp_path, sd)
    lin, conv = _modules(pipe)
    expected_lin = 0.5 * torch.kron(sd[f"{LIN}.lokr_w1"], sd[f"{LIN}.lokr_w2_a"] @ sd[f"{LIN}.lokr_w2_b"])
    torch.testing.assert_close(lin.get_delta_weight(adapter.name), expected_lin, atol=1e-5, rtol=1e-4)
    expected_conv = torch.kron(sd[f"{CONV}.lokr_w1"][:, :, None, None], sd[f"{CONV}.lokr_w2"])
    torch.testing.assert_close(conv.get_delta_weight(adapter.name), expected_conv, atol=1e-5, rtol=1e-4)


def test_kohya_dora_runs_as_dora_not_as_plain_lora(pipe, tmp_path):
    """diffusers' SD loader drops `dora_scale` keys; the cache converts them to PEFT magnitudes."""
    g = _g(2)
    lin, conv = _modules(pipe)
    w, cw, cb = lin.weight.detach().clone(), conv.weight.detach().clone(), conv.bias.detach().clone()
    sd = {f"{LIN}.lora_down.weight": _rand(g, R, 64, scale=0.1), f"{LIN}.lora_up.weight": _rand(g, 64, R, scale=0.1),
          f"{LIN}.alpha": torch.tensor(2.0), f"{LIN}.dora_scale": torch.rand(64, 1, generator=g) + 0.5,
          f"{CONV}.lora_down.weight": _rand(g, R, 32, 3, 3, scale=0.1),
          f"{CONV}.lora_up.weight": _rand(g, 32, R, 1, 1, scale=0.1),
          f"{CONV}.alpha": torch.tensor(2.0), f"{CONV}.dora_scale": torch.rand(32, 1, 1, 1, generator=g) + 0.5}
    adapter = _load(pipe, tmp_path, sd)
    lin, conv = _modules(pipe)
    assert lin.use_dora[adapter.name] and conv.use_dora[adapter.name]
    x, xc = torch.randn(3, 64, generator=g), torch.randn(1, 32, 8, 8, generator=g)
    with torch.no_grad():
        merged = w + 0.5 * sd[f"{LIN}.lora_up.weight"] @ sd[f"{LIN}.lora_down.weight"]
        dora = sd[f"{LIN}.dora_scale"] * merged / merged.norm(dim=1, keepdim=True)
        torch.testing.assert_close(lin(x), x @ dora.T, atol=1e-4, rtol=1e-4)
        delta = (sd[f"{CONV}.lora_up.weight"].reshape(32, R) @ sd[f"{CONV}.lora_down.weight"].reshape(R, -1))
        merged = cw + 0.5 * delta.reshape(32, 32, 3, 3)
        dora = sd[f"{CONV}.dora_scale"] * merged / merged.reshape(32, -1).norm(dim=1).reshape(32, 1, 1, 1)
        torch.testing.assert_close(conv(xc), torch.nn.functional.conv2d(xc, dora, cb, padding=1), atol=1e-4,
                                   rtol=1e-4)


def test_converted_lycoris_weights_are_checked_against_the_blocklist(pipe, tmp_path):
    g = _g(3)
    sd = {f"{LIN}.{k}": v for k, v in _loha(g, 64, 64).items()}
    blocklist = NoBlock(blocked=True)
    with pytest.raises(LikenessBlocked):
        _load(pipe, tmp_path, sd, blocklist)
    assert blocklist.weights_checked == 1


def test_tucker_and_unpaired_modules_are_refused():
    g = _g(4)
    with pytest.raises(LycorisInvalid):
        lycoris_to_lora({f"{CONV}.hada_t1": _rand(g, R, R, 3, 3), f"{CONV}.hada_w1_a": _rand(g, R, 32)})
    with pytest.raises(LycorisInvalid):
        lycoris_to_lora({f"{LIN}.hada_w1_a": _rand(g, 64, R), f"{LIN}.hada_w1_b": _rand(g, R, 64)})


def test_locon_convolution_and_mixed_alphas_run_at_their_own_scales(pipe, tmp_path):
    """kohya LoCon (a 3x3 convolution) next to a linear module of another rank and alpha: each module at
    alpha/rank, which diffusers' alpha_pattern misses for attention modules unless alphas are baked."""
    g = _g(5)
    sd = {f"{LIN}.lora_down.weight": _rand(g, 2, 64), f"{LIN}.lora_up.weight": _rand(g, 64, 2),
          f"{LIN}.alpha": torch.tensor(1.0),
          f"{CONV}.lora_down.weight": _rand(g, R, 32, 3, 3), f"{CONV}.lora_up.weight": _rand(g, 32, R, 1, 1),
          f"{CONV}.alpha": torch.tensor(1.0),
          f"{LIN}.hada_w1_a".replace("attn1_to_q", "attn1_to_k"): _rand(g, 64, 2),  # a LoHa module: converted path
          f"{LIN}.hada_w1_b".replace("attn1_to_q", "attn1_to_k"): _rand(g, 2, 64),
          f"{LIN}.hada_w2_a".replace("attn1_to_q", "attn1_to_k"): _rand(g, 64, 2),
          f"{LIN}.hada_w2_b".replace("attn1_to_q", "attn1_to_k"): _rand(g, 2, 64)}
    adapter = _load(pipe, tmp_path, sd)
    lin, conv = _modules(pipe)
    torch.testing.assert_close(lin.get_delta_weight(adapter.name),
                               0.5 * sd[f"{LIN}.lora_up.weight"] @ sd[f"{LIN}.lora_down.weight"], atol=1e-5, rtol=1e-4)
    expected = 0.25 * (sd[f"{CONV}.lora_up.weight"].reshape(32, R) @ sd[f"{CONV}.lora_down.weight"].reshape(R, -1))
    torch.testing.assert_close(conv.get_delta_weight(adapter.name), expected.reshape(32, 32, 3, 3), atol=1e-5,
                               rtol=1e-4)


def test_plain_kohya_lora_with_per_module_alphas(pipe, tmp_path):
    """Per-module alphas (what training's export writes) each apply to their own module."""
    g = _g(6)
    sd = {f"{LIN}.lora_down.weight": _rand(g, 2, 64), f"{LIN}.lora_up.weight": _rand(g, 64, 2),
          f"{LIN}.alpha": torch.tensor(1.0),
          f"{CONV}.lora_down.weight": _rand(g, R, 32, 3, 3), f"{CONV}.lora_up.weight": _rand(g, 32, R, 1, 1),
          f"{CONV}.alpha": torch.tensor(3.0)}
    adapter = _load(pipe, tmp_path, sd)
    lin, conv = _modules(pipe)
    torch.testing.assert_close(lin.get_delta_weight(adapter.name),
                               0.5 * sd[f"{LIN}.lora_up.weight"] @ sd[f"{LIN}.lora_down.weight"], atol=1e-5, rtol=1e-4)
    expected = 0.75 * (sd[f"{CONV}.lora_up.weight"].reshape(32, R) @ sd[f"{CONV}.lora_down.weight"].reshape(R, -1))
    torch.testing.assert_close(conv.get_delta_weight(adapter.name), expected.reshape(32, 32, 3, 3), atol=1e-5,
                               rtol=1e-4)
