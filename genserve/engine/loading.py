"""Load a Stable Diffusion pipeline from a local diffusers folder or a single safetensors file.

Only safetensors are ever read (no pickle), nothing is fetched from a hub, and the device and dtype
are picked at run time so the same code serves a CPU test box and a CUDA worker.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from genserve.core.errors import ConfigError, GenserveError, InvalidRequest, NotFound

# Loading with low_cpu_mem_usage builds modules under accelerate's `init_empty_weights`, which patches
# torch.nn.Module globally for the whole process: any module built in another thread meanwhile (a
# second checkpoint, a LoRA's adapter layers) comes out on the meta device. Every model construction
# in the service holds this lock.
MODEL_BUILD_LOCK = threading.RLock()

PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd1": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
FORMATS = ("diffusers", "safetensors")


class CheckpointLoadError(GenserveError):
    """The checkpoint exists but is not a loadable pipeline of its declared family and format."""

    code = "checkpoint_load_failed"
    http_status = 422


def disable_progress_bars() -> None:
    """Loading and saving bars are noise in service logs."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def pipeline_class(family: str) -> type[DiffusionPipeline]:
    try:
        return PIPELINE_CLASSES[family]
    except KeyError:
        raise InvalidRequest(
            f"unknown model family {family!r}; expected one of {sorted(PIPELINE_CLASSES)}",
            code="unknown_family",
        ) from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """Half precision on CUDA (the SD1/SDXL weights are published for it), full precision on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_pipeline(
    family: str,
    path: Path,
    fmt: str,
    config_dir: Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | None = None,
) -> DiffusionPipeline:
    """Load the pipeline of `family` stored at `path` as `fmt` and move it to `device`.

    `fmt="diffusers"`: `path` is a `save_pretrained` folder with safetensors weights.
    `fmt="safetensors"`: `path` is an original-layout single file; `config_dir` is the diffusers config
    folder (model_index.json, component configs, tokenizers, scheduler) describing its architecture,
    which must be local because detection would otherwise fetch configs from the hub.
    """
    cls = pipeline_class(family)
    path = Path(path)
    device = device or default_device()
    dtype = torch_dtype or default_dtype(device)
    if fmt not in FORMATS:
        raise InvalidRequest(
            f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}", code="unknown_format"
        )
    if not path.exists():
        raise NotFound(f"checkpoint not found: {path}", code="checkpoint_not_found")

    disable_progress_bars()
    try:
        if fmt == "diffusers":
            if not path.is_dir():
                raise InvalidRequest(
                    f"a diffusers checkpoint is a folder: {path}", code="not_a_diffusers_folder"
                )
            with MODEL_BUILD_LOCK:
                pipe = cls.from_pretrained(path, use_safetensors=True, local_files_only=True, dtype=dtype)
        else:
            # the extension decides how diffusers reads the file: anything else would be unpickled
            if path.suffix != ".safetensors" or not path.is_file():
                raise InvalidRequest(
                    f"single-file checkpoints must be .safetensors: {path}", code="not_safetensors"
                )
            if config_dir is None or not (Path(config_dir) / "model_index.json").is_file():
                raise ConfigError(
                    f"single-file checkpoint {path.name} needs a local diffusers config folder (got {config_dir})",
                    code="single_file_config_missing",
                )
            with MODEL_BUILD_LOCK:
                pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype)
    except GenserveError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointLoadError(
            f"cannot load {family} {fmt} checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from exc

    left_on_meta = [
        name for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module) and any(p.is_meta for p in component.parameters())
    ]
    if left_on_meta:
        raise CheckpointLoadError(f"cannot load {family} {fmt} checkpoint {path}: weights missing for {left_on_meta}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
