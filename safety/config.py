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
    # a user whose input images were refused this many times within the window may not send more until
    # it passes: each refusal names its rule, so unlimited tries would let a determined user search
    # turns, crops and occlusions for one the scan misses. Bounded so config cannot switch it off.
    input_strikes: int = Field(5, ge=1, le=20)
    input_strike_window_s: int = Field(86_400, ge=3_600, le=30 * 86_400)
