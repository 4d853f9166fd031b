"""A checkpoint resident in a worker replica, and a LoRA or VAE as one request uses it."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.engine.infotext import autov2
from genserve.engine.vae import VaeCache
from genserve.engine.views import drop_pipeline_views
from genserve.generation.worker.errors import CheckpointEvicted
from genserve.generation.worker.priority_lock import PriorityLock
from genserve.resources.models import Resource

logger = logging.getLogger(__name__)


@dataclass
class ResolvedLora:
    resource_id: str
    name: str
    sha256: str
    path: Path
    autov3: str
    strength: float


@dataclass
class ResolvedVae:
    """A request's VAE file, as the worker fetched it for one job."""

    resource_id: str
    name: str
    sha256: str
    path: Path


class LoadedCheckpoint:
    """A pipeline resident in a replica, with its safety embeddings, LoRA and VAE caches and generation lock.

    Serve's multiplexer calls `__del__` when it evicts the model (and Python may call it again at
    collection), while a request that already holds the object may still be generating; so `close`
    is idempotent and frees the GPU memory only once the last user has finished.
    """

    def __init__(self, checkpoint_id: str, resource: Resource, pipe: Any, safety: Any, loras: Any,
                 max_vaes: int = 2):
        self.checkpoint_id = checkpoint_id
        self.name = resource.name
        self.sha256 = resource.sha256
        self.pipe = pipe
        self.safety = safety
        self.loras = loras
        # VAEs requests chose, built on this checkpoint's VAE config; `vaes.own` is the checkpoint's
        self.vaes = VaeCache(getattr(pipe, "vae", None), max_vaes)
        # one generation at a time (adapters live in the shared modules), waiters served by priority
        self.lock = PriorityLock()
        self._state = threading.Lock()
        self._users = 0
        self._closing = False
        self._freed = False

    @property
    def model_hash(self) -> str:
        return autov2(self.sha256)

    @property
    def freed(self) -> bool:
        return self._freed

    @property
    def closing(self) -> bool:
        return self._closing

    @contextlib.contextmanager
    def in_use(self) -> Iterator[LoadedCheckpoint]:
        with self._state:
            if self._closing:
                raise CheckpointEvicted(f"checkpoint {self.checkpoint_id} was unloaded; retry the request")
            self._users += 1
        try:
            yield self
        finally:
            with self._state:
                self._users -= 1
                free_now = self._closing and self._users == 0
            if free_now:
                self._free()

    def close(self) -> None:
        with self._state:
            if self._closing:
                return
            self._closing = True
            free_now = self._users == 0
        if free_now:
            self._free()

    def _free(self) -> None:
        with self._state:
            if self._freed:
                return
            self._freed = True
        with contextlib.suppress(Exception):
            self.loras.clear()
        self.vaes.close()
        pipe, self.pipe = self.pipe, None
        self.loras = None
        if pipe is not None:

            with contextlib.suppress(Exception):
                drop_pipeline_views(pipe)
            for name in list(pipe.components):
                with contextlib.suppress(Exception):
                    setattr(pipe, name, None)
            del pipe
        gc.collect()

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("unloaded checkpoint %s", self.checkpoint_id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also runs at interpreter shutdown
            self.close()
