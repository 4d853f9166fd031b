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
- with `rotations`, when none of the above found a face: the whole image and the regions again,
  turned 90, 180 and 270 degrees and mirrored, so a face lying on its side or upside down is found
  (the detector finds faces upright only). Inputs with an upright face pay nothing for it. What a
  turned view shows of any other class counts too (exposure on its side is exposure). Tiles are not
  turned (5x their cost): a turned face small in a large canvas is left to the output scan.

The findings merge as the strongest finding per class and scanner (boxes mapped back into the
image's coordinates), the highest level, any minor signal. A view whose scan fails ends the scan
(fail closed: the result is failed, and no later view can outweigh that). Plain Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from safety.image_scan import FACE_LABELS, FACE_SCORE_FLOOR, NudeNetScanner, ScanResult
from safety.levels import NsfwLevel

Box = tuple[int, int, int, int]  # x1, y1, x2, y2
DETECTOR_SIDE = 320  # NudeNet 320n's input side
TILE_SCALE = 2  # a tile is this many detector inputs wide: shrunk at most 2x on its way in
# the turns a view is scanned in when no face was found upright (PIL's ROTATE_90 turns counter-clockwise)
_TURNS = {"rotate_90": Image.Transpose.ROTATE_90, "rotate_180": Image.Transpose.ROTATE_180,
          "rotate_270": Image.Transpose.ROTATE_270, "mirror": Image.Transpose.FLIP_LEFT_RIGHT}
ORIENTATIONS = tuple(_TURNS)


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


def unorient_box(box: tuple[int, ...], name: str, width: int, height: int) -> tuple[int, ...]:
    """An (x, y, w, h) box found in the `name`-transformed view of a `width` x `height` image, in the
    image's own coordinates (PIL's ROTATE_90 turns counter-clockwise)."""
    if len(box) != 4:
        return tuple(box)
    x, y, w, h = box
    if name == "mirror":
        return width - x - w, y, w, h
    if name == "rotate_180":
        return width - x - w, height - y - h, w, h
    if name == "rotate_90":  # view (W' = height, H' = width): view (x, y) is image (width - 1 - y, x)
        return width - y - h, x, h, w
    if name == "rotate_270":  # view (x, y) is image (y, height - 1 - x)
        return y, height - x - w, h, w
    raise ValueError(name)


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


def _has_face(result: ScanResult, min_score: float) -> bool:
    return any(d.label in FACE_LABELS and d.score >= min_score for d in result.detections)


def scan_views(scanner: Any, image: Image.Image, regions: Sequence[Box] = (), *, tile: bool = True,
               rotations: bool = True) -> ScanResult:
    """`image` scanned whole, in each region, in tiles (`tile`) and, without an upright face, turned
    (`rotations`); `scanner` is an `ImageScanner` (anything with `scan(image) -> ScanResult`)."""
    width, height = image.size
    boxes: list[Box] = [(0, 0, width, height)]
    for box in regions:
        x1, y1, x2, y2 = (int(v) for v in box)
        box = (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))
        if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 and box not in boxes:
            boxes.append(box)
    plain = list(boxes)
    side = TILE_SCALE * detector_side(scanner)
    if tile and max(width, height) > side:
        boxes += [b for b in tiles(width, height, side) if b not in boxes]
    results: list[ScanResult] = []

    def run(box: Box, orientation: str | None = None) -> bool:
        view = image if box == (0, 0, width, height) else image.crop(box)
        if orientation is not None:
            view = view.transpose(_TURNS[orientation])
        r = scanner.scan(view)
        vw, vh = box[2] - box[0], box[3] - box[1]
        moved = tuple(replace(d, box=_shift(unorient_box(d.box, orientation, vw, vh) if orientation else d.box,
                                            box[0], box[1])) for d in r.detections)
        results.append(ScanResult(r.level, moved, r.minor_signal, r.scanner_errors))
        return not r.failed

    if not all(run(box) for box in boxes):
        return _merge(results)
    floor = min(getattr(scanner, "face_min_score", FACE_SCORE_FLOOR), FACE_SCORE_FLOOR)
    if rotations and not _has_face(_merge(results), floor):
        all(run(box, name) for box in plain for name in ORIENTATIONS)
    return _merge(results)
