"""Likeness blocklist: hashes, weight fingerprints and their robustness, live updates, safe reading."""

from __future__ import annotations

import pickle

import pytest
import torch
from likeness_fixtures import (
    add_noise,
    cast,
    change_alpha,
    mix_basis,
    random_lora,
    refactor,
    rescale,
    sd1_modules,
    sdxl_modules,
    sgm_renamed,
    to_diffusers,
    to_kohya,
    to_peft,
    write,
)

from safety.errors import NotSafetensors
from safety.likeness import Fingerprint, LikenessBlocklist, LikenessMatch, file_hashes, fingerprint_lora
from safety.lora_format import LoraFormatError, canonical_module_name, read_lora

FAMILIES = {"sd1": (sd1_modules, True), "sdxl": (sdxl_modules, False)}


def evasions(base, sd1: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The same likeness LoRA, reworked in every way that defeats a file or tensor hash."""
    kohya = to_kohya(base, sd1=sd1)
    renamed = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in kohya.items()}
    out = {
        "renamed keys (lora_down/up -> lora_A/B)": renamed,
        "kohya -> diffusers": to_diffusers(base),
        "kohya -> PEFT": to_peft(base),
        "kohya -> PEFT with adapter name": to_peft(base, adapter="default"),
        "alpha ×4 with up ÷4": to_kohya(change_alpha(base, 4.0), sd1=sd1),
        "uniform rescale ×3": to_kohya(rescale(base, 3.0), sd1=sd1),
        "negated (used at strength -1)": to_kohya(rescale(base, -1.0), sd1=sd1),
        "re-factorised up·Q, Q⁻¹·down": to_kohya(mix_basis(base), sd1=sd1),
        "SVD re-factorised at rank 16 (padded)": to_kohya(refactor(base, 16), sd1=sd1),
        "SVD re-factorised at rank 4 (truncated)": to_kohya(refactor(base, 4), sd1=sd1),
        "fp16 cast": to_kohya(cast(base, torch.float16), sd1=sd1),
        "bf16 cast": to_kohya(cast(base, torch.bfloat16), sd1=sd1),
        "1% noise": to_kohya(add_noise(base, 0.01), sd1=sd1),
        "1% noise + bf16 + diffusers": to_diffusers(cast(add_noise(base, 0.01), torch.bfloat16)),
    }
    if not sd1:
        out["SGM U-Net names"] = sgm_renamed(kohya)
    return out


@pytest.fixture
def blocklist(db):
    return LikenessBlocklist(db.session)


def test_file_hash_and_tensor_hash(blocklist, tmp_path):
    base = random_lora(sd1_modules(), seed=0)
    original = write(tmp_path / "jane.safetensors", to_kohya(base), {"ss_output_name": "jane"})
    assert blocklist.check(original) is None
    entry_id = blocklist.add(original, "Jane Roe", "real person, no consent", source="report-17", created_by="mod-a")

    hit = blocklist.check(original)
    assert hit == LikenessMatch(entry_id, "Jane Roe", "sha256", 1.0, source="report-17", reason="real person, no consent")
    assert blocklist.check(original.read_bytes()).method == "sha256"

    # Only the metadata changes: the whole-file hash differs, the tensor payload hash does not.
    edited = write(tmp_path / "renamed.safetensors", to_kohya(base), {"ss_output_name": "totally-not-jane"})
    h0, h1 = file_hashes(original), file_hashes(edited)
    assert h0.sha256 != h1.sha256 and h0.tensor_sha256 == h1.tensor_sha256
    hit = blocklist.check(edited)
    assert (hit.entry_id, hit.method) == (entry_id, "tensor_sha256")


def test_tensor_hash_is_payload_sha256(tmp_path):
    import hashlib
    import struct

    data = write(tmp_path / "a.safetensors", to_kohya(random_lora(sd1_modules()[:3])), {"k": "v"}).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    hashes = file_hashes(data)
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.tensor_sha256 == hashlib.sha256(data[8 + n:]).hexdigest()
    assert hashes.autov3 == hashes.tensor_sha256[:12].upper()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_evasion_is_caught_by_fingerprint(blocklist, tmp_path, family):
    modules, sd1 = FAMILIES[family]
    base = random_lora(modules(), seed=0)
    entry_id = blocklist.add(write(tmp_path / "base.safetensors", to_kohya(base, sd1=sd1)), "Jane Roe", "likeness")
    missed = {}
    for i, (name, sd) in enumerate(evasions(base, sd1).items()):
        hit = blocklist.check(write(tmp_path / f"v{i}.safetensors", sd))
        # A pure rename may leave the tensor payload byte-identical (caught by its hash); the weight
        # fingerprint must catch every variant on its own as well.
        by_weights = blocklist.match_fingerprint(fingerprint_lora(sd))
        if hit is None or hit.entry_id != entry_id or by_weights is None or by_weights.entry_id != entry_id:
            missed[name] = (hit, by_weights)
        else:
            assert by_weights.similarity >= blocklist.config.containment_threshold
    assert not missed, f"evasions not caught: {missed}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unrelated_loras_are_not_caught(blocklist, tmp_path, family):
    modules, sd1 = FAMILIES[family]
    for seed in range(3):  # several blocklisted LoRAs...
        blocklist.add(write(tmp_path / f"b{seed}.safetensors", to_kohya(random_lora(modules(), seed=seed), sd1=sd1)),
                      f"person {seed}", "likeness")
    others = {
        # ...and independent LoRAs on the same base, same names and shapes, in every layout
        **{f"same shapes seed {s}": to_kohya(random_lora(modules(), seed=s), sd1=sd1) for s in range(10, 16)},
        "same shapes, diffusers": to_diffusers(random_lora(modules(), seed=20)),
        "same shapes, rank 16": to_kohya(random_lora(modules(), seed=21, rank=16), sd1=sd1),
        "other family": to_kohya(random_lora(FAMILIES["sdxl" if sd1 else "sd1"][0](), seed=0), sd1=not sd1),
        "unet attention only": to_kohya(random_lora([m for m in modules() if ".attn" in m[0]], seed=22), sd1=sd1),
        "a single module": to_kohya(random_lora(modules()[:1], seed=23), sd1=sd1),
    }
    for name, sd in others.items():
        hit = blocklist.check(write(tmp_path / "other.safetensors", sd))
        assert hit is None, f"{name} matched {hit}"


def test_additions_visible_to_a_running_instance(db, tmp_path):
    from genserve.core.db import Database

    checker = LikenessBlocklist(db.session)  # e.g. a worker replica, created before the entry exists
    lora = write(tmp_path / "x.safetensors", to_kohya(random_lora(sd1_modules(), seed=5)))
    variant = write(tmp_path / "y.safetensors", to_diffusers(add_noise(random_lora(sd1_modules(), seed=5), 0.01)))
    assert checker.check(lora) is None and checker.check(variant) is None

    other_process = Database(db.url)  # a moderator's CLI, another connection pool
    try:
        entry_id = LikenessBlocklist(other_process.session).add(lora, "Jane Roe", "likeness")
    finally:
        other_process.dispose()
    assert checker.check(lora).entry_id == entry_id
    assert checker.check(variant).method == "fingerprint"

    # Entries removed behind its back (e.g. by an operator) drop out as well.
    from sqlalchemy import text

    with db.transaction() as s:
        s.execute(text("DELETE FROM safety_likeness_entries"))
    assert checker.check(lora) is None


def test_check_state_dict_matches_a_loaded_lora(blocklist, tmp_path):
    base = random_lora(sdxl_modules(), seed=3)
    blocklist.add(write(tmp_path / "b.safetensors", to_kohya(base, sd1=False)), "Jane Roe", "likeness")
    hit = blocklist.check_state_dict(to_peft(cast(base, torch.float16)))
    assert hit is not None and hit.method == "fingerprint" and hit.rule_id == "likeness.fingerprint"
    assert blocklist.check_state_dict(to_peft(random_lora(sdxl_modules(), seed=4))) is None


def test_non_safetensors_is_refused(blocklist, tmp_path):
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0, 2.0]}))
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("definitely not tensors")
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    truncated = write(tmp_path / "t.safetensors", to_kohya(random_lora(sd1_modules()[:2])))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    for bad in (pickled, text_file, huge_header, b"\x00" * 4, tmp_path / "missing.safetensors"):
        with pytest.raises(NotSafetensors):
            blocklist.check(bad)
        with pytest.raises(NotSafetensors):
            blocklist.add(bad, "Jane Roe", "likeness")
    with pytest.raises(NotSafetensors):  # header fine, payload cut short: safetensors refuses it
        blocklist.check(truncated)
    assert blocklist.list() == []


def test_resource_without_lora_modules_still_blocks_by_hash(blocklist, tmp_path):
    embedding = write(tmp_path / "ti.safetensors", {"emb_params": torch.randn(2, 48)})
    entry_id = blocklist.add(embedding, "Jane Roe", "likeness embedding")
    [entry] = blocklist.list()
    assert entry.fingerprint_modules == 0
    assert blocklist.check(embedding).entry_id == entry_id
    assert blocklist.check(write(tmp_path / "ti2.safetensors", {"emb_params": torch.randn(2, 48)})) is None


def test_canonical_names_agree_across_layouts():
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    names = {
        canonical_module_name(f"lora_unet_{path.replace('.', '_')}"),
        canonical_module_name(f"unet.{path}"),
        canonical_module_name(f"base_model.model.{path}"),
        canonical_module_name(f"unet.{path.replace('to_out.0', 'processor.to_out')}"),  # attention-processor layout
    }
    assert names == {"unet.down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"}
    te = {canonical_module_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
          canonical_module_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
          canonical_module_name("text_encoder.encoder.layers.0.self_attn.q_proj")}
    assert te == {"te1.encoder_layers_0_self_attn_q_proj"}
    assert canonical_module_name("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "te2.encoder_layers_0_mlp_fc1"


def test_read_lora_layouts_give_the_same_delta():
    base = random_lora(sd1_modules(), seed=1, alpha=2.0)  # scale = 2 / 8
    path = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    want = base.delta(path)
    for sd in (to_kohya(base), to_diffusers(base)):
        m = read_lora(sd)["unet.mid_block_attentions_0_transformer_blocks_0_ff_net_2"]
        got = m.scale * m.up_matrix().double() @ m.down_matrix().double()
        torch.testing.assert_close(got, want)
    assert read_lora(to_kohya(base))["unet.mid_block_attentions_0_transformer_blocks_0_ff_net_2"].scale == 0.25


def test_peft_alpha_from_adapter_metadata():
    import json

    base = random_lora(sd1_modules()[:2], alpha=None)
    meta = {"lora_adapter_metadata": json.dumps({"unet_lora_adapter_metadata": {"r": 8, "lora_alpha": 16}})}
    mods = read_lora(to_diffusers(base), meta)
    assert {m.scale for m in mods.values()} == {2.0}
    assert {m.scale for m in read_lora(to_diffusers(base)).values()} == {1.0}


def test_malformed_loras_fail_closed():
    base = to_kohya(random_lora(sd1_modules()[:2]))
    half = {k: v for k, v in base.items() if "lora_up" not in k}
    with pytest.raises(LoraFormatError):
        fingerprint_lora(half)
    bad_rank = dict(base)
    key = next(k for k in base if k.endswith("lora_down.weight"))
    bad_rank[key] = torch.randn(3, base[key].shape[1])
    with pytest.raises(LoraFormatError):
        fingerprint_lora(bad_rank)
    nan = dict(base)
    nan[key] = torch.full_like(base[key], float("nan"))
    with pytest.raises(LoraFormatError):
        fingerprint_lora(nan)
    both_layouts = {**base, **to_diffusers(random_lora(sd1_modules()[:2]))}
    with pytest.raises(LoraFormatError):
        fingerprint_lora(both_layouts)


def test_fingerprint_is_deterministic_and_serialisable():
    sd = to_kohya(random_lora(sdxl_modules(), seed=9), sd1=False)
    a, b = fingerprint_lora(sd), fingerprint_lora(sd)
    assert a.to_bytes() == b.to_bytes() and a.modules == len(sdxl_modules())
    back = Fingerprint.from_bytes(a.to_bytes(), a.meta)
    assert back.similarity(a) == pytest.approx(1.0, abs=1e-6)
    untrained = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in sd.items()}
    assert fingerprint_lora(untrained).empty


def test_shipped_likeness_config_loads_and_weakening_values_are_refused(tmp_path):
    from pathlib import Path

    from safety.errors import RulesInvalid
    from safety.likeness import LikenessConfig

    shipped = LikenessConfig.load(Path(__file__).parents[1] / "configs" / "safety" / "likeness.yaml")
    assert 0.2 <= shipped.containment_threshold <= 0.75
    for text in ("containment_threshold: 1.0", "containment_threshold: 0", "containment_threshold: -0.5",
                 "containment_threshold: 0.9", "containment_threshold: 0.05", "fingerprint_threshold: 0.9",
                 "containment_threshold: [0.4]"):
        path = tmp_path / "likeness.yaml"
        path.write_text(text)
        with pytest.raises(RulesInvalid):
            LikenessConfig.load(path)
    path.write_text("containment_threshold: 0.6")
    assert LikenessConfig.load(path).containment_threshold == 0.6
    with pytest.raises(RulesInvalid):
        LikenessConfig.load(tmp_path / "missing.yaml")


def test_entries_with_an_old_fingerprint_version_refuse_weight_checks_until_refingerprinted(db, blocklist, tmp_path):
    from safety.errors import SafetyError
    from safety.store import LikenessEntry

    base = random_lora(sd1_modules(), seed=11)
    old = write(tmp_path / "old.safetensors", to_kohya(base))
    hashes = file_hashes(old)
    with db.transaction() as s:  # as an earlier release stored it
        s.add(LikenessEntry(sha256=hashes.sha256, tensor_sha256=hashes.tensor_sha256, fingerprint=b"\0" * 4096,
                            fingerprint_meta={"version": "lfp1", "modules": 172, "buckets": 16},
                            person="Jane Roe", reason="likeness"))
    [entry] = blocklist.stale_entries()
    assert entry.fingerprint_stale and entry.fingerprint_version == "lfp1"
    assert blocklist.check(old).method == "sha256"  # hashes still match
    variant = write(tmp_path / "variant.safetensors", to_diffusers(rescale(base, 2.0)))
    with pytest.raises(SafetyError) as err:
        blocklist.check(variant)
    assert err.value.code == "likeness_fingerprint_stale"

    with pytest.raises(SafetyError) as err:  # only the entry's own file may give it a fingerprint
        blocklist.refingerprint(entry.id, variant)
    assert err.value.code == "likeness_file_mismatch"
    renewed = blocklist.refingerprint(entry.id, old)
    assert not renewed.fingerprint_stale and renewed.fingerprint_modules == len(sd1_modules())
    assert blocklist.stale_entries() == []
    hit = blocklist.check(variant)
    assert (hit.entry_id, hit.method) == (entry.id, "fingerprint")


def test_a_request_reuses_single_file_verdicts_only_for_the_same_weights(blocklist, tmp_path):
    base = random_lora(sd1_modules(), seed=12)
    blocklist.add(write(tmp_path / "b.safetensors", to_kohya(base)), "Jane Roe", "likeness")
    noisy = add_noise(base, 0.05)
    # the same tensor payload under names of no layer: no fingerprint match ...
    shuffled = {k.replace("lora_unet_", "lora_unet_zz_").replace("lora_te_", "lora_te_zz_"): v
                for k, v in to_kohya(noisy).items()}
    first = blocklist.prepare(write(tmp_path / "x.safetensors", shuffled))
    assert blocklist.check_combined([(first, 1.0)]) is None
    # ... then the same payload under the right names: a verdict cached for the first must not answer
    second = blocklist.prepare(write(tmp_path / "y.safetensors", to_kohya(noisy)))
    assert second.hashes.tensor_sha256 == first.hashes.tensor_sha256
    assert blocklist.check_combined([(second, 1.0)]).method == "fingerprint"
    # a repeated request is answered the same from the cache
    assert blocklist.check_combined([(second, 1.0)]).method == "fingerprint"
    assert blocklist.check_combined([(first, 1.0)]) is None


def test_a_full_verdict_cache_is_emptied_without_losing_the_request_in_hand(blocklist, tmp_path, monkeypatch):
    import safety.likeness.blocklist as module

    monkeypatch.setattr(module, "_MAX_VERDICTS", 1)
    base = random_lora(sd1_modules(), seed=13)
    blocklist.add(write(tmp_path / "b.safetensors", to_kohya(base)), "Jane Roe", "likeness")
    copies = [blocklist.prepare(write(tmp_path / f"c{i}.safetensors", to_diffusers(rescale(base, 1.0 + i))))
              for i in range(3)]
    for _ in range(2):  # the second round finds the cache emptied by the first
        hit = blocklist.check_combined([(c, 1.0) for c in copies])
        assert hit is not None and hit.method in ("fingerprint", "combined")
        assert all(blocklist.check_combined([(c, 1.0)]).method == "fingerprint" for c in copies)
