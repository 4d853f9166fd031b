"""Fingerprints of every adapter kind: exact energies, linear sketches, canonical names across layouts,
and files that cannot be fingerprinted refused (fail closed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from likeness_fixtures import (
    add_loras,
    conv_modules,
    kohya_key,
    lokr_native,
    random_lora,
    sd1_modules,
    to_full,
    to_kohya,
    to_locon,
    to_loha,
    to_lokr,
    with_decoys,
    write,
)

from safety.likeness import Fingerprint, LikenessBlocklist, fingerprint_lora, resource_kind
from safety.likeness.fingerprint import DIM, checkpoint_weights
from safety.lora_format import LoraFormatError, LoraFormatUnsupported, canonical_module_name, read_lora

SPEC = sd1_modules()[:12]


def _true_energy(lora) -> dict[str, float]:  # noqa: ANN001
    return {canonical_module_name(kohya_key(p)): float((lora.delta(p) ** 2).sum()) for p in lora.modules}


@pytest.mark.parametrize("encode", [to_kohya, to_loha, to_lokr, to_full], ids=["lora", "loha", "lokr", "full"])
def test_module_energy_is_the_exact_frobenius_norm_of_its_update(encode):
    lora = random_lora(SPEC, seed=1, alpha=2.0)
    fp = fingerprint_lora(encode(lora))
    want = _true_energy(lora)
    assert set(fp.names) == set(want)
    for name, energy in zip(fp.names, fp.energy, strict=True):
        assert energy == pytest.approx(want[name], rel=1e-4)


def test_a_lokr_trained_as_such_has_the_energy_and_sketch_of_its_kronecker_product():
    sd, plain = lokr_native(SPEC, seed=2)
    lokr, lora = fingerprint_lora(sd), fingerprint_lora(to_kohya(plain))
    assert lokr.names == lora.names and lokr.modules > 0
    np.testing.assert_allclose(lokr.energy, lora.energy, rtol=1e-4)
    np.testing.assert_allclose(lokr.sketches, lora.sketches, rtol=1e-3, atol=1e-6 * np.abs(lora.sketches).max())


def test_locon_convolutions_fingerprint_the_flattened_kernel_update():
    spec = conv_modules()
    lora = random_lora(spec, seed=3, rank=4)
    fp = fingerprint_lora(to_locon(lora, {p for p, _, _ in spec}))
    want = _true_energy(lora)
    assert dict(zip(fp.names, fp.energy, strict=True)) == pytest.approx(want, rel=1e-4)
    assert fp.names[0].startswith("unet.down_blocks_0_resnets_0_conv")


def test_combined_sketch_is_the_sketch_of_the_combined_update():
    a, b = random_lora(SPEC, seed=4), random_lora(SPEC[:6], seed=5, rank=4)
    combined = Fingerprint.combine([(fingerprint_lora(to_kohya(a)), 0.7), (fingerprint_lora(to_kohya(b)), -1.5)])
    direct = fingerprint_lora(to_kohya(add_loras(a.map(lambda p, u, d, al: (u * 0.7, d, al)),
                                                 b.map(lambda p, u, d, al: (u * -1.5, d, al)))))
    assert combined.names == direct.names and combined.kind == "combined"
    np.testing.assert_allclose(combined.sketches, direct.sketches, rtol=1e-4, atol=1e-7)
    # the combined energy is the sketch's estimate E‖PᵀΔWR‖² = DIM·‖ΔW‖²: right to within sketch noise
    ratio = combined.energy.sum() / direct.energy.sum()
    assert 0.7 < ratio < 1.4
    assert (combined.sketches**2).sum(1) / DIM == pytest.approx(combined.energy, rel=1e-4)


def test_original_unet_names_map_to_the_diffusers_names():
    pairs = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_proj_in": "unet.down_blocks_2_attentions_1_proj_in",
        "lora_unet_input_blocks_2_0_in_layers_2": "unet.down_blocks_0_resnets_1_conv1",
        "lora_unet_input_blocks_3_0_op": "unet.down_blocks_0_downsamplers_0_conv",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2": "unet.mid_block_attentions_0_transformer_blocks_1_ff_net_2",
        "lora_unet_middle_block_2_out_layers_3": "unet.mid_block_resnets_1_conv2",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k": "unet.up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_3_0_skip_connection": "unet.up_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_output_blocks_2_1_conv": "unet.up_blocks_0_upsamplers_0_conv",
        "lora_unet_output_blocks_5_2_conv": "unet.up_blocks_1_upsamplers_0_conv",
        "lora_unet_time_embed_0": "unet.time_embedding_linear_1",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q":
            "unet.down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1": "te1.encoder_layers_3_mlp_fc1",
        "conditioner.embedders.1.model.transformer.resblocks.7.mlp.c_fc": "te2.encoder_layers_7_mlp_fc1",
        "conditioner.embedders.1.model.transformer.resblocks.7.attn.out_proj": "te2.encoder_layers_7_self_attn_out_proj",
    }
    assert {k: canonical_module_name(k) for k in pairs} == pairs
    # diffusers names are left as they are
    assert canonical_module_name("unet.up_blocks.1.resnets.0.conv1") == "unet.up_blocks_1_resnets_0_conv1"
    # a single-file SDXL checkpoint's fused q/k/v projection splits into the names LoRAs use
    fused = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
    assert checkpoint_weights([fused, "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"]) == {
        "te2.encoder_layers_2_self_attn_q_proj": f"{fused}:0", "te2.encoder_layers_2_self_attn_k_proj": f"{fused}:1",
        "te2.encoder_layers_2_self_attn_v_proj": f"{fused}:2",
        "te2.encoder_layers_2_mlp_fc1": "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"}


@pytest.mark.parametrize("extra", [
    {"lora_unet_x_attn1_to_q.oft_blocks": torch.zeros(4, 8, 8)},
    {"lora_unet_x_attn1_to_q.hada_t1": torch.zeros(4, 4, 3, 3)},
    {"lora_unet_x_attn1_to_q.lokr_t2": torch.zeros(4, 4, 3, 3)},
    {"lora_unet_x_attn1_to_q.dora_scale": torch.ones(1, 32)},  # a magnitude without its direction update
    {"lora_unet_x_attn1_to_q.diff_b": torch.zeros(32)},  # a bias update alone
], ids=["oft", "loha-tucker", "lokr-tucker", "dora-magnitude-only", "bias-only"])
def test_adapter_keys_that_cannot_be_fingerprinted_are_refused(db, tmp_path, extra):
    sd = {**to_kohya(random_lora(SPEC[:2], seed=6)), **extra}
    with pytest.raises(LoraFormatUnsupported) as err:
        fingerprint_lora(sd)
    assert err.value.code == "lora_format_unsupported"
    path = write(tmp_path / "odd.safetensors", sd)
    blocklist = LikenessBlocklist(db.session)
    for call in (blocklist.check, lambda p: blocklist.add(p, "Jane Roe", "likeness")):
        with pytest.raises(LoraFormatUnsupported):
            call(path)
    assert blocklist.list() == []


def test_malformed_lycoris_modules_are_refused():
    loha = to_loha(random_lora(SPEC[:1], seed=7))
    key = next(k for k in loha if k.endswith("hada_w2_b"))
    with pytest.raises(LoraFormatError):
        fingerprint_lora({k: v for k, v in loha.items() if k != key})  # a missing factor
    with pytest.raises(LoraFormatError):
        fingerprint_lora({**loha, key: torch.ones(3, 7)})  # a factor that does not pair
    lokr = to_lokr(random_lora(SPEC[:1], seed=7))
    key = next(k for k in lokr if k.endswith("lokr_w1"))
    with pytest.raises(LoraFormatError):
        fingerprint_lora({**lokr, key.replace("lokr_w1", "lokr_w1_a"): torch.ones(1, 1)})  # full and factorised
    mixed = {**to_kohya(random_lora(SPEC[:1], seed=7)), **to_full(random_lora(SPEC[:1], seed=8))}
    with pytest.raises(LoraFormatError, match="mixes"):
        read_lora(mixed)


def test_decoy_modules_are_dropped_from_a_stored_entry(db, tmp_path):
    lora = random_lora(SPEC, seed=9)
    padded = with_decoys(to_kohya(lora), conv_modules())
    fp = fingerprint_lora(padded)
    assert fp.modules == len(SPEC) + len(conv_modules())
    assert fp.significant().modules == len(SPEC)
    blocklist = LikenessBlocklist(db.session)
    entry = blocklist.get(blocklist.add(write(tmp_path / "padded.safetensors", padded), "Jane Roe", "likeness"))
    assert entry.fingerprint_modules == len(SPEC)
    # the entry still matches the plain LoRA, and the padded file matches an entry of the plain LoRA
    assert blocklist.check(write(tmp_path / "plain.safetensors", to_kohya(lora))).similarity > 0.99


def test_resource_kind_from_tensor_names_and_shapes():
    assert resource_kind({"lora_unet_a.lora_down.weight": (4, 8)}) == "lora"
    assert resource_kind({"lora_unet_a.hada_w1_a": (8, 4)}) == "lora"
    assert resource_kind({"lora_unet_a.oft_blocks": (4, 2, 2)}) == "lora"  # an adapter, even if unreadable
    assert resource_kind({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}) == "checkpoint"
    assert resource_kind({"conv_in.weight": (320, 4, 3, 3), "time_embedding.linear_1.weight": (1280, 320)}) == "checkpoint"
    assert resource_kind({"emb_params": (2, 768)}) == "embedding"
    assert resource_kind({"clip_l": (2, 768), "clip_g": (2, 1280)}) == "embedding"
    assert resource_kind({"w": (3, 3, 3, 3)}) == "unknown"
    assert resource_kind({}) == "unknown"


def test_a_peft_dora_file_is_read_and_fingerprinted_by_its_direction_update():
    from likeness_fixtures import to_peft

    lora = random_lora(SPEC, seed=10)
    plain = to_peft(lora)
    dora = {**plain, **{k.replace(".lora_A.weight", ".lora_magnitude_vector"): torch.rand(v.shape[1]) + 0.5
                        for k, v in plain.items() if k.endswith(".lora_A.weight")}}
    modules = read_lora(dora)
    assert modules and all(m.kind == "dora" for m in modules.values())
    a, b = fingerprint_lora(dora), fingerprint_lora(plain)
    assert a.names == b.names
    np.testing.assert_array_equal(a.sketches, b.sketches)
