"""Perceptual hashes of known-abusive images, and the blocklist input images are checked against.

The hash is the classic DCT pHash (64 bits): the image in grey at 32x32, its 2-D DCT, the 8x8 lowest
frequencies, one bit per coefficient above their median (the DC term left out of the median). It
survives re-encoding, resizing, mild colour and contrast changes, which is what a re-upload of a known
image goes through; it does not survive heavy crops or rotations (nor is it meant to: the scanners
judge what the image shows). Two images match when their hashes differ in at most `max_distance`
bits (`safety.image_hash_max_distance`, default 8 of 64). Only hashes are stored, never images.
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


def perceptual_hash(image: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits."""
    grey = np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


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
        """The nearest entry within `max_distance` of the image's hash, or None."""
        phash = perceptual_hash(image)
        with self.session_factory() as s:
            rows = s.execute(select(AbusiveImageHash.id, AbusiveImageHash.phash)).all()
        best = min(((distance(phash, h), i, h) for i, h in rows), default=None)
        if best is None or best[0] > self.max_distance:
            return None
        return HashMatch(best[1], best[2], best[0])
