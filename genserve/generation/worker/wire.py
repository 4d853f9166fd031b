"""What the ingress sends to a generation worker and what streams back.

Plain pydantic models: they cross process boundaries (Ray pickles them), so both sides import the
same classes, and every model carries `schema_version` so a mixed-version rollout fails loudly
instead of misreading a field. A request has no field for raw prompt embeddings or for switching
off the safety embeddings: the worker always builds the prompts itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safety.image_scan import FACE_SCORE_FLOOR, ScanResult
from safety.levels import NsfwLevel

# 3: output format and quality; EncodedImage.data + format. 4: priority. 5: vae.
# 6: init (img2img, inpaint), face_fix
SCHEMA_VERSION = 6
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4000


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Frozen):
    resource_id: str = Field(min_length=1, max_length=64)
    strength: float = Field(1.0, ge=-4.0, le=4.0)


class HiresSpec(_Frozen):
    """A1111's hires fix: upscale the first pass by `scale`, then an img2img pass at `denoise`."""

    scale: float = Field(ge=1.0, le=4.0)
    # 0 skips the second pass (the upscaled first image is the result)
    denoise: float = Field(0.5, ge=0.0, le=1.0)
    # steps of the second pass; None: the same as the first pass
    steps: int | None = Field(None, ge=1, le=150)
    # "latent": interpolate the latents (A1111 "Latent"); "lanczos": decode, resize the image, encode
    upscaler: Literal["latent", "lanczos"] = "latent"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: the one rule the admission (quote, limits) and the worker both use."""
        return hires_size(width, height, self.scale)


def hires_size(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    return (int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple)


def denoise_steps(steps: int, denoise: float) -> int:
    """The steps an img2img pass of `steps` at `denoise` runs (A1111's and diffusers' rule, int(steps x
    strength)): what the worker runs and what the quote charges. 0: the input comes back unchanged."""
    return min(int(steps * denoise), steps)


class InitSpec(_Frozen):
    """An img2img or inpaint input, by object-store key (the worker reads the store; no bytes on the wire)
    and the SHA-256 of the PNG there, which the worker checks before using it."""

    workflow: Literal["img2img", "inpaint"]
    image_key: str = Field(min_length=1, max_length=512)
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mask_key: str | None = Field(None, min_length=1, max_length=512)
    mask_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    denoise: float = Field(0.75, ge=0.0, le=1.0)
    resize_mode: Literal["just_resize", "crop_and_resize", "resize_and_fill"] = "just_resize"
    mask_blur: int = Field(4, ge=0, le=64)
    only_masked: bool = True
    padding: int = Field(32, ge=0, le=256)

    @model_validator(mode="after")
    def _mask_for_inpaint(self) -> InitSpec:
        if (self.workflow == "inpaint") != (self.mask_key is not None and self.mask_sha256 is not None):
            raise ValueError("an inpaint input has a mask, an img2img input none")
        return self

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.image_key, self.mask_key) if k]


class FaceFixSpec(_Frozen):
    """ADetailer-style face fix after each image: every face the detector finds (up to `max_faces`, at
    `confidence` or above) is inpainted, only masked, at the image's working size and pasted back."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="empty: the image's own prompt")
    denoise: float = Field(0.4, ge=0.0, le=1.0)
    confidence: float = Field(FACE_SCORE_FLOOR, ge=0.05, le=1.0)
    padding: int = Field(32, ge=0, le=256)
    mask_blur: int = Field(4, ge=0, le=64)
    max_faces: int = Field(2, ge=1, le=4)


