"""A1111-style generation parameters ("infotext") in a PNG `parameters` text chunk or a JPEG/WebP EXIF
UserComment, and back into a request's fields.

The format is the one AUTOMATIC1111 writes and the site, A1111's "PNG Info" and ComfyUI read:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 0123456789, ...

Values holding a comma, colon or newline are JSON-quoted (as A1111 does), so the last line always
splits back into the same pairs.

Hand-written: no maintained package writes or parses this format (A1111 keeps its own parser inside
the web UI), and it is small enough that a parser here is cheaper than a dependency on the UI.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from genserve import SERVICE_NAME, __version__

PNG_TEXT_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111's own pattern for one "Name: value" pair of the last line
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def autov2(sha256: str) -> str:
    """A1111/civitai "AutoV2" model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256[:10]


def autov3(tensor_sha256: str) -> str:
    """civitai "AutoV3" / A1111 LoRA short hash: 12 hex digits of the safetensors tensor-payload SHA-256."""
    return tensor_sha256[:12]


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _hash_list(hashes: Mapping[str, str]) -> str:
    return ", ".join(f"{name}: {digest}" for name, digest in hashes.items())


@dataclass(frozen=True)
class Infotext:
    """Prompt, negative prompt and the parameters line; `params` values are as written (quoted if needed)."""

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{NEGATIVE_PREFIX} {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {v}" for k, v in self.params.items()))
        return "\n".join(lines)


def build_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str,
    model_name: str,
    clip_skip: int = 1,
    lora_hashes: Mapping[str, str] | None = None,
    ti_hashes: Mapping[str, str] | None = None,
    hires_scale: float | None = None,
    hires_steps: int | None = None,
    hires_denoise: float | None = None,
    hires_upscaler: str | None = None,
    schedule_type: str | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> Infotext:
    """The parameters of one image in A1111's order and spelling. `width`/`height` are the first pass's.
    `sampler` is written as A1111 >= 1.9 does: the sampler, then its "Schedule type" when it has one."""
    params: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": float(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        # only for a VAE other than the checkpoint's own, as A1111 writes them (the hash is AutoV2)
        "VAE hash": vae_hash,
        "VAE": vae_name,
    }
    if hires_scale is not None:
        params["Denoising strength"] = float(hires_denoise or 0.0)
    # img2img / inpaint fields (Denoising strength, Mask blur, Inpaint area ...), where A1111 puts them
    params.update(extra or {})
    if clip_skip > 1:
        params["Clip skip"] = clip_skip
    if hires_scale is not None:
        params["Hires upscale"] = float(hires_scale)
        if hires_steps is not None:
            params["Hires steps"] = hires_steps
        if hires_upscaler:
            params["Hires upscaler"] = hires_upscaler
    if lora_hashes:
        params["Lora hashes"] = _hash_list(lora_hashes)
    if ti_hashes:
        params["TI hashes"] = _hash_list(ti_hashes)
    params["Version"] = f"{SERVICE_NAME} {__version__}"
    params = {k: v for k, v in params.items() if v is not None}
    return Infotext(prompt=prompt, negative_prompt=negative_prompt,
                    params={k: _format_value(v) for k, v in params.items()})


def unquote(value: str) -> str:
    """A parameter's value without A1111's JSON quoting."""
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_hash_list(value: str) -> dict[str, str]:
    """`Lora hashes` / `TI hashes` back into name -> hash."""
    out = {}
    for item in unquote(value).split(","):
        name, sep, digest = item.strip().rpartition(":")
        if sep:
            out[name.strip()] = digest.strip()
    return out


def parse_infotext(text: str) -> Infotext:
    """Split infotext back into prompt, negative prompt and parameters (A1111's parsing rules)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameters line
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            target = negative
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        target.append(line)
    params = {k.strip(): v.strip() for k, v in _PARAM.findall(last)}
    return Infotext(prompt="\n".join(prompt), negative_prompt="\n".join(negative), params=params)


def encode_png(image: Image.Image, infotext: Infotext | str) -> bytes:
    """PNG bytes carrying the infotext in a `parameters` text chunk."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, infotext if isinstance(infotext, str) else infotext.render())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_infotext(png: bytes) -> Infotext | None:
    """The parsed infotext of a delivered image (PNG text chunk, or the EXIF UserComment of a JPEG or
    WebP), or None when it has none."""
    text = read_infotext_text(png)
    return parse_infotext(text) if text else None


