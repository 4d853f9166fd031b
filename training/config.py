"""Limits and defaults for training jobs, loaded from `configs/training.yaml`.

Kept apart from the settings tree because these are product rules (what a user may ask for),
not deployment knobs; they change with pricing and hardware, not with the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genserve.core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeLimits(_Strict):
    """Caps on an uploaded dataset; every one is checked before a byte is decoded."""

    max_upload_bytes: int = 1 << 30
    max_members: int = 4000
    max_images: int = 1000
    max_total_bytes: int = 2 << 30  # uncompressed, summed over the archive
    max_file_bytes: int = 64 << 20  # uncompressed, one member
    max_caption_bytes: int = 16 << 10
    max_compression_ratio: float = 100.0
    max_image_pixels: int = 50_000_000  # decoded width * height
    min_side: int = 64
    max_side: int = 2048  # larger images are downscaled to this
    # near-duplicates: dHash bits that may differ AND mean 8x8 colour difference (0-255)
    duplicate_hash_bits: int = 4
    duplicate_color_delta: float = 12.0


class BaseModelSpec(_Strict):
    """The checkpoint a family trains on (an id from models.yaml) and its native resolution."""

    checkpoint: str
    resolution: int


class ParamLimits(_Strict):
    max_epochs: int = 50
    max_repeats: int = 5000
    max_batch_size: int = 9
    max_steps: int = 10_000
    min_resolution: int = 64
    max_resolution: int = 2048
    max_network_dim: int = 128
    max_network_alpha: float = 128.0
    max_lr: float = 1.0
    max_keep_tokens: int = 8
    max_trigger_words: int = 4
    max_trigger_chars: int = 64
    bucket_step: int = 64


class ParamDefaults(_Strict):
    epochs: int = 10
    # repeats = clamp(ceil(target_images_per_epoch / images), 1, max_repeats) unless given
    target_images_per_epoch: int = 200
    batch_size: int = 4
    enable_bucket: bool = True
    unet_lr: float = 5e-4
    text_encoder_lr: float = 0.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "cosine_with_restarts"
    lr_scheduler_num_cycles: int = 3
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    network_dim: int = 32
    network_alpha: float = 16.0
    noise_offset: float = 0.1
    min_snr_gamma: float = 5.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    gradient_checkpointing: bool = True
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    cache_latents: bool = True


class SampleSettings(_Strict):
    """Preview images rendered after every epoch (through the generator's safety path)."""

    enabled: bool = True
    count: int = Field(1, ge=0, le=4)
    steps: int = Field(20, ge=1, le=50)
    guidance_scale: float = 7.0
    max_steps: int = Field(50, ge=1, le=150)  # a user's sample prompt may ask for up to this many (--s)


class CaptioningSettings(_Strict):
    """Auto-captioning (training/captioning.py). Model files are operator-provided paths (relative ones
    under the config folder); `kind: none` turns it off."""

    kind: Literal["none", "wd_tagger", "vlm"] = "none"
    model_path: str | None = None  # wd_tagger: the .onnx model
    tags_csv: str | None = None  # wd_tagger: its selected_tags.csv
    general_threshold: float = Field(0.35, gt=0, lt=1)
    character_threshold: float = Field(0.85, gt=0, lt=1)
    max_tags: int = Field(40, ge=1, le=200)
    replace_underscores: bool = True
    exclude_tags: list[str] = []
    # tagger tags that are a minor signal for the dataset policy (matched with '_' or ' ')
    minor_tags: list[str] = ["loli", "shota", "child", "toddler", "baby", "aged_down", "kindergarten_uniform",
                             "elementary_school_student"]
    # tagger ratings that make an image mature for the dataset policy
    mature_ratings: list[str] = ["questionable", "explicit"]
    vlm_backend: str | None = None  # vlm: the name a backend was registered under
    vlm_options: dict[str, str] = {}
    vlm_prompt: str = "Describe this image in one sentence for a training caption."
    max_caption_chars: int = Field(1000, ge=16, le=16384)
    max_images: int = Field(1000, ge=1)  # per captioning request


class RetentionSettings(_Strict):
    """How long a finished job's per-epoch LoRAs stay downloadable (the final LoRA is a resource and stays)."""

    epoch_loras_days: float = Field(30.0, gt=0)


class TrainingLimits(_Strict):
    intake: IntakeLimits = IntakeLimits()
    base_models: dict[str, BaseModelSpec]
    limits: ParamLimits = ParamLimits()
    defaults: ParamDefaults = ParamDefaults()
    samples: SampleSettings = SampleSettings()
    captioning: CaptioningSettings = CaptioningSettings()
    retention: RetentionSettings = RetentionSettings()

    @classmethod
    def load(cls, path: str | Path) -> TrainingLimits:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except OSError as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}", code="config_invalid") from exc
        except (yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"invalid training config {path}: {exc}", code="config_invalid") from exc

    @classmethod
    def from_settings(cls, settings) -> TrainingLimits:  # noqa: ANN001 - genserve Settings
        return cls.load(settings.config_path(settings.training.config_file))
