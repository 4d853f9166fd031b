"""Input images (img2img, inpaint): decoded safely once, kept in the object store while their job runs.

Every input, uploaded as base64 or named as an earlier delivered image, goes through `decode_image`:

    encoded bytes <= max_bytes ─▶ header: format allow-list, one frame, declared pixels <= the bomb
    limit, sides in bounds ─▶ decode (a truncated file is refused, never padded) ─▶ EXIF orientation
    applied ─▶ RGB (alpha flattened on white) or, for a mask, a binary L (0 or 255)

The pixel bounds are checked on the size the header declares, before any pixel is decoded, so a
small file that declares a huge canvas costs nothing. What is stored is the decoded image re-encoded
as PNG: the user's metadata (EXIF GPS, comments) never reaches the store or the worker. Inputs live
under the job's prefix in the store (the reaper deletes that prefix with an orphaned job) and are
deleted when the job ends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from genserve.core.config.generation import InputImageLimits
from genserve.core.errors import GenserveError, InputImageRefused, InputImageTooLarge
from genserve.core.storage import ObjectStore
from genserve.generation.jobs import JobNotFound, JobStore, image_prefix
from genserve.generation.protocol import InputImage

logger = logging.getLogger(__name__)

_DATA_URL_PREFIX = "data:"


@dataclass(frozen=True)
class DecodedInput:
    """One decoded input: the image as the engine uses it, and its normalised PNG and digest."""

    image: Image.Image
    png: bytes
    sha256: str


def base64_bytes(text: str, field: str, limits: InputImageLimits) -> bytes:
    """The bytes of a base64 string (a `data:image/...;base64,` URL too), refused past `max_bytes`
    before decoding: the encoded length bounds the decoded one."""
    if text.startswith(_DATA_URL_PREFIX):
        _, sep, text = text.partition(",")
        if not sep:
            raise InputImageRefused(f"{field}: a data URL without data", details={"field": field})
    if len(text) // 4 * 3 > limits.max_bytes + 3:
        raise InputImageTooLarge(f"{field} is over {limits.max_bytes} bytes",
                                 details={"field": field, "max_bytes": limits.max_bytes})
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputImageRefused(f"{field} is not valid base64", details={"field": field}) from exc


def decode_image(data: bytes, limits: InputImageLimits, *, field: str = "init_image",
                 mask: bool = False) -> DecodedInput:
    """`data` as an RGB image (or an L mask), or a refusal with a stable code."""
    details = {"field": field}
    if len(data) > limits.max_bytes:
        raise InputImageTooLarge(f"{field} is over {limits.max_bytes} bytes",
                                 details={**details, "max_bytes": limits.max_bytes})
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; here any bomb is a refusal
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # only the allowed formats' parsers read the header: no other Pillow plugin sees the bytes
            opened = Image.open(io.BytesIO(data), formats=tuple(limits.formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputImageRefused(f"{field} declares more pixels than allowed", code="input_image_bomb",
                                    details=details) from exc
        except UnidentifiedImageError as exc:
            raise InputImageRefused(f"{field} is not an image of an allowed format ({', '.join(limits.formats)})",
                                    code="input_image_format",
                                    details={**details, "allowed": list(limits.formats)}) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputImageRefused(f"{field} is not an image", details=details) from exc
        with opened as img:
            _check_header(img, limits, field)
            try:
                img.load()
                image = ImageOps.exif_transpose(img)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                raise InputImageRefused(f"{field} could not be decoded (truncated or corrupt)",
                                        details=details) from exc
    image = binary_mask(image) if mask else _rgb(image)
    out = io.BytesIO()
    image.save(out, format="PNG")
    png = out.getvalue()
    return DecodedInput(image, png, hashlib.sha256(png).hexdigest())


def _check_header(img: Image.Image, limits: InputImageLimits, field: str) -> None:
    details = {"field": field}
    if img.format not in limits.formats:
        raise InputImageRefused(f"{field} is {img.format}; allowed: {', '.join(limits.formats)}",
                                code="input_image_format", details={**details, "format": img.format,
                                                                    "allowed": list(limits.formats)})
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        raise InputImageRefused(f"{field} is animated; send one frame", code="input_image_animated",
                                details=details)
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InputImageRefused(f"{field} declares {width}x{height} pixels, over the {limits.max_pixels}-pixel "
                                "decompression-bomb limit", code="input_image_bomb",
                                details={**details, "size": [width, height], "max_pixels": limits.max_pixels})
    if max(width, height) > limits.max_side or min(width, height) < 8:
        raise InputImageRefused(f"{field} is {width}x{height}; sides must be 8 to {limits.max_side}",
                                code="input_image_dimensions",
                                details={**details, "size": [width, height], "max_side": limits.max_side})


_WIDE_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit greyscale PNGs open in these


def _rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is flattened onto white (what an editor shows under a transparent area).
    16-bit greyscale is scaled to 8 bits (Pillow's own conversion clips it, turning it all white)."""
    if image.mode in _WIDE_GREY:
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