class WorkerRequest(_Frozen):
    """One generation: `len(seeds)` images, image i drawn from `seeds[i]` alone (reproducible one by one)."""

    schema_version: int = SCHEMA_VERSION
    job_id: str = Field(min_length=1, max_length=64)
    checkpoint_id: str = Field(min_length=1, max_length=64)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    # the caller's verdict that mature content is allowed; the safety embeddings are injected either way
    mature: bool = False
    sampler: str = "Euler a"
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    # A1111 convention: 1 = last CLIP layer, 2 = penultimate ...
    clip_skip: int = Field(1, ge=1, le=12)
    width: int = Field(512, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=1, max_length=64)
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16)
    # textual-inversion resource ids the prompt may use by their tokens
    embeddings: list[str] = Field(default_factory=list, max_length=16)
    # a VAE resource id to decode (and hires-encode) with; None: the checkpoint's own
    vae: str | None = Field(None, min_length=1, max_length=64)
    hires: HiresSpec | None = None
    # how the images are encoded; the infotext goes where A1111 puts it (PNG text chunk, EXIF UserComment)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality")
    # paid priority: the order in which waiting requests get the checkpoint (`PriorityLock`)
    priority: Literal["low", "normal", "high"] = "normal"
    # img2img / inpaint: the input image (and mask) in the object store; None is txt2img
    init: InitSpec | None = None
    face_fix: FaceFixSpec | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported worker schema version {v}; this worker speaks {SCHEMA_VERSION}")
        return v

    @model_validator(mode="after")
    def _distinct_resources(self) -> WorkerRequest:
        ids = [spec.resource_id for spec in self.loras]
        if len(set(ids)) != len(ids):
            raise ValueError("a LoRA may be listed once")
        if len(set(self.embeddings)) != len(self.embeddings):
            raise ValueError("an embedding may be listed once")
        if self.init is not None and self.hires is not None:
            raise ValueError("hires fix is a txt2img pass; an input image has none")
        return self


class _StreamItem(_Frozen):
    """What every item of a generation stream carries; `kind` (a literal per subclass) tells them apart."""

    schema_version: int = SCHEMA_VERSION
    job_id: str


class ProgressEvent(_StreamItem):
    """One finished denoising step. `step` counts 1..`total_steps` over both passes of image `image_index`."""

    kind: Literal["progress"] = "progress"
    image_index: int
    image_count: int
    step: int
    total_steps: int


class EncodedImage(_StreamItem):
    """A finished image, encoded (`format`: png, jpeg or webp) and streamed as soon as it is: the caller
    stores it while the worker still scans it. Its verdict comes with the `WorkerResult`; until then it
    is not delivered."""

    kind: Literal["image"] = "image"
    index: int
    seed: int
    data: bytes
    format: Literal["png", "jpeg", "webp"] = "png"

    @property
    def png(self) -> bytes:
        """The encoded bytes (the field's name before schema 3; whatever `format` says they are)."""
        return self.data


class ImageScan(_Frozen):
    """The image scanner's findings. `level` is the NSFW level's name ("pg", "pg13", "r", "x"), None when
    the scan could not finish; `errors` lists scanners that failed (either makes the image undeliverable)."""

    level: str | None
    detections: list[dict] = Field(default_factory=list)
    minor_signal: bool = False
    errors: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.level is not None and not self.errors

    @classmethod
    def of(cls, result: ScanResult) -> ImageScan:
        return cls(level=result.level.to_wire(), detections=[d.to_dict() for d in result.detections],
                   minor_signal=result.minor_signal, errors=list(result.scanner_errors))

    @classmethod
    def unfinished(cls, error: str) -> ImageScan:
        return cls(level=None, errors=[error])

    def to_scan_result(self) -> ScanResult:
        """The report as the policy reads it; a scan that did not finish is a failed scan."""
        errors = tuple(self.errors) or (() if self.level is not None else ("the image scan did not finish",))
        try:
            level = NsfwLevel.X if self.level is None else NsfwLevel.from_wire(self.level)
        except ValueError as exc:
            level, errors = NsfwLevel.X, (*errors, str(exc))
        return ScanResult(level=level, minor_signal=self.minor_signal, scanner_errors=errors)


class ImageResult(_Frozen):
    """The verdict on one image whose PNG came earlier in the stream as an `EncodedImage`."""

    index: int
    seed: int
    width: int
    height: int
    scan: ImageScan
    # False when the scan failed (fail closed); the caller still compares `scan.level` to what is allowed
    deliverable: bool
    # set when a pass after the denoise failed on this image (`face_fix_failed`): it has no PNG
    failure: str | None = None
    face_passes: int = Field(0, ge=0)  # face-fix passes run: the capture gives back those held but not run


class WorkerResult(_StreamItem):
    """The last item of a generation stream (after one `EncodedImage` per finished image). A
    canceled run holds only the images that finished."""

    kind: Literal["result"] = "result"
    checkpoint_id: str
    images: list[ImageResult]
    canceled: bool = False
    final_prompt: str
    final_negative_prompt: str
    # AutoV2 (10 hex) of the checkpoint; resource id -> AutoV3 (12 hex) of each LoRA
    model_hash: str
    lora_hashes: dict[str, str] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)


WorkerStreamItem = ProgressEvent | EncodedImage | WorkerResult
