"""A1111-style conditioning on the tiny models: weights, long prompts, BREAK, clip skip, protected safety tokens."""

from __future__ import annotations

import pytest
import torch
from engine_support import one_torch_thread

from genserve.engine.prompt_encoding import CHUNK_LENGTH, MAX_RESCALE, MIN_RESCALE, PromptEncoder, a1111_layer

W = CHUNK_LENGTH + 2  # one chunk's length in the sequence


@pytest.fixture(params=["sd1", "sdxl"])
def pipe(request, pipes):
    return pipes(request.param)[0]


def _diffusers(pipe, text, clip_skip=None):
    """diffusers' own encoding of a short plain prompt (positive embeds, pooled or None)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        embeds, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(text, "cpu", 1, False)
    return embeds, None


def test_plain_and_weight_one_equal_diffusers(pipe):
    with one_torch_thread():
        enc = PromptEncoder(pipe, clip_skip=1 if getattr(pipe, "text_encoder_2", None) is None else 2)
        ref, ref_pooled = _diffusers(pipe, "a photo of a cat, red")
        plain = enc.encode("a photo of a cat, red")
        weighted_one = enc.encode("(a photo of a cat:1.0), red")
    assert torch.equal(plain.embeds, ref)
    assert torch.equal(weighted_one.embeds, plain.embeds)
    if ref_pooled is not None:
        assert torch.equal(plain.pooled, ref_pooled)


def test_weight_scales_the_token_then_restores_the_mean(pipe):
    with one_torch_thread():
        enc = PromptEncoder(pipe)
        plain = enc.encode("a photo of a cat").embeds
        up = enc.encode("a photo of a (cat:1.2)").embeds
    tok = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    assert len(tok) == 1
    pos = 5  # <bos> a photo of a cat
    weights = torch.ones(W)
    weights[pos] = 1.2
    h = pipe.text_encoder.config.hidden_size
    parts = []  # each text encoder's hidden states are normalised on their own
    for z in [plain[..., :h]] + ([plain[..., h:]] if plain.shape[-1] > h else []):
        weighted = z * weights[None, :, None]
        ratio = float(z.mean() / weighted.mean())
        # A1111's factor, unless a mean near zero (random tiny weights can give one) makes it absurd: then
        # the chunk keeps its weights unscaled, as the encoder documents
        parts.append(weighted * ratio if MIN_RESCALE <= ratio <= MAX_RESCALE else weighted)
    expected = torch.cat(parts, dim=-1)
    assert torch.allclose(up, expected, atol=1e-5)
    assert not torch.allclose(up, plain)
    # (x) is 1.1, ((x)) is 1.21, [x] is 1/1.1
    with one_torch_thread():
        assert torch.allclose(enc.encode("a photo of a (cat)").embeds, enc.encode("a photo of a (cat:1.1)").embeds)
        assert torch.allclose(enc.encode("a photo of a ((cat))").embeds, enc.encode("a photo of a (cat:1.21)").embeds)
        assert torch.allclose(enc.encode("a photo of a [cat]").embeds,
                              enc.encode(f"a photo of a (cat:{1 / 1.1!r})").embeds)


def test_a_200_token_prompt_conditions_on_all_its_tokens(pipe):
    words = " ".join(["red", "fox", "snow", "tree"] * 50)  # 200 tokens, no commas
    with one_torch_thread():
        enc = PromptEncoder(pipe)
        long = enc.encode(words)
        changed_end = enc.encode(words.rsplit(" ", 1)[0] + " cat")
        first75 = enc.encode(" ".join(words.split()[:75]))
    assert long.chunks == 3 and long.embeds.shape[1] == 3 * W
    assert torch.equal(long.embeds[:, :W], first75.embeds)  # the first chunk is the first 75 tokens
    assert not torch.allclose(long.embeds[:, 2 * W:], changed_end.embeds[:, 2 * W:])  # the last word counts
    assert torch.equal(long.embeds[:, :2 * W], changed_end.embeds[:, :2 * W])


def test_break_and_comma_backtracking_start_new_chunks(pipe):
    with one_torch_thread():
        enc = PromptEncoder(pipe)
        broken = enc.encode("a red fox BREAK in the snow")
        first = enc.encode("a red fox")
        second = enc.encode("in the snow")
        # 70 tokens, a comma, 10 more: A1111 moves the last 10 to the next chunk
        toks = pipe.tokenizer
        chunks = enc.chunks(toks, " ".join(["fox"] * 70) + ", " + " ".join(["cat"] * 10))
    assert broken.chunks == 2
    assert torch.equal(broken.embeds[:, :W], first.embeds) and torch.equal(broken.embeds[:, W:], second.embeds)
    assert len(chunks) == 2
    cat = toks("cat", add_special_tokens=False).input_ids[0]
    assert chunks[1].tokens[1:11] == [cat] * 10 and cat not in chunks[0].tokens


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_safety_tokens_stay_first_and_unweighted(pipes, family):
    pipe, safety = pipes(family)
    prefix = safety.inject(prompt="", negative_prompt="", mature=True).negative_prompt
    n_prefix = len(pipe.tokenizer(pipe.maybe_convert_prompt(prefix, pipe.tokenizer), add_special_tokens=False).input_ids)
    with one_torch_thread():
        enc = PromptEncoder(pipe)
        alone = enc.encode("", prefix)
        hostile = enc.encode(", (ugly:1.8), [[[blurry]]] BREAK (bad hands:0.1), " + "x " * 100, prefix)
        plain_user = enc.encode(", ugly, blurry", prefix)
    k = 1 + n_prefix  # <bos> and the safety tokens
    assert torch.equal(hostile.embeds[:, :k], alone.embeds[:, :k])
    assert torch.equal(plain_user.embeds[:, :k], alone.embeds[:, :k])
    chunk0 = enc.chunks(pipe.tokenizer, ", (ugly:1.8)", prefix)[0]
    assert chunk0.multipliers[1:k] == [1.0] * n_prefix and all(chunk0.protected[:k]) and not any(chunk0.protected[k:])


def test_sdxl_clip_skip_uses_the_layer_a1111_and_comfyui_use(pipes):
    # ComfyUI's SDXL CLIP: layer "penultimate" (clip_g) / layer_idx -2 (clip_l); CLIPSetLastLayer(-N) selects -N.
    # A1111: SDXL always reads the penultimate layer; Civitai forces clipSkip 2 for SDXL.
    assert a1111_layer(True, 1) == -2 and a1111_layer(True, 2) == -2 and a1111_layer(True, 3) == -3
    assert a1111_layer(False, 1) is None and a1111_layer(False, 2) == -2  # SD1: last layer, then the penultimate
    pipe, _ = pipes("sdxl")
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with one_torch_thread(), torch.no_grad():
        penultimate = torch.cat([pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                                 pipe.text_encoder_2(ids2, output_hidden_states=True).hidden_states[-2]], dim=-1)
        two = PromptEncoder(pipe, clip_skip=2).encode("a cat").embeds
        three = PromptEncoder(pipe, clip_skip=3).encode("a cat").embeds
    assert torch.equal(two, penultimate)
    assert not torch.allclose(three, penultimate)


def test_a_chunk_whose_mean_is_near_zero_stays_finite(pipes):
    # on the tiny SD1 model this chunk's weighted mean is ~0: A1111's unguarded rescale gives inf
    pipe, _ = pipes("sd1")
    with one_torch_thread():
        cond = PromptEncoder(pipe).encode("a (red:1.3) fox")
    assert bool(torch.isfinite(cond.embeds).all())
