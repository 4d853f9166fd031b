"""The `generation:` section of the settings tree: how the ingress runs and settles generation jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class InputImageLimits(BaseModel):
    """Bounds on an input image (img2img, inpaint), checked before and while it is decoded."""

    model_config = ConfigDict(extra="forbid")

    # upper bounds too: every input is decoded and scanned in the ingress before anything is held, so
    # a limit raised past them would let one request tie up a replica (and its memory) for long
    max_bytes: int = Field(8 << 20, ge=1024, le=32 << 20, description="encoded size, before decoding")
    max_side: int = Field(4096, ge=64, le=8192)
    # Pillow's decompression-bomb guard, applied to the size the header declares, before any pixel is decoded
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, le=8192 * 8192)
    # Pillow format names; only these formats' parsers ever read an upload
    formats: list[Literal["PNG", "JPEG", "WEBP"]] = Field(default_factory=lambda: ["PNG", "JPEG", "WEBP"],
                                                          min_length=1)


class GenerationConfig(BaseModel):
    """The `generation:` section of the settings tree."""

    model_config = ConfigDict(extra="forbid")

    limits_file: str = "limits.yaml"
    job_timeout_s: float = Field(1200.0, gt=0, description="a job's run time before it is failed")
    timeout_per_resource_s: float = Field(60.0, ge=0, description="added to job_timeout_s per LoRA/embedding")
    hold_margin_s: float = Field(600.0, ge=0, description="a hold outlives its job's timeout by this much")
    wait_timeout_s: float = Field(120.0, gt=0, description="longest `?wait=true` blocks")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0, description="a running job whose heartbeat is older is orphaned")
    reaper_interval_s: float = Field(15.0, gt=0)
    sse_ping_s: float = Field(15.0, gt=0, description="keep-alive comment interval of an idle event stream")
    sse_poll_s: float = Field(0.5, gt=0, description="how often an event stream looks for events from other replicas")
    store_threads: int = Field(4, ge=1, description="images stored at once per ingress replica (while they are scanned)")
    input_images: InputImageLimits = InputImageLimits()
    demo_user: str = "demo"
    demo_balance: int = Field(10_000, ge=0, description="buzz granted once to the demo user by `genserve serve`")
