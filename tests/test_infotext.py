"""A1111 infotext: rendering, parsing back and the PNG text chunk."""

from __future__ import annotations

import io

from PIL import Image

from genserve.engine.infotext import (
    Infotext,
    autov2,
    autov3,
    build_infotext,
    encode_png,
    parse_hash_list,
    parse_infotext,
    read_png_infotext,
)

SHA = "0123456789abcdef" * 4


def _sample() -> Infotext:
    return build_infotext(
        prompt="a cat, (masterpiece:1.2)\nsecond line",
        negative_prompt="blurry, <gs-safe-neg>, <gs-safe-minor>",
        steps=30, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=123, width=512, height=768,
        model_hash=autov2(SHA), model_name="tiny-sd1", clip_skip=2,
        lora_hashes={"style": autov3(SHA), "face-v2": "abcdefabcdef"},
        hires_scale=2.0, hires_steps=10, hires_denoise=0.5, hires_upscaler="Latent",
    )


def test_render_matches_a1111_layout():
    text = _sample().render()
    prompt1, prompt2, negative, params = text.split("\n")
    assert (prompt1, prompt2) == ("a cat, (masterpiece:1.2)", "second line")
    assert negative == "Negative prompt: blurry, <gs-safe-neg>, <gs-safe-minor>"
    assert params.startswith(
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, "
        "Model hash: 0123456789, Model: tiny-sd1, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, "
        "Hires steps: 10, Hires upscaler: Latent, Lora hashes: \"style: 0123456789ab, face-v2: abcdefabcdef\", "
    )
    assert params.endswith("Version: genserve 0.1.0")


def test_round_trip_through_png():
    info = _sample()
    png = encode_png(Image.new("RGB", (8, 8), "red"), info)
    with Image.open(io.BytesIO(png)) as img:
        assert img.text["parameters"] == info.render()
    back = read_png_infotext(png)
    assert back == parse_infotext(info.render())
    assert back.prompt == info.prompt and back.negative_prompt == info.negative_prompt
    assert parse_hash_list(back.params["Lora hashes"]) == {"style": "0123456789ab", "face-v2": "abcdefabcdef"}
    assert back.params["Seed"] == "123" and back.params["Size"] == "512x768" and back.params["Clip skip"] == "2"
    assert set(back.params) == set(info.params)


def test_no_negative_and_no_clip_skip_lines():
    info = build_infotext(prompt="p", negative_prompt="", steps=2, sampler="Euler", cfg_scale=7.0, seed=1,
                          width=64, height=64, model_hash="abc", model_name="m")
    text = info.render()
    assert "Negative prompt" not in text and "Clip skip" not in text and "Hires" not in text
    assert "CFG scale: 7," in text
    back = parse_infotext(text)
    assert back.prompt == "p" and back.negative_prompt == "" and back.params["Steps"] == "2"


def test_prompt_without_parameters_line():
    back = parse_infotext("just a prompt\nNegative prompt: bad")
    assert back.prompt == "just a prompt" and back.negative_prompt == "bad" and back.params == {}


def test_png_without_chunk():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert read_png_infotext(buf.getvalue()) is None


def test_a_chosen_vae_is_written_after_the_model_as_a1111_does_and_read_back():
    from genserve.engine.infotext import request_fields

    text = build_infotext(prompt="a cat", negative_prompt="", steps=20, sampler="Euler a", cfg_scale=7, seed=1,
                          width=512, height=512, model_hash=autov2(SHA), model_name="m", vae_name="sdxl_vae, fp16",
                          vae_hash=autov2(SHA[::-1])).render()
    assert 'Model: m, VAE hash: fedcba9876, VAE: "sdxl_vae, fp16", Version' in text
    assert request_fields(text)["vae"] == "sdxl_vae, fp16"
    plain = build_infotext(prompt="a cat", negative_prompt="", steps=20, sampler="Euler a", cfg_scale=7, seed=1,
                           width=512, height=512, model_hash=autov2(SHA), model_name="m").render()
    assert "VAE" not in plain and "vae" not in request_fields(plain)
