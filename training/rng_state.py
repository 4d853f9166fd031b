"""The random state a checkpoint carries, so a resumed run draws what an uninterrupted one would have.

The trainer's own generator drives every draw of a step; torch's global CPU and CUDA states are kept
too, for anything that draws without a generator.
"""

from __future__ import annotations

import torch


def capture_rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The generator's state and torch's global CPU / per-device CUDA states, as uint8 tensors."""
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def restore_rng_state(generator: torch.Generator, rng: dict[str, torch.Tensor]) -> None:
    """Undo `capture_rng_state`; CUDA states are restored only where CUDA is available."""
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