MASK_THRESHOLD = 128  # A1111's create_binary_mask: above it is repainted


def binary_mask(image: Image.Image) -> Image.Image:
    """The mask as a shape: 255 where it is above the threshold, 0 elsewhere, as A1111 binarises a mask
    before its blur (the engine blurs it after). A grey picture sent as a mask would otherwise come back
    through the inpaint overlay as it was, past every scan (the mask is a shape, so it is not scanned).
    A mask with transparency is read from its alpha channel, as A1111 reads a drawn mask."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3] != (255, 255):
            return rgba.getchannel("A").point(lambda v: 255 if v > MASK_THRESHOLD else 0)
        image = rgba
    return image.convert("L").point(lambda v: 255 if v > MASK_THRESHOLD else 0)


def check_mask(mask: DecodedInput, image: DecodedInput) -> None:
    if mask.image.size != image.image.size:
        raise InputImageRefused(f"the mask is {mask.image.size[0]}x{mask.image.size[1]}, the image "
                                f"{image.image.size[0]}x{image.image.size[1]}", code="mask_size_mismatch",
                                details={"mask": list(mask.image.size), "image": list(image.image.size)})
    if mask.image.getbbox() is None:
        raise InputImageRefused("the mask marks nothing to inpaint", code="mask_empty")


def body_limit(limits: InputImageLimits, rest: int) -> int:
    """A JSON generation or quote body's byte limit: room for a base64 input image and mask at the
    configured bound (4/3 of it each), plus `rest` for everything else in the body."""
    return 2 * (limits.max_bytes * 4 // 3 + 4) + rest


def input_key(user_id: str, job_id: str, name: str, digest: str) -> str:
    """Under the job's image prefix: the reaper deletes that prefix with an orphaned job."""
    return f"{image_prefix(user_id, job_id)}{name}-{digest[:16]}.png"


class InputImages:
    """Decodes the inputs a request names and keeps them in the object store while its job runs."""

    def __init__(self, store: ObjectStore, jobs: JobStore, limits: InputImageLimits):
        self.store = store
        self.jobs = jobs
        self.limits = limits

    def load(self, ref: InputImage, user_id: str, *, field: str, mask: bool = False) -> DecodedInput:
        """An input of the request: its base64 data, or a delivered image of the same user."""
        if ref.data is not None:
            return decode_image(base64_bytes(ref.data, field, self.limits), self.limits, field=field, mask=mask)
        job_id, index = ref.job_id, ref.index
        not_found = InputImageRefused(f"{field}: generation {job_id} has no delivered image {index} of yours",
                                      code="input_image_not_found", details={"field": field, "job_id": job_id,
                                                                             "index": index})
        try:
            job = self.jobs.get(job_id, user_id)
        except JobNotFound:
            raise not_found from None
        key = next((i["key"] for i in (job.result or {}).get("images", []) if i["index"] == index), None)
        if key is None:
            raise not_found
        try:
            data = self.store.get_bytes(key)
        except GenserveError as exc:
            raise not_found from exc
        return decode_image(data, self.limits, field=field, mask=mask)

    @staticmethod
    def named(image: DecodedInput, mask: DecodedInput | None) -> list[tuple[str, DecodedInput]]:
        """The inputs a job stores, by their name under the job: the image, then the mask if any."""
        return [("input", image), *([("mask", mask)] if mask is not None else [])]

    @classmethod
    def keys(cls, user_id: str, job_id: str, image: DecodedInput, mask: DecodedInput | None) -> list[str]:
        """Where the job's inputs will be stored; known before anything is written, so the job row can
        name them and be created first."""
        return [input_key(user_id, job_id, name, decoded.sha256) for name, decoded in cls.named(image, mask)]

    def put(self, keys: list[str], image: DecodedInput, mask: DecodedInput | None) -> None:
        for key, (_, decoded) in zip(keys, self.named(image, mask), strict=True):
            self.store.put_bytes(key, decoded.png, content_type="image/png")

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except GenserveError as exc:
                logger.error("input image %s not deleted: %s", key, exc.code)
