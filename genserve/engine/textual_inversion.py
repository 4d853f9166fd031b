"""Users' textual-inversion embeddings, loaded into a pipeline for one request and removed after it.

Files are safetensors only. SD1: one tensor (`emb_params`, `string_to_param`-style flattening or any
single key) of shape [n, dim] or [dim]. SDXL: `clip_l` and `clip_g`, one per text encoder. Removing
only the request's tokens leaves the mandatory safety embeddings in place (the health check verifies
their rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from genserve.core.errors import InvalidRequest
from safety.embeddings import token_ids

_SDXL_KEYS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))


class EmbeddingInvalid(InvalidRequest):
    code = "embedding_invalid"


def _vectors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise EmbeddingInvalid(f"not a readable safetensors embedding: {exc}") from exc
    if not tensors:
        raise EmbeddingInvalid("the embedding file holds no tensors")
    return {k: (v if v.ndim == 2 else v.reshape(1, -1)) for k, v in tensors.items()}


def _targets(pipe: Any, family: str, tensors: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, Any, Any]]:
    if family == "sdxl":
        if sorted(tensors) != ["clip_g", "clip_l"]:
            raise EmbeddingInvalid(f"an SDXL embedding holds clip_l and clip_g, not {sorted(tensors)}")
        return [(tensors[key], getattr(pipe, enc), getattr(pipe, tok)) for key, enc, tok in _SDXL_KEYS]
    if len(tensors) != 1:
        raise EmbeddingInvalid(f"an SD1 embedding holds one tensor, not {sorted(tensors)}")
    return [(next(iter(tensors.values())), pipe.text_encoder, pipe.tokenizer)]


@contextlib.contextmanager
def user_embeddings(pipe: Any, family: str, files: Sequence[tuple[Path, str]]) -> Iterator[None]:
    """Load each (file, token) into `pipe` for the block; always removed afterwards."""
    loaded: list[tuple[list[str], Any, Any]] = []
    try:
        for path, token in files:
            for vectors, encoder, tokenizer in _targets(pipe, family, _vectors(path)):
                if token_ids(tokenizer, [token]) != [None]:
                    raise EmbeddingInvalid(f"token {token!r} is already in the vocabulary")
                names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
                try:
                    pipe.load_textual_inversion(vectors.to(encoder.dtype), token=token, text_encoder=encoder,
                                                tokenizer=tokenizer)
                except (ValueError, RuntimeError) as exc:
                    raise EmbeddingInvalid(f"embedding {token!r} does not fit this checkpoint: {exc}") from exc
                loaded.append((names, encoder, tokenizer))
        yield
    finally:
        for names, encoder, tokenizer in reversed(loaded):
            pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=encoder)
