"""What an uploaded file is, from its header alone: lies about tensors refused, kind, LoRA flavour and
family told from the keys, declared kind/family checked; AIR aliases parsed to one canonical form."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from genserve.resources.air import AirInvalid, canonical_air, parse_air
from genserve.resources.inspect import (
    FamilyMismatch,
    FamilyUndetected,
    FamilyUnsupported,
    LycorisUnsupported,
    NotSafetensorsFile,
    ResourceKindMismatch,
    ResourceKindUnknown,
    SafetensorsHeaderInvalid,
    inspect_file,
    read_header,
)
from genserve.resources.models import ResourceKind
from safety.hashing import file_hashes

SD1_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
SDXL_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


def _save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _raw(path, header: dict, payload: bytes):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + payload)
    return path


def _pair(module, r, out, inp, conv=False):
    down = torch.zeros(r, inp, 3, 3) if conv else torch.zeros(r, inp)
    up = torch.zeros(out, r, 1, 1) if conv else torch.zeros(out, r)
    return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": torch.tensor(1.0)}


# ---- header truth ---------------------------------------------------------------------------------

def test_a_truthful_file_reads_and_hashes(tmp_path):
    path = _save(tmp_path / "a.safetensors", _pair(SD1_K, 4, 320, 768), {"ss_network_dim": "4"})
    found = inspect_file(path)
    hashes = file_hashes(path)
    assert (found.kind, found.family, found.format, found.layout) == (ResourceKind.lora, "sd1", "lora", "kohya")
    assert (found.sha256, found.tensor_sha256) == (hashes.sha256, hashes.tensor_sha256)
    assert found.autov2 == hashes.sha256[:10].upper() and found.autov3 == hashes.tensor_sha256[:12].upper()
    assert found.metadata == {"ss_network_dim": "4"}


@pytest.mark.parametrize("case", ["overlap", "gap", "short_length", "past_end", "trailing", "dtype", "shape",
                                  "duplicate", "metadata", "negative"])
def test_headers_that_lie_are_refused(tmp_path, case):
    a = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    payload = bytes(32)
    header = {"a": a, "b": b}
    if case == "overlap":
        header["b"] = {**b, "data_offsets": [8, 24]}
        payload = bytes(24)
    elif case == "gap":
        header["b"] = {**b, "data_offsets": [20, 36]}
        payload = bytes(36)
    elif case == "short_length":
        header["a"] = {**a, "shape": [2, 3]}  # 24 bytes claimed by the shape, 16 by the offsets
    elif case == "past_end":
        payload = bytes(20)
    elif case == "trailing":
        payload = bytes(40)
    elif case == "dtype":
        header["a"] = {**a, "dtype": "Q4_K"}
    elif case == "shape":
        header["a"] = {**a, "shape": [2, "2"]}
    elif case == "negative":
        header["a"] = {**a, "data_offsets": [16, 0]}
    elif case == "metadata":
        header["__metadata__"] = {"n": 3}
    if case == "duplicate":
        body = b'{"a": %s, "a": %s}' % (json.dumps(a).encode(), json.dumps(a).encode())
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(16))
    else:
        path = _raw(tmp_path / "x.safetensors", header, payload)
    with pytest.raises(SafetensorsHeaderInvalid) as info:
        read_header(path)
    assert info.value.code == "safetensors_header_invalid"


def test_pickles_and_other_files_are_not_safetensors(tmp_path):
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}))
    zipped = tmp_path / "model.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    for path in (pkl, zipped):
        with pytest.raises(NotSafetensorsFile) as info:
            inspect_file(path)
        assert info.value.code == "not_safetensors"


# ---- kinds and families ---------------------------------------------------------------------------

def test_lora_flavours_and_layouts(tmp_path):
    g = torch.zeros
    cases = {
        "kohya": (_pair(SD1_K, 4, 320, 768), ("lora", "kohya", "sd1")),
        "locon": ({**_pair(SD1_K, 4, 320, 768), **_pair("lora_unet_down_blocks_0_resnets_0_conv1", 4, 320, 320, True)},
                  ("locon", "kohya", "sd1")),
        "dora": ({**_pair(SD1_K, 4, 320, 768), f"{SD1_K}.dora_scale": g(320, 1)}, ("dora", "kohya", "sd1")),
        "peft": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": g(4, 2048),
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": g(640, 4)},
                 ("lora", "peft", "sdxl")),
        "loha": ({f"{SDXL_K}.hada_w1_a": g(640, 4), f"{SDXL_K}.hada_w1_b": g(4, 2048),
                  f"{SDXL_K}.hada_w2_a": g(640, 4), f"{SDXL_K}.hada_w2_b": g(4, 2048), f"{SDXL_K}.alpha": g(())},
                 ("loha", "lycoris", "sdxl")),
        "lokr": ({f"{SD1_K}.lokr_w1": g(8, 8), f"{SD1_K}.lokr_w2_a": g(40, 4), f"{SD1_K}.lokr_w2_b": g(4, 96)},
                 ("lokr", "lycoris", "sd1")),
        "te2": ({**_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 4, 1280, 1280)},
                ("lora", "kohya", "sdxl")),
    }
    for name, (tensors, (fmt, layout, family)) in cases.items():
        found = inspect_file(_save(tmp_path / f"{name}.safetensors", tensors))
        assert (found.kind, found.format, found.layout, found.family) == (ResourceKind.lora, fmt, layout, family), name


def test_embeddings_and_checkpoints(tmp_path, tiny_models):
    sd1 = inspect_file(_save(tmp_path / "ti.safetensors", {"emb_params": torch.zeros(3, 768)}))
    assert (sd1.kind, sd1.family, sd1.vectors) == (ResourceKind.embedding, "sd1", 3)
    xl = inspect_file(_save(tmp_path / "ti-xl.safetensors", {"clip_l": torch.zeros(2, 768),
                                                             "clip_g": torch.zeros(2, 1280)}))
    assert (xl.kind, xl.family, xl.vectors) == (ResourceKind.embedding, "sdxl", 2)
    for family in ("sd1", "sdxl"):
        found = inspect_file(tiny_models[family].single_file)
        assert (found.kind, found.family, found.layout) == (ResourceKind.checkpoint, family, "ldm")


def test_vae_files_in_either_layout_are_vaes_of_the_declared_family(tmp_path, tiny_models):
    from genserve.tinymodels import write_tiny_vae

    for layout in ("ldm", "diffusers"):
        path = write_tiny_vae(tmp_path / f"{layout}.safetensors", layout=layout)
        with pytest.raises(FamilyUndetected):  # SD1 and SDXL share the VAE architecture
            inspect_file(path)
        found = inspect_file(path, declared_family="sdxl")
        assert (found.kind, found.family, found.format, found.layout) == (ResourceKind.vae, "sdxl", "vae", layout)
    prefixed = _save(tmp_path / "cut.safetensors", {"first_stage_model.encoder.conv_in.weight": torch.zeros(2),
                                                    "first_stage_model.decoder.conv_in.weight": torch.zeros(2)})
    assert inspect_file(prefixed, declared_kind="vae", declared_family="sd1").layout == "ldm"
    flux = _save(tmp_path / "flux.safetensors", {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
                                                 "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)})
    with pytest.raises(FamilyUnsupported):
        inspect_file(flux, declared_family="sdxl")
    # a checkpoint holds a VAE too, but it is a checkpoint; an encoder alone is no VAE
    assert inspect_file(tiny_models["sd1"].single_file).kind is ResourceKind.checkpoint
    with pytest.raises(ResourceKindUnknown):
        inspect_file(_save(tmp_path / "half.safetensors", {"encoder.conv_in.weight": torch.zeros(2),
                                                                  "encoder.conv_out.weight": torch.zeros(2)}),
                     declared_family="sd1")


def test_declared_kind_and_family_are_checked_against_the_keys(tmp_path):
    path = _save(tmp_path / "a.safetensors", _pair(SD1_K, 4, 320, 768))
    with pytest.raises(FamilyMismatch) as info:
        inspect_file(path, declared_family="sdxl")
    assert info.value.details == {"declared": "sdxl", "detected": "sd1"}
    with pytest.raises(ResourceKindMismatch):
        inspect_file(path, declared_kind="checkpoint")
    # keys that do not tell the family: the declaration decides, and without one the upload is refused
    vague = _save(tmp_path / "v.safetensors", _pair("lora_unet_mid_block_attentions_0_proj_in", 4, 64, 64))
    assert inspect_file(vague, declared_family="sdxl").family == "sdxl"
    with pytest.raises(FamilyUndetected):
        inspect_file(vague)
    sd2 = _save(tmp_path / "sd2.safetensors", _pair(SD1_K, 4, 320, 1024))
    with pytest.raises(FamilyUnsupported):
        inspect_file(sd2)
    mixed = _save(tmp_path / "m.safetensors", {**_pair(SD1_K, 4, 320, 768),
                                                **_pair(SD1_K.replace("blocks_1", "blocks_2"), 4, 640, 2048)})
    with pytest.raises(FamilyMismatch):
        inspect_file(mixed)


def test_unknown_tensors_and_unsupported_lycoris_are_refused(tmp_path):
    stray = _save(tmp_path / "s.safetensors", {**_pair(SD1_K, 4, 320, 768), "vae.encoder.weight": torch.zeros(2)})
    with pytest.raises(ResourceKindUnknown):
        inspect_file(stray)
    tucker = _save(tmp_path / "t.safetensors", {f"{SD1_K}.hada_w1_a": torch.zeros(4, 4),
                                                 f"{SD1_K}.hada_t1": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(LycorisUnsupported):
        inspect_file(tucker)
    nothing = _save(tmp_path / "n.safetensors", {"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ResourceKindUnknown):
        inspect_file(nothing)


# ---- AIR ------------------------------------------------------------------------------------------

def test_air_aliases_are_canonical():
    air = parse_air("urn:air:SDXL:lora:civitai:328553@368189")
    assert (air.family, air.kind, air.source, air.id, air.version) == ("sdxl", ResourceKind.lora, "civitai",
                                                                       "328553", "368189")
    assert canonical_air("urn:air:pony:lycoris:CivitAI:1@2") == "urn:air:sdxl:lora:civitai:1@2"
    assert canonical_air("urn:air:sd1:embedding:civitai:7") == "urn:air:sd1:embedding:civitai:7"
    assert parse_air("urn:air:sdxl:vae:civitai:1@2").kind is ResourceKind.vae
    for bad in ("urn:air:flux1:lora:civitai:1@2", "urn:air:sdxl:hypernet:civitai:1@2", "urn:air:sdxl:lora:civitai",
                "civitai:1@2", "urn:air:sdxl:lora:civitai:1@2@3"):
        with pytest.raises(AirInvalid):
            parse_air(bad)
