"""Dataset intake on a hostile zip: every kind of bad member is skipped with its reason code."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genserve.core.errors import InvalidRequest
from training.config import IntakeLimits
from training.intake import dhash, load_manifest, run_intake


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_zip(path: Path) -> None:
    good1 = noise(64, 80, 1)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # "rotate 90 CW to display"
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 2100, dtype=np.uint8), (1000, 1))).convert("RGB")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good1.png", encode(good1, "PNG"))
        zf.writestr("good1.txt", "a red cat,\n sitting ")
        zf.writestr("good1.caption", "ignored: the .txt wins")
        zf.writestr("good1_copy.jpg", encode(good1, "JPEG", quality=95))
        zf.writestr("good2.jpg", encode(noise(100, 70, 2), "JPEG", quality=90, exif=rotated.tobytes()))
        zf.writestr("good2.caption", "a blue dog")
        zf.writestr("sub/good3.webp", encode(noise(72, 72, 3), "WEBP", lossless=True))
        zf.writestr("huge.png", encode(gradient, "PNG"))
        zf.writestr("huge.txt", "a gradient")
        zf.writestr("tiny.png", encode(noise(40, 40, 4), "PNG"))
        zf.writestr("tiny.txt", "too small")
        zf.writestr("corrupt.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300))
        zf.writestr("fake.jpg", b"this is not a jpeg")
        zf.writestr("../escape.png", encode(noise(64, 64, 5), "PNG"))
        zf.writestr("/abs.png", encode(noise(64, 64, 6), "PNG"))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("bomb.png", b"\0" * (8 << 20))  # ~1000:1 once deflated
        zf.writestr("__MACOSX/._good1.png", b"resource fork")
        zf.writestr(".DS_Store", b"finder")
        zf.writestr("notes.pdf", b"%PDF-1.4")
        zf.writestr("orphan.txt", "no image for me")
        zf.writestr("folder/", b"")


EXPECTED_SKIPPED = [
    ("../escape.png", "unsafe_path"),
    (".DS_Store", "system_file"),
    ("/abs.png", "unsafe_path"),
    ("__MACOSX/._good1.png", "system_file"),
    ("bomb.png", "compression_ratio"),
    ("corrupt.png", "corrupt_image"),
    ("fake.jpg", "corrupt_image"),
    ("good1.caption", "extra_caption"),
    ("good1_copy.jpg", "duplicate"),
    ("link.png", "link"),
    ("notes.pdf", "unsupported_type"),
    ("orphan.txt", "orphan_caption"),
    ("tiny.png", "image_too_small"),
]


def test_hostile_zip_gives_the_exact_report(tmp_path: Path) -> None:
    src = tmp_path / "dataset.zip"
    hostile_zip(src)
    out = tmp_path / "out"
    report = run_intake(src, out, IntakeLimits())
    data = report.to_dict()

    assert [(s["name"], s["reason"]) for s in data["skipped"]] == EXPECTED_SKIPPED
    details = {s["name"]: s["detail"] for s in data["skipped"]}
    assert details["good1_copy.jpg"] == "near-duplicate of good1.png"
    assert details["tiny.png"] == "40x40"
    assert details["link.png"] == "symlink"
    assert data["warnings"] == {
        "downscaled": ["huge.png"],
        "exif_rotated": ["good2.jpg"],
        "uncaptioned": ["sub/good3.webp"],
    }
    kept = {i["name"]: i for i in data["images"]}
    assert list(kept) == ["good1.png", "good2.jpg", "huge.png", "sub/good3.webp"]
    assert kept["good1.png"]["caption"] == "a red cat, sitting"
    assert kept["good1.png"]["caption_file"] == "good1.txt"
    assert kept["good2.jpg"]["caption"] == "a blue dog"
    assert (kept["good2.jpg"]["width"], kept["good2.jpg"]["height"]) == (70, 100)  # EXIF rotation applied
    assert (kept["huge.png"]["width"], kept["huge.png"]["height"]) == (2048, 975)
    assert kept["sub/good3.webp"]["caption"] is None

    # normalised files: PNG, right sizes, no metadata carried over, nothing written outside out/
    for image in data["images"]:
        with Image.open(out / image["file"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (image["width"], image["height"])
            assert not im.getexif()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert not (tmp_path / "escape.png").exists()
    assert load_manifest(out).to_dict() == data
    assert json.loads((out / "manifest.json").read_text()) == data


def test_folder_intake_skips_links_and_caps_pixels(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    (src / "a").mkdir(parents=True)
    noise(64, 64, 1).save(src / "a" / "one.png")
    noise(300, 300, 2).save(src / "big.png")
    (src / "a" / "one.caption").write_text("caption one")
    os.symlink(src / "a" / "one.png", src / "alias.png")
    os.symlink(src / "a", src / "linked_dir")
    report = run_intake(src, tmp_path / "out", IntakeLimits(max_image_pixels=256 * 256))
    assert [(s.name, s.reason) for s in sorted(report.skipped, key=lambda s: s.name)] == [
        ("alias.png", "link"),
        ("big.png", "too_many_pixels"),
        ("linked_dir", "link"),
    ]
    assert [(i.name, i.caption) for i in report.images] == [("a/one.png", "caption one")]


def test_flat_colours_are_not_duplicates_but_reencodes_are(tmp_path: Path) -> None:
    src = tmp_path / "colours"
    src.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (64, 64), colour).save(src / f"{i}.png")
    Image.new("RGB", (64, 64), (0, 0, 250)).save(src / "3.jpg", quality=90)
    report = run_intake(src, tmp_path / "out", IntakeLimits())
    assert [i.name for i in report.images] == ["0.png", "1.png", "2.png"]  # same dHash, different colours
    assert [(s.name, s.detail) for s in report.skipped] == [("3.jpg", "near-duplicate of 1.png")]
    assert dhash(noise(64, 64, 1)) != dhash(noise(64, 64, 2))


def test_whole_dataset_refusals(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(InvalidRequest) as err:
        run_intake(bad, tmp_path / "o1", IntakeLimits())
    assert err.value.code == "dataset_not_a_zip"

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5):
            zf.writestr(f"{i}.txt", "x")
    with pytest.raises(InvalidRequest) as err:
        run_intake(many, tmp_path / "o2", IntakeLimits(max_members=4))
    assert err.value.code == "dataset_too_many_members"

    with pytest.raises(InvalidRequest) as err:
        run_intake(many, tmp_path / "o3", IntakeLimits())
    assert err.value.code == "dataset_empty"

    total = tmp_path / "total.zip"
    with zipfile.ZipFile(total, "w") as zf:
        zf.writestr("a.png", encode(noise(64, 64, 1), "PNG"))
        zf.writestr("b.png", encode(noise(64, 64, 2), "PNG"))
    size_a = len(encode(noise(64, 64, 1), "PNG"))
    report = run_intake(total, tmp_path / "o4", IntakeLimits(max_total_bytes=size_a + 10))
    assert [(s.name, s.reason) for s in report.skipped] == [("b.png", "total_size_exceeded")]
    assert [i.name for i in report.images] == ["a.png"]


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` (what a decompression bomb looks like)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_huge_images_are_too_many_pixels_not_corrupt(tmp_path: Path, side: int) -> None:
    """Pillow refuses these at open() (its own bomb bound): reported as too_many_pixels all the same."""
    zip_path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("bomb.png", _png_claiming(side, side))
        buf = io.BytesIO()
        noise(64, 64, 1).save(buf, format="PNG")
        zf.writestr("ok.png", buf.getvalue())
    report = run_intake(zip_path, tmp_path / "out", IntakeLimits())
    assert [(s.name, s.reason) for s in report.skipped] == [("bomb.png", "too_many_pixels")]
