"""A VAE chosen by a request in place of the checkpoint's own: loaded, cached and swapped in for one job.

A1111 loads a VAE file's weights into the checkpoint's autoencoder and keeps the checkpoint's
configuration (its latent scaling factor above all: SD1's 0.18215, SDXL's 0.13025); so does this
module: the VAE is built from the checkpoint's own VAE config and takes only the file's weights, in
A1111/Civitai's LDM layout or diffusers'. Only safetensors files are read.

Swapping modules rather than copying weights keeps the checkpoint's own VAE untouched, so the next
job without a VAE gets exactly the checkpoint's pixels back, and a cached VAE costs no copy per job.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file

from genserve.core.errors import InvalidRequest
from genserve.engine.loading import MODEL_BUILD_LOCK
from genserve.engine.views import pipeline_views

_LDM_PREFIXES = ("first_stage_model.", "vae.")


class VaeInvalid(InvalidRequest):
    """A registered VAE whose weights do not fit the checkpoint's autoencoder (another architecture)."""

    code = "vae_invalid"


def _diffusers_state(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The file's tensors under diffusers' names (LDM files are converted; their attention projections
    are 1x1 convolutions there and linear layers here)."""
    if any(".down_blocks." in k or ".up_blocks." in k for k in tensors):
        return tensors
    ldm = {next((k[len(p):] for p in _LDM_PREFIXES if k.startswith(p)), k): v for k, v in tensors.items()}
    return convert_ldm_vae_checkpoint(ldm, config)


def load_vae(path: Path, like: AutoencoderKL) -> AutoencoderKL:
    """The VAE file at `path` as an autoencoder with `like`'s config, on `like`'s device and dtype."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VaeInvalid(f"VAE files are safetensors: {path.name}")
    try:
        state = _diffusers_state(load_file(str(path), device="cpu"), dict(like.config))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
        raise VaeInvalid(f"cannot read the VAE {path.name}: {type(exc).__name__}: {exc}") from exc
    with MODEL_BUILD_LOCK:  # accelerate's empty-weights patch is process-wide (engine.loading)
        vae = AutoencoderKL.from_config(like.config)
    try:
        missing, unexpected = vae.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another architecture
        raise VaeInvalid(f"the VAE {path.name} does not fit this checkpoint: {exc}") from exc
    if missing or unexpected:
        raise VaeInvalid(f"the VAE {path.name} does not fit this checkpoint",
                         details={"missing": sorted(missing)[:5], "unexpected": sorted(unexpected)[:5]})
    return vae.to(device=like.device, dtype=like.dtype).eval().requires_grad_(False)


class VaeCache:
    """The VAEs one loaded checkpoint has used recently (by file SHA-256), and the checkpoint's own."""

    def __init__(self, own: AutoencoderKL | None, max_entries: int = 2):
        self.own = own
        self.max_entries = max_entries
        self._vaes: OrderedDict[str, AutoencoderKL] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, path: Path) -> AutoencoderKL:
        if self.own is None:
            raise RuntimeError("this VAE cache's checkpoint was unloaded")
        with self._lock:
            vae = self._vaes.get(sha256)
            if vae is not None:
                self._vaes.move_to_end(sha256)
                return vae
        vae = load_vae(path, self.own)
        with self._lock:
            self._vaes[sha256] = vae
            while len(self._vaes) > self.max_entries:
                self._vaes.popitem(last=False)
        return vae

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._vaes

    def clear(self) -> None:
        with self._lock:
            self._vaes.clear()

    def close(self) -> None:
        """Drop every module, the checkpoint's own too (its checkpoint is being unloaded)."""
        self.clear()
        self.own = None


@contextlib.contextmanager
def vae_swapped(pipe: DiffusionPipeline, vae: AutoencoderKL | None, own: AutoencoderKL) -> Iterator[None]:
    """`pipe` and its txt2img/img2img views decode with `vae` inside the block, with `own` after it.
    The views are looked up again on the way out: one made inside the block took `vae` from `pipe`."""
    if vae is None:
        yield
        return
    for target in (pipe, *pipeline_views(pipe)):
        target.vae = vae
    try:
        yield
    finally:
        for target in (pipe, *pipeline_views(pipe)):
            target.vae = own
