"""A worker's upkeep: health checks, hot settings, and dropping adapters of disabled resources."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from genserve.core.config.worker import WorkerConfig
from genserve.engine.generate import (
    prepare_pipeline,
)
from genserve.generation.worker.checkpoint import LoadedCheckpoint
from genserve.generation.worker.errors import (
    ConfigNotHot,
    ScannerUnavailable,
    WorkerWedged,
)

logger = logging.getLogger(__name__)


class WorkerUpkeep:
    """`WorkerCore`'s upkeep: health, hot settings, adapters of disabled resources."""

    def _drop_disabled(self, loaded: LoadedCheckpoint, resource_id: str | None) -> None:
        """A request named a disabled LoRA: its adapter and cached file go now, not when LRU says."""
        if not resource_id:
            return
        try:
            sha256 = self.files.registry.get(resource_id).sha256
        except Exception:  # noqa: BLE001 - nothing to drop
            return
        if sha256 not in self.files.registry.disabled_hashes([sha256]):
            return  # the same file is enabled under another id
        with loaded.lock:
            if loaded.loras.evict(sha256):
                logger.info("evicted the adapter of disabled resource %s", resource_id)
        self.cache.evict(sha256)

    def _sweep_disabled(self, loaded: LoadedCheckpoint) -> None:
        """Under the checkpoint's lock, at most every `blocklist_refresh_s`: adapters whose resources
        were all disabled since they loaded leave the pipeline (one query over the resident hashes)."""
        now = time.monotonic()
        if now - self._swept.get(loaded.checkpoint_id, 0.0) < self.config.blocklist_refresh_s:
            return
        self._swept[loaded.checkpoint_id] = now
        resident = loaded.loras.resident()
        for sha256 in self.files.registry.disabled_hashes(resident):
            loaded.loras.evict(sha256)
            self.cache.evict(sha256)
            logger.info("evicted the adapter %s: its resources are disabled", sha256[:12])

    def check_health(self, models: Sequence[LoadedCheckpoint] | None = None) -> None:
        """Raise when a resident model lost its safety embeddings, the scanner is gone, or a generation
        has made no step progress for `wedge_timeout_s`. Never waits for a generation to end."""
        with self._heartbeat_lock:
            busy, idle_s = self._busy, time.monotonic() - self._last_progress
        if busy and idle_s > self.config.wedge_timeout_s:
            raise WorkerWedged(f"no generation progress for {idle_s:.0f} s while busy")
        if self.scanner is None:
            raise ScannerUnavailable(self._scanner_error or "image scanner unavailable")
        for loaded in self.loaded() if models is None else models:
            if loaded.freed or loaded.pipe is None:
                continue
            # checked between generations (not mid-way through a per-request embedding load); one
            # that is generating is left to the wedge check above: waiting for it would hold the
            # health check past its timeout on a long job, and Serve would kill the replica
            if not loaded.lock.acquire(blocking=False):
                continue
            try:
                if loaded.pipe is not None:
                    loaded.safety.check(loaded.pipe)
            finally:
                loaded.lock.release()

    def reconfigure(self, user_config: dict[str, Any], models: Sequence[LoadedCheckpoint] | None = None) -> None:
        """Hot settings: LoRA cache limits, blocklist re-check interval, xformers flag."""
        data = self.config.model_dump()
        for key, value in (user_config or {}).items():
            if key == "lora_cache" and isinstance(value, dict):
                data["lora_cache"] = {**data["lora_cache"], **value}
            elif key in ("blocklist_refresh_s", "enable_xformers", "wedge_timeout_s"):
                data[key] = value
            else:
                raise ConfigNotHot(f"{key!r} cannot be changed without a restart")
        self.config = WorkerConfig.model_validate(data)
        for loaded in self.loaded() if models is None else models:
            if loaded.freed:
                continue
            with loaded.lock:
                loaded.loras.set_limits(max_adapters=self.config.lora_cache.max_adapters,
                                        max_bytes=self.config.lora_cache.max_bytes,
                                        recheck_s=self.config.blocklist_refresh_s)
                if loaded.pipe is not None and loaded.pipe.device.type == "cuda":
                    if self.config.enable_xformers:

                        prepare_pipeline(loaded.pipe, self.config)
                    else:
                        loaded.pipe.disable_xformers_memory_efficient_attention()
