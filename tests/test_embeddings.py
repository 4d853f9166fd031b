"""Mandatory safety embeddings on tiny SD1/SDXL pipelines: loaded into every text encoder, verified,
injected first into the negative prompt, and impossible to remove, reweight or displace from a request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from safety.embeddings import EmbeddingSpec, SafetyEmbeddings
from safety.errors import EmbeddingUnavailable, NotSafetensors

MODELS_YAML = Path(__file__).resolve().parents[1] / "configs" / "models.yaml"
GENERAL, MINOR = "<gs-safe-neg>", "<gs-safe-minor>"
HOSTILE_NEGATIVE = "(<gs-safe-neg>:0), [<GS-SAFE-MINOR>|x], <gs‐safe‐neg>_1, ｇｓ－ｓａｆｅ－ｎｅｇ, blurry"
HOSTILE_PROMPT = "a cat <gs-safe-neg> (<gs-safe-minor>:1.5) on a sofa"


def _pipeline(tiny_models, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(tiny_models[family].diffusers_dir, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeddings(tiny_models, family: str) -> SafetyEmbeddings:
    config = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))["families"][family]["safety_embeddings"]
    models_dir = tiny_models[family].embeddings["general"].parent.parent
    return SafetyEmbeddings.from_config(family, config, models_dir)


def _encoders(pipe):
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _negative_embeds(pipe, negative: str) -> torch.Tensor:
    with torch.no_grad():
        out = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=negative)
    return out[1]  # negative_prompt_embeds (SD1 and SDXL)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def loaded(request, tiny_models):
    family = request.param
    pipe = _pipeline(tiny_models, family)
    emb = _embeddings(tiny_models, family)
    emb.load_into(pipe)
    return family, pipe, emb


def test_tokens_and_rows_match_the_files_in_every_encoder(loaded):
    family, pipe, emb = loaded
    emb.check(pipe)
    emb.load_into(pipe)  # idempotent: verified, not loaded twice
    files = {kind: load_file(str(spec.path)) for kind, spec in (("general", emb.general), ("minor", emb.minor))}
    keys = ["emb_params"] if family == "sd1" else ["clip_l", "clip_g"]
    assert len(_encoders(pipe)) == len(keys)
    for (tokenizer, encoder), key in zip(_encoders(pipe), keys, strict=True):
        for kind, token in (("general", GENERAL), ("minor", MINOR)):
            vectors = files[kind][key]
            names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
            ids = tokenizer.convert_tokens_to_ids(names)
            assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), vectors)
    assert emb.reserved_tokens == (GENERAL, MINOR)


def test_injected_tokens_reach_every_text_encoder(loaded):
    family, pipe, emb = loaded
    prompt, negative = emb.inject(prompt=HOSTILE_PROMPT, negative_prompt=HOSTILE_NEGATIVE, mature=True)
    assert negative.startswith(f"{GENERAL} {MINOR}, ")
    for tokenizer, _ in _encoders(pipe):
        vocab = tokenizer.get_vocab()
        ours = [vocab[t] for t in vocab if t.startswith(("<gs-safe-neg>", "<gs-safe-minor>"))]
        # What the pipeline really tokenises: diffusers expands multi-vector tokens first.
        ids = tokenizer(pipe.maybe_convert_prompt(negative, tokenizer), truncation=True,
                        max_length=tokenizer.model_max_length).input_ids
        n_ours = len(ours)
        assert ids[1:1 + n_ours] == sorted(ours, key=ids.index)  # first after BOS, in order
        assert sorted(ids[1:1 + n_ours]) == sorted(ours)
        assert not set(ids[1 + n_ours:]) & set(ours)  # exactly once: the user's copies are gone
        prompt_ids = tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer)).input_ids
        assert not set(prompt_ids) & set(ours)

    # Rows from the files really flow into the encoders' output: changing one encoder's rows
    # changes exactly that encoder's part of the negative embeddings.
    before = _negative_embeds(pipe, negative)
    without = _negative_embeds(pipe, negative.split(", ", 1)[1])
    assert not torch.allclose(before, without)
    widths = [enc.config.hidden_size for _, enc in _encoders(pipe)]
    offset = 0
    for (tokenizer, encoder), width in zip(_encoders(pipe), widths, strict=True):
        weight = encoder.get_input_embeddings().weight
        row = tokenizer.convert_tokens_to_ids(GENERAL)
        saved = weight.data[row].clone()
        try:
            # not a constant shift: the encoder's first LayerNorm would cancel that
            weight.data[row] += torch.randn(saved.shape, generator=torch.Generator().manual_seed(0))
            changed = _negative_embeds(pipe, negative)
            with pytest.raises(EmbeddingUnavailable, match="differ"):
                emb.check(pipe)
        finally:
            weight.data[row] = saved
        delta = (changed - before).abs()
        assert delta[..., offset:offset + width].max() > 1e-4
        others = torch.cat([delta[..., :offset], delta[..., offset + width:]], dim=-1)
        assert others.numel() == 0 or others.max() == 0
        offset += width
    emb.check(pipe)  # restored


def test_minor_embedding_only_when_mature(loaded):
    _, _, emb = loaded
    assert emb.inject(prompt="a cat", negative_prompt="blurry", mature=False) == ("a cat", f"{GENERAL}, blurry")
    assert emb.inject(prompt="a cat", negative_prompt="", mature=True) == ("a cat", f"{GENERAL} {MINOR}")


def test_long_user_negative_cannot_push_the_tokens_out(loaded):
    _, pipe, emb = loaded
    _, negative = emb.inject(prompt="a cat", negative_prompt="blurry, " * 200, mature=True)
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(negative, pipe.tokenizer), truncation=True,
                         max_length=pipe.tokenizer.model_max_length).input_ids
    assert pipe.tokenizer.convert_tokens_to_ids(GENERAL) in ids and pipe.tokenizer.convert_tokens_to_ids(MINOR) in ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(<gs-safe-neg>:0), blurry", "blurry"),
        ("((<GS-SAFE-NEG>:0.0)), lowres", "lowres"),
        ("blurry, <gs-safe-neg>_1, lowres", "blurry, lowres"),
        ("[<gs-safe-minor>|cat]", "[ |cat]"),
        ("ｇｓ－ｓａｆｅ－ｎｅｇ and g\u200bs-sаfe-neg", "and"),
        ("plain negative, untouched  ,  spacing", "plain negative, untouched  ,  spacing"),
    ],
)
def test_strip_reserved_forms(loaded, text, expected):
    assert loaded[2].strip_reserved(text) == expected


def test_check_fails_without_embeddings_loaded(tiny_models):
    for family in ("sd1", "sdxl"):
        pipe = _pipeline(tiny_models, family)
        with pytest.raises(EmbeddingUnavailable, match="not in the"):
            _embeddings(tiny_models, family).check(pipe)


def test_token_ids_look_up_single_tokens_like_the_vocabulary(loaded):
    from safety.embeddings import token_ids

    _, pipe, embeddings = loaded
    tokenizer = pipe.tokenizer
    vocab = tokenizer.get_vocab()
    safe = embeddings.general.token
    tokens = [safe, "cat</w>", tokenizer.unk_token, "<no-such-token>", f"{safe}_99"]
    assert token_ids(tokenizer, tokens) == [vocab.get(t) for t in tokens]
    assert token_ids(tokenizer, tokens)[:3] == [vocab[safe], vocab["cat</w>"], tokenizer.unk_token_id]


def test_missing_altered_or_wrong_files(tiny_models, tmp_path):
    pipe = _pipeline(tiny_models, "sd1")
    real = _embeddings(tiny_models, "sd1")

    missing = SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, tmp_path / "nope.safetensors"), real.minor)
    with pytest.raises(EmbeddingUnavailable, match="cannot read"):
        missing.load_into(pipe)
    with pytest.raises(NotSafetensors):
        SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, tmp_path / "emb.pt"), real.minor).load_into(pipe)
    sdxl_file = tiny_models["sdxl"].embeddings["general"]
    with pytest.raises(EmbeddingUnavailable, match="needs"):
        SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, sdxl_file), real.minor).load_into(pipe)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(EmbeddingUnavailable):
        SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, garbage), real.minor).load_into(pipe)

    real.load_into(pipe)
    real.check(pipe)
    # The file changes on disk after loading: the loaded rows no longer match it.
    altered = tmp_path / "altered.safetensors"
    tensors = load_file(str(real.general.path))
    save_file({"emb_params": tensors["emb_params"] + 0.5}, str(altered))
    with pytest.raises(EmbeddingUnavailable, match="differ"):
        SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, altered), real.minor).check(pipe)
    # A file with more vectors than were loaded.
    longer = tmp_path / "longer.safetensors"
    save_file({"emb_params": torch.cat([tensors["emb_params"], tensors["emb_params"][:1]])}, str(longer))
    with pytest.raises(EmbeddingUnavailable):
        SafetyEmbeddings("sd1", EmbeddingSpec(GENERAL, longer), real.minor).check(pipe)


def test_sdxl_pipeline_needs_both_encoders(tiny_models):
    pipe = _pipeline(tiny_models, "sdxl")
    emb = _embeddings(tiny_models, "sdxl")
    pipe.text_encoder_2 = None
    with pytest.raises(EmbeddingUnavailable, match="text_encoder_2"):
        emb.load_into(pipe)


def test_bad_configuration_is_refused(tmp_path):
    spec = EmbeddingSpec(GENERAL, tmp_path / "a.safetensors")
    with pytest.raises(EmbeddingUnavailable):
        SafetyEmbeddings("flux", spec, EmbeddingSpec(MINOR, spec.path))
    with pytest.raises(EmbeddingUnavailable):
        SafetyEmbeddings("sd1", spec, spec)
    with pytest.raises(EmbeddingUnavailable):
        SafetyEmbeddings.from_config("sd1", {"general": {"token": GENERAL}}, tmp_path)
