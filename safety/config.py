"""Safety settings (the `safety:` section of the settings tree)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SafetyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules_dir: str = "safety"
    likeness_file: str = "likeness.yaml"  # fingerprint thresholds, under rules_dir
    image_scan_file: str = "image_scan.yaml"  # NudeNet thresholds, extra scanners, timeout; under rules_dir
    # an input image whose perceptual hash is within this many bits (of 64) of a known-abusive one is refused
    image_hash_max_distance: int = Field(8, ge=0, le=24)
