"""Versioned request and response models of the generation API (`/v1`), and the limits that bound them.

The request models forbid unknown fields: a client cannot smuggle in parameters the service does not
check (`prompt_embeds`, a custom safety switch ...), it gets a 422 naming the field instead. Bounds
here are absolute; the tighter per-tier limits (`TierLimits`) are applied by the service, because the
tier comes from the calling back end, not from the body.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from genserve.core.errors import ConfigError, InvalidRequest
from genserve.engine.schedulers import sampler_names
from genserve.generation.compat import fold_aliases
from genserve.generation.jobs import JobStatus
from genserve.resources.registry import MAX_EXTRA_RESOURCES
from safety.image_scan import FACE_SCORE_FLOOR
from safety.levels import NsfwLevel

API_VERSION = "v1"
MAX_PROMPT_CHARS = 4000
MAX_SEED = 4_294_967_295
# Seeds picked by the service stay below 2^31 - 1: some engines take Int32 seeds.
MAX_RANDOM_SEED = 2_147_483_646
MAX_HIRES_SIDE = 4096
# an absolute bound on a base64 input; the configured byte limit (`generation.input_images`) is tighter
MAX_INPUT_BASE64_CHARS = 24 << 20
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"


def _sampler_member(name: str) -> str:
    """"DPM++ 2M Karras" -> dpmpp_2m_karras."""
    return name.lower().replace("++", "pp").replace(" ", "_").replace("-", "_")


# The engine's samplers, under their A1111 names: the API accepts exactly what the engine implements.
Sampler = enum.Enum("Sampler", {_sampler_member(n): n for n in sampler_names()}, type=str)
Sampler.__doc__ = "A1111 sampler names, as the site's users know them (the engine's list)."


def _level_from_wire(value: object) -> NsfwLevel:
    return value if isinstance(value, NsfwLevel) else NsfwLevel.from_wire(value)  # type: ignore[arg-type]


# safety's one level type, named on the wire ("pg13"), never by its number
WireNsfwLevel = Annotated[
    NsfwLevel,
    BeforeValidator(_level_from_wire),
    PlainSerializer(NsfwLevel.to_wire, return_type=str),
    WithJsonSchema({"type": "string", "enum": [lvl.to_wire() for lvl in NsfwLevel]}),
]


class Priority(str, enum.Enum):
    low = "low"
    normal = "normal"
    high = "high"


def refuse_nul(data: Any) -> Any:
    """A request body's values, refused when any string in them holds a NUL character (no prompt needs
    one, PostgreSQL cannot store one, and C libraries end the string there)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("NUL characters are not allowed")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return data


