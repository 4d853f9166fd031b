"""The inpaint geometry A1111 uses, in one place for the engine and the admission's safety scan.

The engine repaints an only-masked inpaint in `only_masked_box` of the input, resized to the working
size; the admission scans that same box of the input (and the worker of the output) at its own
scale, so what the engine works on at full scale is what the scan looks at. Pillow only (no torch):
the ingress imports it.
"""

from __future__ import annotations

from PIL import Image, ImageFilter

Box = tuple[int, int, int, int]  # x1, y1, x2, y2


def blur_mask(mask: Image.Image, mask_blur: int) -> Image.Image:
    """The mask as the engine applies it: L, Gaussian-blurred by `mask_blur` (A1111's mask blur)."""
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur > 0 else mask


def crop_region(mask: Image.Image, padding: int) -> Box:
    """The box of the mask's non-zero pixels grown by `padding`, inside the image."""
    box = mask.getbbox()
    if box is None:
        raise ValueError("the mask is empty")
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(box: Box, width: int, height: int, image_w: int, image_h: int) -> Box:
    """Grow `box` to the working size's aspect ratio (A1111's `expand_crop_region`), so the crop is not
    distorted when it is resized to width x height; kept inside the image where it fits."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def only_masked_box(blurred_mask: Image.Image, padding: int, width: int, height: int) -> Box:
    """The box an only-masked inpaint repaints: the blurred mask's box plus padding, at width:height."""
    return expand_to_ratio(crop_region(blurred_mask, padding), width, height, blurred_mask.width,
                           blurred_mask.height)


def inpaint_work_box(mask: Image.Image, *, mask_blur: int, padding: int, width: int, height: int) -> Box:
    """`only_masked_box` of a mask as decoded (blurred first, exactly as the engine's `prepare` does)."""
    return only_masked_box(blur_mask(mask, mask_blur), padding, width, height)
