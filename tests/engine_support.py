"""Shared set-up of the engine and worker tests: a tiny pipeline with its safety embeddings loaded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a shared 2-core box oversubscribes badly with more."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def safety_embeddings(tiny_model):
    from safety.embeddings import EmbeddingSpec, SafetyEmbeddings

    return SafetyEmbeddings(
        tiny_model.family,
        general=EmbeddingSpec("<gs-safe-neg>", tiny_model.embeddings["general"]),
        minor=EmbeddingSpec("<gs-safe-minor>", tiny_model.embeddings["minor"]),
    )


def load_tiny(tiny_model):
    """(pipeline on CPU with the safety embeddings loaded, SafetyEmbeddings)."""
    from genserve.core.config.worker import WorkerConfig
    from genserve.engine.generate import prepare_pipeline
    from genserve.engine.loading import load_pipeline

    pipe = prepare_pipeline(load_pipeline(tiny_model.family, tiny_model.diffusers_dir, "diffusers", device="cpu"),
                            WorkerConfig())
    safety = safety_embeddings(tiny_model)
    safety.load_into(pipe)
    return pipe, safety


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def differ(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())