class _Strict(BaseModel):
    """Request bodies: unknown fields refused, numbers only as JSON numbers (`"steps": true` or
    `"seed": "1"` is a 422, not 1 step or seed 1; fields say `strict=True`), no NUL characters."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        return refuse_nul(data)


# --------------------------------------------------------------------------------------------- requests


class ResourceRef(_Strict):
    """A LoRA or textual-inversion embedding by registry id or AIR alias. `strength` applies to LoRAs."""

    id: str = Field(min_length=1, max_length=256)  # an AIR alias is longer than an id
    strength: float = Field(1.0, ge=-1.0, le=2.0, strict=True)


class HiresFix(_Strict):
    """A second img2img pass on the upscaled first image (A1111's hires fix)."""

    scale: float = Field(1.5, ge=1.0, le=2.0, strict=True, description="upscale factor of the first image")
    denoise: float = Field(0.4, ge=0.0, le=0.75, strict=True)
    steps: int = Field(10, ge=1, le=150, strict=True, description="steps of the second pass")
    upscaler: Literal["latent", "lanczos"] = Field(
        "latent", description='A1111\'s names too: "Latent", "Lanczos" (any case), as the infotext writes them')

    @field_validator("upscaler", mode="before")
    @classmethod
    def _a1111_upscaler(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class FaceFix(_Strict):
    """ADetailer-style face fix after each image (any workflow): each face found is inpainted at the
    image's working size and pasted back."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="the faces' prompt; empty: the image's")
    denoise: float = Field(0.4, ge=0.0, le=1.0, strict=True)
    confidence: float = Field(FACE_SCORE_FLOOR, ge=0.05, le=1.0, strict=True, description="the face detector's minimum score")
    padding: int = Field(32, ge=0, le=256, strict=True)
    mask_blur: int = Field(4, ge=0, le=64, strict=True)
    max_faces: int = Field(2, ge=1, le=4, strict=True, description="faces fixed per image; priced per face")


class InputImage(_Strict):
    """An input image: `data` (base64, or a `data:image/...;base64,` URL) or an image delivered to the
    same user earlier (`job_id` + `index`)."""

    data: str | None = Field(None, min_length=1, max_length=MAX_INPUT_BASE64_CHARS)
    job_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    index: int | None = Field(None, ge=0, le=63, strict=True)

    @model_validator(mode="after")
    def _one_source(self) -> InputImage:
        reference = self.job_id is not None or self.index is not None
        if (self.data is None) == (not reference) or (reference and (self.job_id is None or self.index is None)):
            raise ValueError("give either `data` or both `job_id` and `index`")
        return self


class GenerationRequest(_Strict):
    """`POST /v1/generations` body (API version 1).

    Also accepted, folded into these fields before validation (`generation.compat`): `infotext`
    (A1111's parameters text in place of the fields it names), `sampler_name`, `scheduler` (A1111 >= 1.9's
    schedule type, or ComfyUI's), A1111/Civitai/ComfyUI sampler spellings, `seed: -1` (random), and
    A1111's `override_settings` (`sd_vae`, `CLIP_stop_at_last_layers`).
    """

    version: Literal[1] = 1
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    checkpoint: str = Field(min_length=1, max_length=64, description="checkpoint resource id")
    resources: list[ResourceRef] = Field(default_factory=list, max_length=MAX_EXTRA_RESOURCES)
    vae: str | None = Field(None, min_length=1, max_length=256,
                            description="VAE resource id, AIR alias or name; absent: the checkpoint's own")
    sampler: Sampler = Sampler.euler_a
    steps: int = Field(20, ge=1, le=150, strict=True)
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0, strict=True)
    clip_skip: int = Field(1, ge=1, le=4, strict=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True, description="random when absent; always returned")
    width: int | None = Field(None, ge=8, le=4096, strict=True, description="default: the family's default size")
    height: int | None = Field(None, ge=8, le=4096, strict=True)
    quantity: int = Field(1, ge=1, le=20, strict=True)
    hires: HiresFix | None = None
    nsfw_level: WireNsfwLevel | None = Field(
        None, description="lowers, never raises, the level the site's back end allows this user"
    )
    priority: Priority = Priority.normal
    creator_tip_pct: int = Field(0, ge=0, le=100, multiple_of=5,
                                 description="tip to the resources' owners, % of the base price (5 % steps)")
    platform_tip_pct: int = Field(0, ge=0, le=100, multiple_of=5, description="tip to the platform, % of the base price")
    idempotency_key: str | None = Field(None, pattern=IDEMPOTENCY_KEY_PATTERN)
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="the infotext goes in a PNG text chunk, or a JPEG/WebP EXIF UserComment (as A1111)")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality")
    draft: bool = Field(False, description="the family's fast path: its LCM-style LoRA, fixed few steps, low CFG "
                                           "(steps, cfg_scale and sampler are the draft's)")
    workflow: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    init_image: InputImage | None = Field(None, description="img2img and inpaint: the image to start from")
    mask: InputImage | None = Field(None, description="inpaint: white is repainted, black kept")
    denoise: float = Field(0.75, ge=0.0, le=1.0, strict=True,
                           description="img2img/inpaint denoising strength (A1111's); steps run = steps x denoise")
    resize_mode: Literal["just_resize", "crop_and_resize", "resize_and_fill"] = Field(
        "just_resize", description="how the input meets width x height (A1111's resize modes)")
    mask_blur: int = Field(4, ge=0, le=64, strict=True)
    inpaint_only_masked: bool = Field(True, description="repaint only the mask's padded box at full resolution")
    inpaint_padding: int = Field(32, ge=0, le=256, strict=True, description="pixels around the mask's box")
    face_fix: FaceFix | None = None

    @model_validator(mode="before")
    @classmethod
    def _a1111_aliases(cls, data: Any) -> Any:
        return fold_aliases(data)

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        if type(value) is not int:  # noqa: E721 - `true` and `1.0` are not version 1
            raise ValueError("version must be the integer 1")
        return value

    @field_validator("resources")
    @classmethod
    def _unique_resources(cls, value: list[ResourceRef]) -> list[ResourceRef]:
        ids = [r.id for r in value]
        if len(set(ids)) != len(ids):
            raise ValueError("each resource may be listed once")
        return value

    @model_validator(mode="after")
    def _size_pair(self) -> GenerationRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together")
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the body without the idempotency key: a reused key with another body is a conflict."""
        body = self.model_dump(mode="json", exclude={"idempotency_key"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class QuoteRequest(GenerationRequest):
    """`POST /v1/quotes`: the same body as a generation; nothing is held or created."""


# --------------------------------------------------------------------------------------------- responses


class QuoteItemView(BaseModel):
    name: str
    amount: int
    detail: str = ""


class QuoteView(BaseModel):
    total: int
    per_image: int
    quantity: int
    items: list[QuoteItemView] = Field(default_factory=list)
    balance_available: int | None = None


class ImageView(BaseModel):
    index: int
    seed: int
    key: str
    url: str
    nsfw_level: str
    sha256: str


class WithheldImageView(BaseModel):
    index: int
    seed: int
    nsfw_level: str | None = None
    reasons: list[str]


class ErrorView(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ProgressView(BaseModel):
    step: int = 0
    total: int = 0
    image: int = 0
    images: int = 0


class JobView(BaseModel):
    """`GET /v1/generations/{id}`: everything a client needs, images included once finished."""

    id: str
    status: JobStatus
    user_id: str
    checkpoint: str
    family: str
    priority: Priority
    seeds: list[int]
    quantity: int
    quote: int
    charged: int
    progress: ProgressView
    images: list[ImageView] = Field(default_factory=list)
    withheld: list[WithheldImageView] = Field(default_factory=list)
    infotext: str | None = None
    error: ErrorView | None = None
    safety: dict[str, Any] | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


class BalanceView(BaseModel):
    user_id: str
    posted: int
    held: int
    available: int


# --------------------------------------------------------------------------------------------- limits


class TierLimits(_Strict):
    """What one membership tier may ask for (Civitai's defaults by tier)."""

    quantity: int = Field(ge=1)
    queue: int = Field(ge=1, description="jobs queued or running at once")
    steps: int = Field(ge=1)
    resources: int = Field(ge=0, le=MAX_EXTRA_RESOURCES)
    priorities: list[Priority] = Field(default_factory=lambda: [Priority.low, Priority.normal])
    hires: bool = True


DEFAULT_TIERS: dict[str, TierLimits] = {
    "free": TierLimits(quantity=4, queue=4, steps=50, resources=9),
    "founder": TierLimits(quantity=8, queue=8, steps=50, resources=9, priorities=list(Priority)),
    "bronze": TierLimits(quantity=8, queue=8, steps=50, resources=12, priorities=list(Priority)),
    "silver": TierLimits(quantity=10, queue=10, steps=60, resources=12, priorities=list(Priority)),
    "gold": TierLimits(quantity=12, queue=10, steps=60, resources=12, priorities=list(Priority)),
}


class Limits(_Strict):
    """Tier limits plus the service-wide admission bounds (`configs/limits.yaml`, hot-reloadable)."""

    default_tier: str = "free"
    tiers: dict[str, TierLimits] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    max_active_jobs: int = Field(64, ge=1, description="jobs queued or running in the whole service")
    # share of max_active_jobs each priority may fill: low work is refused first when the service is busy
    priority_share: dict[Priority, float] = Field(
        default_factory=lambda: {Priority.low: 0.75, Priority.normal: 0.9, Priority.high: 1.0}
    )
    retry_after_s: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _default_tier_known(self) -> Limits:
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers {sorted(self.tiers)}")
        return self

    def tier(self, name: str | None) -> TierLimits:
        key = name or self.default_tier
        if key not in self.tiers:
            raise InvalidRequest(f"unknown tier {key!r}", code="unknown_tier", details={"tiers": sorted(self.tiers)})
        return self.tiers[key]

    def admits(self, priority: Priority, active_jobs: int) -> bool:
        """Whether one more job of `priority` fits while `active_jobs` are queued or running."""
        return active_jobs < int(self.max_active_jobs * self.priority_share.get(priority, 1.0))

    @classmethod
    def load(cls, path: Path) -> Limits:
        if not path.exists():
            return cls()
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"invalid limits file {path}: {exc}", code="limits_invalid") from exc
