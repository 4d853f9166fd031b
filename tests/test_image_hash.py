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


def _photo_like(seed: int = 1) -> Image.Image:
    """A smooth random field at photo size (no real picture can be a fixture of an abuse list)."""
    import numpy as np
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(24, 32, 3))
    field = ((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)
    return Image.fromarray(field).resize((640, 480), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))


def _nearest(listed: str, image: Image.Image) -> int:
    from safety.image_hash import orientation_hashes

    return min(distance(listed, h) for h in orientation_hashes(image))


def test_mirrors_turns_and_borders_of_a_listed_image_still_match():
    from PIL import ImageOps

    original = _photo_like()
    listed = perceptual_hash(original)
    variants = {
        "mirror": ImageOps.mirror(original), "flip": ImageOps.flip(original),
        "rotate 90": original.rotate(90, expand=True), "rotate 270": original.rotate(270, expand=True),
        "rotate 180": original.rotate(180), "10% white border": ImageOps.expand(original, border=64, fill="white"),
        "black bar on one side": ImageOps.pad(original, (666, 480), color="black", centering=(0, 0.5)),
        "turned, mirrored, framed, re-encoded": _jpeg(ImageOps.expand(ImageOps.mirror(original.rotate(
            90, expand=True)), border=40, fill=(30, 30, 30)), 70),
    }
    for name, image in variants.items():
        assert _nearest(listed, image) <= 8, name
    # a picture with a flat margin of its own keeps it: only the frame's colour is trimmed
    flat = _picture(1)
    assert _nearest(perceptual_hash(flat), ImageOps.expand(ImageOps.flip(flat), border=12, fill="white")) <= 8


def test_other_pictures_stay_apart_in_every_orientation():
    listed = [perceptual_hash(_photo_like(s)) for s in range(1, 5)] + [perceptual_hash(_picture(1))]
    others = [_photo_like(s) for s in range(5, 12)] + [_picture(s) for s in range(2, 8)]
    nearest = min(_nearest(h, image) for h in listed for image in others)
    assert nearest > 8, nearest
