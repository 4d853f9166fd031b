"""The perceptual hash behind the known-abusive input blocklist: stable under re-encoding and resizing,
far apart for different pictures."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from safety.image_hash import distance, parse_hash, perceptual_hash


def _picture(seed: int) -> Image.Image:
    image = Image.new("RGB", (128, 96), (20 * seed % 255, 90, 200))
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x, y = (37 * (seed + i)) % 100, (53 * (seed + 2 * i)) % 70
        draw.ellipse((x, y, x + 28, y + 24), fill=((70 * i + 40 * seed) % 255, 200 - 40 * i, 30 * seed % 255))
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue()))


def test_copies_stay_close_and_other_pictures_do_not():
    original = _picture(1)
    h = perceptual_hash(original)
    assert len(h) == 16 and parse_hash(h.upper()) == h
    for copy in (_jpeg(original, 40), original.resize((64, 48)), original.resize((300, 225)),
                 original.convert("L").convert("RGB")):
        assert distance(h, perceptual_hash(copy)) <= 8
    others = [distance(h, perceptual_hash(_picture(s))) for s in range(2, 8)]
    assert min(others) > 8, others


def test_a_hash_is_sixteen_hex_digits():
    for bad in ("", "xyz", "0" * 15, "g" * 16):
        with pytest.raises(ValueError):
            parse_hash(bad)
