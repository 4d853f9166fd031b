"""Aspect-ratio bucketing and the epoch plan.

Images are grouped into buckets of (about) the training area with different aspect ratios, so a
portrait stays a portrait instead of being cropped square; a batch never mixes buckets. The order of
batches in an epoch is a pure function of (seed, epoch): a resumed job replays the same order
without storing it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

Bucket = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int, enable: bool = True) -> list[Bucket]:
    """Buckets of area <= resolution², sides multiples of `step`, from half to twice the resolution."""
    if not enable:
        return [(resolution, resolution)]
    area = resolution * resolution
    lo, hi = max(step, resolution // 2 // step * step), resolution * 2
    buckets = set()
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket with the nearest aspect ratio (log scale), the larger one on a tie."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Fitted:
    image: Image.Image
    crop_top: int
    crop_left: int


def fit_to_bucket(img: Image.Image, bucket: Bucket) -> Fitted:
    """Scale to cover the bucket, then centre-crop (SDXL is told the crop offsets)."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    size = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    resized = img.resize(size, Image.Resampling.LANCZOS) if size != img.size else img
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    return Fitted(resized.crop((left, top, left + bw, top + bh)), top, left)


def epoch_batches(buckets: Sequence[Bucket], repeats: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of image indices for one epoch: each image `repeats` times, batches within one bucket."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for index, bucket in enumerate(buckets):
        by_bucket[bucket].extend([index] * repeats)
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        rng.shuffle(items)
        batches += [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(buckets: Sequence[Bucket], repeats: int, batch_size: int) -> int:
    counts: dict[Bucket, int] = defaultdict(int)
    for bucket in buckets:
        counts[bucket] += repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())
