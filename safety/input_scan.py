"""An input image scanned at the scale the engine works at, not only as one picture shrunk to 320 px.

NudeNet pads an image to a square and shrinks it to its 320 px input, so a 512 px photograph pasted
into a corner of a 4096 px canvas reaches the detector at 40 px, while an only-masked inpaint of it
repaints the masked box at full scale. `scan_views` therefore scans, with every scanner of the scan:

- the whole image (as every delivered image is scanned);
- each `region` the caller names: the box the engine will work on (the only-masked padded crop,
  computed by the engine's own geometry, `genserve.engine.geometry`), at its own scale;
- with `tile`, an image wider or taller than `TILE_SCALE` detector inputs, in tiles of that side
  overlapping by half (so anything up to half a tile lies whole in one tile): each tile reaches the
  detector shrunk at most `TILE_SCALE` times. A 4096 px side is 12 x 12 tiles.

The findings merge as the strongest finding per class and scanner (boxes mapped back into the
image's coordinates), the highest level, any minor signal. A view whose scan fails ends the scan
(fail closed: the result is failed, and no later view can outweigh that). Plain Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from safety.image_scan import NudeNetScanner, ScanResult
from safety.levels import NsfwLevel

Box = tuple[int, int, int, int]  # x1, y1, x2, y2
DETECTOR_SIDE = 320  # NudeNet 320n's input side
TILE_SCALE = 2  # a tile is this many detector inputs wide: shrunk at most 2x on its way in


def detector_side(scanner: Any) -> int:
    """The input side of the scan's NudeNet detector (a test's stand-in has none: NudeNet's 320)."""
    for s in getattr(scanner, "scanners", ()):
        if isinstance(s, NudeNetScanner):
            return int(getattr(s.detector, "size", DETECTOR_SIDE))
    return DETECTOR_SIDE


def tiles(width: int, height: int, side: int) -> list[Box]:
    """Boxes of `side` (the image's own side where it is smaller), overlapping by half, covering it."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        return sorted({*range(0, length - side, side // 2), length - side})

    return [(x, y, min(x + side, width), min(y + side, height)) for y in starts(height) for x in starts(width)]


def _shift(box: tuple[int, ...], dx: int, dy: int) -> tuple[int, ...]:
    return (box[0] + dx, box[1] + dy, *box[2:]) if len(box) == 4 else tuple(box)


def _merge(results: Iterable[ScanResult]) -> ScanResult:
    """The strongest finding per class and source; the highest level; any minor signal; all errors."""
    level, minor, errors, best = NsfwLevel.PG, False, [], {}
    for r in results:
        level, minor = max(level, r.level), minor or r.minor_signal
        errors.extend(r.scanner_errors)
        for d in r.detections:
            key = (d.source, d.label)
            if key not in best or d.score > best[key].score:
                best[key] = d
    return ScanResult(level, tuple(best.values()), minor, tuple(errors))


def scan_views(scanner: Any, image: Image.Image, regions: Sequence[Box] = (), *, tile: bool = True) -> ScanResult:
    """`image` scanned whole, in each region and in tiles (`tile`); `scanner` is an `ImageScanner`
    (anything with `scan(image) -> ScanResult`)."""
    width, height = image.size
    boxes: list[Box] = [(0, 0, width, height)]
    for box in regions:
        x1, y1, x2, y2 = (int(v) for v in box)
        box = (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))
        if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 and box not in boxes:
            boxes.append(box)
    side = TILE_SCALE * detector_side(scanner)
    if tile and max(width, height) > side:
        boxes += [b for b in tiles(width, height, side) if b not in boxes]
    results: list[ScanResult] = []

    def run(box: Box) -> bool:
        view = image if box == (0, 0, width, height) else image.crop(box)
        r = scanner.scan(view)
        moved = tuple(replace(d, box=_shift(d.box, box[0], box[1])) for d in r.detections)
        results.append(ScanResult(r.level, moved, r.minor_signal, r.scanner_errors))
        return not r.failed

    all(run(box) for box in boxes)  # stops at the first failed view
    return _merge(results)
