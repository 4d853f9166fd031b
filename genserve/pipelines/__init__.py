"""Stable Diffusion pipelines: loading checkpoints (diffusers folders or single files) and exporting them."""

from genserve.pipelines.loading import (
    CheckpointLoadError,
    default_device,
    default_dtype,
    load_pipeline,
    pipeline_class,
)
from genserve.pipelines.single_file import pipeline_to_ldm

__all__ = [
    "CheckpointLoadError",
    "default_device",
    "default_dtype",
    "load_pipeline",
    "pipeline_class",
    "pipeline_to_ldm",
]