# ------------------------------------------------------------------------------------ output formats

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\0"


def _user_comment(text: str) -> bytes:
    """EXIF UserComment as A1111 writes it (`piexif.helper.UserComment.dump(text, encoding="unicode")`):
    the 8-byte "UNICODE" code, then UTF-16 big-endian."""
    return _UNICODE + text.encode("utf-16-be")


def _read_user_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    code, body = raw[:8], raw[8:]
    if code == _UNICODE:
        # A1111 writes big-endian; some writers use little-endian with a BOM or none
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        return body.decode("utf-16-be", errors="replace").lstrip("\ufeff")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def encode_image(image: Image.Image, infotext: Infotext | str, fmt: str = "png", quality: int = 90) -> bytes:
    """The image as `fmt` carrying the infotext where A1111 puts it: a PNG `parameters` text chunk, or
    the EXIF UserComment of a JPEG or WebP (what A1111's PNG Info, the site and ComfyUI read)."""
    text = infotext if isinstance(infotext, str) else infotext.render()
    if fmt == "png":
        return encode_png(image, text)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}")
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(text)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt.upper(), quality=int(quality), exif=exif.tobytes())
    return buf.getvalue()


def image_format(data: bytes) -> str:
    """"png", "jpeg" or "webp" from an encoded image's first bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("not a PNG, JPEG or WebP image")


def read_infotext_text(data: bytes) -> str | None:
    """The raw infotext of a PNG, JPEG or WebP (None when it carries none)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return img.text.get(PNG_TEXT_KEY) if hasattr(img, "text") else None
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    return _read_user_comment(raw) if raw else None


# ------------------------------------------------------------------------------- infotext -> request


class InfotextInvalid(ValueError):
    """Infotext whose parameters cannot become a request (a number that is not one, a bad size)."""


def _as(kind: type, key: str, value: str) -> Any:
    try:
        return kind(unquote(value))
    except ValueError:
        raise InfotextInvalid(f"infotext {key}: {value!r} is not a {kind.__name__}") from None


def request_fields(text: str) -> dict[str, Any]:
    """The generation-request fields (`/v1/generations` names) an A1111 infotext asks for: prompts,
    steps, sampler (with A1111 >= 1.9's separate "Schedule type"), CFG scale, seed, size, clip skip,
    the model (as the checkpoint), the VAE, hires fix. LoRAs come back through the `<lora:...>` tags the
    prompt carries; parameters with no request field (Version, hashes ...) are ignored."""
    info = parse_infotext(text)
    p = info.params
    out: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    if "Steps" in p:
        out["steps"] = _as(int, "Steps", p["Steps"])
    if "Sampler" in p:
        out["sampler"] = unquote(p["Sampler"])
        if p.get("Schedule type"):
            out["scheduler"] = unquote(p["Schedule type"])
    if "CFG scale" in p:
        out["cfg_scale"] = _as(float, "CFG scale", p["CFG scale"])
    if "Seed" in p:
        out["seed"] = _as(int, "Seed", p["Seed"])
    if "Size" in p:
        w, sep, h = unquote(p["Size"]).partition("x")
        if not sep:
            raise InfotextInvalid(f"infotext Size: {p['Size']!r} is not WIDTHxHEIGHT")
        out["width"], out["height"] = _as(int, "Size", w), _as(int, "Size", h)
    if "Clip skip" in p:
        out["clip_skip"] = _as(int, "Clip skip", p["Clip skip"])
    if "Model" in p:
        out["checkpoint"] = unquote(p["Model"])
    if "VAE" in p:
        out["vae"] = unquote(p["VAE"])
    if "Hires upscale" in p:
        hires: dict[str, Any] = {"scale": _as(float, "Hires upscale", p["Hires upscale"])}
        if "Denoising strength" in p:
            hires["denoise"] = _as(float, "Denoising strength", p["Denoising strength"])
        if "Hires steps" in p:
            hires["steps"] = _as(int, "Hires steps", p["Hires steps"])
        if "Hires upscaler" in p:
            hires["upscaler"] = unquote(p["Hires upscaler"])
        out["hires"] = hires
    return out
