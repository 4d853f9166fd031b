"""Settings of the generation engine and its Ray Serve worker (the `worker:` section of the settings tree).

Kept free of torch/diffusers imports: the settings tree is loaded by every process, most of which
never generate an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoraCacheLimits(BaseModel):
    """How many LoRA adapters a loaded checkpoint keeps resident, and how many bytes of weights."""

    model_config = ConfigDict(extra="forbid")

    max_adapters: int = Field(8, ge=1)
    max_bytes: int = Field(1 << 30, ge=1)


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # checkpoints resident per replica (Serve multiplexing, LRU)
    max_models_per_replica: int = Field(2, ge=1)
    lora_cache: LoraCacheLimits = LoraCacheLimits()
    # VAEs that requests chose, kept built per loaded checkpoint (an SD1/SDXL VAE is ~160 MB in fp16)
    vae_cache_size: int = Field(2, ge=1)
    # local copies of published checkpoints/LoRAs/embeddings; None: <models_dir>/cache
    resource_cache_dir: Path | None = None
    resource_cache_max_bytes: int = Field(64 << 30, ge=1)
    # how long a "not blocklisted" answer for a resident LoRA stays valid before it is asked again
    blocklist_refresh_s: float = Field(60.0, ge=0)
    # CUDA only: xformers attention when the package is installed, else torch SDPA
    enable_xformers: bool = False
    channels_last: bool = True
    # a replica busy generating with no step progress for this long is reported unhealthy
    wedge_timeout_s: float = Field(300.0, gt=0)
    # the replica's CPU threads: torch intra-op on a CPU device, and the image scanner's
    # onnxruntime session on any device (0: every core; torch's default, and for the scanner the
    # count of cores this process may use, given explicitly so onnxruntime does not pin its threads)
    cpu_threads: int = Field(0, ge=0)
    # the image scanner's threads where they should differ from `cpu_threads` (0: every core). The
    # last image's scan is on every request's critical path while the denoiser idles, so a CPU
    # replica pinned to one torch thread still scans faster on more
    scan_threads: int | None = Field(None, ge=0)
    # hard limits the worker enforces whatever the caller validated
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(20, ge=1)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    # images of one request run together in one pipeline call, per family (`quantity` in batches); each
    # keeps its own seeded noise (seed, seed+1, ... as A1111), so a batch gives the one-by-one images up
    # to the float rounding of batched kernels (at most 1/255 per channel, measured on CPU for both
    # families and every batch size here: tests/test_engine_generate.py). SD1 512²: 4 gains ~+39 %
    # throughput; SDXL 1024² at 2 fits a 24 GB GPU in fp16. A family missing here, or 1, runs one by one.
    batch_size: dict[str, int] = Field(default_factory=lambda: {"sd1": 4, "sdxl": 2})

    @property
    def image_scan_threads(self) -> int:
        return self.cpu_threads if self.scan_threads is None else self.scan_threads

    def cache_dir(self, models_dir: Path) -> Path:
        return (self.resource_cache_dir or models_dir / "cache").resolve()
