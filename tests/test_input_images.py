"""Input-image decoding: every hostile file gets its stable code; a good one comes out upright RGB (or L)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from genserve.core.config.generation import InputImageLimits
from genserve.core.errors import InputImageRefused, InputImageTooLarge
from genserve.generation.inputs import base64_bytes, check_mask, decode_image

LIMITS = InputImageLimits()


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header then claims `width` x `height` (CRC fixed): a decompression bomb's
    first bytes."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG"))
    ihdr = 8  # signature, then the IHDR chunk: length (4), type (4), data (13), crc (4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def _code(data: bytes, limits: InputImageLimits = LIMITS, **kw) -> str:
    with pytest.raises(InputImageRefused) as info:
        decode_image(data, limits, **kw)
    return info.value.code


def test_a_png_jpeg_or_webp_decodes_to_rgb_and_a_mask_to_l():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent: flattened on white
    for fmt in ("PNG", "WEBP"):
        decoded = decode_image(_encode(rgba, fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMITS)
        assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
        assert decoded.image.getpixel((5, 5)) == (255, 255, 255)
    jpeg = decode_image(_encode(Image.new("RGB", (40, 30), (0, 128, 0)), "JPEG"), LIMITS)
    assert jpeg.image.mode == "RGB" and jpeg.png.startswith(b"\x89PNG")  # stored re-encoded, metadata dropped
    mask = decode_image(_encode(Image.new("RGB", (40, 30), (255, 255, 255)), "PNG"), LIMITS, mask=True)
    assert mask.image.mode == "L" and mask.image.getpixel((0, 0)) == 255


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()), LIMITS)
    assert decoded.image.size == (20, 40)


def test_hostile_files_get_stable_codes():
    small = Image.new("RGB", (16, 16), (1, 2, 3))
    assert _code(_png_declaring(100_000, 100_000)) == "input_image_bomb"  # past Pillow's own guard
    assert _code(_png_declaring(5000, 5000)) == "input_image_bomb"  # past ours, under Pillow's
    assert _code(_encode(Image.new("RGB", (4100, 16)), "PNG")) == "input_image_dimensions"
    assert _code(_encode(small, "GIF")) == "input_image_format"
    assert _code(_encode(small, "BMP")) == "input_image_format"
    assert _code(b"this is not an image at all") == "input_image_format"  # no allowed format's parser reads it
    png = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    assert _code(png[: len(png) // 2]) == "input_image_invalid"  # truncated
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])
    assert _code(out.getvalue()) == "input_image_animated"
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:])
    assert _code(out.getvalue()) == "input_image_animated"
    with pytest.raises(InputImageTooLarge) as info:
        decode_image(png, InputImageLimits(max_bytes=1024))
    assert info.value.code == "input_image_too_large" and info.value.http_status == 413


def test_base64_is_bounded_before_it_is_decoded():
    png = _encode(Image.new("RGB", (16, 16)), "PNG")
    text = base64.b64encode(png).decode()
    assert base64_bytes(text, "init_image", LIMITS) == png
    assert base64_bytes(f"data:image/png;base64,{text}", "init_image", LIMITS) == png
    with pytest.raises(InputImageRefused) as info:
        base64_bytes("not base64!!", "init_image", LIMITS)
    assert info.value.code == "input_image_invalid"
    with pytest.raises(InputImageTooLarge):
        base64_bytes("A" * 4000, "init_image", InputImageLimits(max_bytes=1024))


def test_a_mask_must_match_the_image_and_mark_something():
    image = decode_image(_encode(Image.new("RGB", (32, 32)), "PNG"), LIMITS)
    wrong = decode_image(_encode(Image.new("L", (16, 16), 255), "PNG"), LIMITS, mask=True)
    empty = decode_image(_encode(Image.new("L", (32, 32), 0), "PNG"), LIMITS, mask=True)
    for mask, code in ((wrong, "mask_size_mismatch"), (empty, "mask_empty")):
        with pytest.raises(InputImageRefused) as info:
            check_mask(mask, image)
        assert info.value.code == code


def test_a1111_img2img_fields_are_accepted():
    from genserve.generation.protocol import GenerationRequest

    png = base64.b64encode(_encode(Image.new("RGB", (16, 16)), "PNG")).decode()
    body = {"prompt": "x", "checkpoint": "tiny-sd1", "init_images": [png], "denoising_strength": 0.35,
            "resize_mode": 1, "mask": png, "inpaint_full_res": False, "inpaint_full_res_padding": 12}
    request = GenerationRequest.model_validate(body)
    assert request.workflow == "inpaint" and request.init_image.data == png and request.mask.data == png
    assert request.denoise == 0.35 and request.resize_mode == "crop_and_resize"
    assert not request.inpaint_only_masked and request.inpaint_padding == 12
    plain = GenerationRequest.model_validate({"prompt": "x", "checkpoint": "c", "init_images": [png]})
    assert plain.workflow == "img2img"
    for bad in ({"init_images": [png, png]}, {"denoising_strength": 0.3, "denoise": 0.4}):
        with pytest.raises(ValueError):
            GenerationRequest.model_validate({"prompt": "x", "checkpoint": "c", **bad})


def test_a_16_bit_greyscale_input_keeps_its_picture():
    """Pillow's own conversion clips 16-bit grey to white; the decoder scales it to 8 bits instead."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (32, 1))
    decoded = decode_image(_encode(Image.fromarray(ramp), "PNG"), InputImageLimits())
    grey = np.asarray(decoded.image.convert("L"), dtype=np.int16)
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and 120 <= grey[0, 32] <= 135


def test_input_bounds_cannot_be_configured_past_their_ceilings_or_to_other_formats():
    from pydantic import ValidationError

    for bad in ({"max_side": 100_000}, {"max_pixels": 10**9}, {"max_bytes": 1 << 30}, {"formats": ["GIF"]},
                {"formats": []}):
        with pytest.raises(ValidationError):
            InputImageLimits(**bad)
