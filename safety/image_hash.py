"""Perceptual hashes of known-abusive images, and the blocklist input images are checked against.

The hash is the classic DCT pHash (64 bits): the image in grey at 32x32, its 2-D DCT, the 8x8 lowest
frequencies, one bit per coefficient above their median (the DC term left out of the median). It
survives re-encoding, resizing, mild colour and contrast changes, which is what a re-upload of a known
image goes through. Two images match when their hashes differ in at most `max_distance` bits
(`safety.image_hash_max_distance`, default 8 of 64). Only hashes are stored, never images.

The cheap evasions are undone on the input rather than by a wider distance (which would match
unrelated images): a frame is trimmed (`trim_border`: rows and columns of the edge's colour on any
side), and the input, framed and trimmed, is compared in all 8 orientations (mirror, flips, 90-degree
turns: the dihedral group of the square, computed on the 32x32 grey, so only more DCTs). List entries
are hashed as they are. It does not undo heavy crops or small-angle rotations: the scanners judge
what such an image shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from safety.store import AbusiveImageHash

_N = 32


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_N)
# a row or column whose channels vary by at most this much is border (JPEG keeps a flat frame within it)
BORDER_TOLERANCE = 24


def trim_border(image: Image.Image, tolerance: int = BORDER_TOLERANCE) -> Image.Image:
    """`image` without the frame along its edges: on each side, the rows (columns) of the outermost one's
    colour, to within `tolerance`. Only the edge colour is trimmed, so a picture's own margin of another
    colour stays; the image as it is when less than 8 px would remain."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)

    def frame(lines: np.ndarray) -> int:  # lines: (n, length, 3), outermost first
        edge = lines[0].mean(axis=0)
        inside = np.abs(lines - edge).max(axis=(1, 2)) > tolerance
        return int(np.argmax(inside)) if inside.any() else len(lines)

    height, width = arr.shape[:2]
    top, bottom = frame(arr), height - frame(arr[::-1])
    cols = arr.transpose(1, 0, 2)
    left, right = frame(cols), width - frame(cols[::-1])
    if bottom - top < 8 or right - left < 8:
        return image
    return image.crop((left, top, right, bottom))


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)


def _hash(grey: np.ndarray) -> str:
    low = (_DCT @ grey @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def perceptual_hash(image: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits (as it is: what a list entry holds)."""
    return _hash(_grey(image))


def orientation_hashes(image: Image.Image) -> list[str]:
    """The hashes an input is compared by: the image as it is and with its frame trimmed, each in the 8
    orientations (upright first). Both, because a listed image may have a margin of its own colour."""
    greys = [_grey(image)]
    trimmed = trim_border(image)
    if trimmed.size != image.size:
        greys.append(_grey(trimmed))
    hashes = [_hash(np.rot90(g, k)) for grey in greys for g in (grey, np.fliplr(grey)) for k in range(4)]
    return list(dict.fromkeys(hashes))


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def parse_hash(value: str) -> str:
    value = value.strip().lower()
    if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("a perceptual hash is 16 hex digits")
    return value


@dataclass(frozen=True)
class HashMatch:
    entry_id: int
    phash: str
    distance: int

    def to_dict(self) -> dict:
        return {"entry_id": self.entry_id, "phash": self.phash, "distance": self.distance}


class ImageHashBlocklist:
    """The known-abusive hashes in the database. Read on every check: the table is small (hashes of
    reported images), and an entry an admin adds on one replica applies on every other at once."""

    def __init__(self, session_factory: Callable[[], Session], max_distance: int):
        self.session_factory = session_factory
        self.max_distance = max_distance

    def add(self, phash: str, *, reason: str = "", source: str = "", created_by: str = "") -> tuple[int, bool]:
        """(entry id, added); an existing hash is kept as it is."""
        phash = parse_hash(phash)
        with self.session_factory() as s:
            existing = s.scalar(select(AbusiveImageHash.id).where(AbusiveImageHash.phash == phash))
            if existing is not None:
                return existing, False
            row = AbusiveImageHash(phash=phash, reason=reason, source=source, created_by=created_by)
            s.add(row)
            s.commit()
            return row.id, True

    def match(self, image: Image.Image) -> HashMatch | None:
        """The nearest entry within `max_distance` of any of the image's `orientation_hashes`, or None."""
        candidates = orientation_hashes(image)
        with self.session_factory() as s:
            rows = s.execute(select(AbusiveImageHash.id, AbusiveImageHash.phash)).all()
        best = min(((distance(c, h), i, h) for i, h in rows for c in candidates), default=None)
        if best is None or best[0] > self.max_distance:
            return None
        return HashMatch(best[1], best[2], best[0])
