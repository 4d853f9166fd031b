"""`FamilyWorker`: the Serve deployment of one model family, multiplexed by checkpoint id, and
`ServeWorkers`, the ingress's handle on them.

Checkpoints are Serve-multiplexed models (LRU per replica); the diffusers call runs in a thread
while the replica's event loop streams progress, and a cancelled Serve request sets the cancel event
so the denoising loop stops within one step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from genserve.core.config import settings_from_handoff
from genserve.core.errors import Unavailable
from genserve.engine.loading import disable_progress_bars
from genserve.engine.streaming import stream_from_thread
from genserve.generation.worker.checkpoint import LoadedCheckpoint
from genserve.generation.worker.core import WorkerCore
from genserve.generation.worker.errors import CheckpointMismatch
from genserve.generation.worker.wire import ProgressEvent, WorkerRequest, WorkerResult


@serve.deployment(
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)
class FamilyWorker:
    """Serve deployment for one family; deploy with `.options(name=f"worker-{family}")`.

    Call: `handle.options(multiplexed_model_id=checkpoint_id, stream=True).generate.remote(request)`
    yields `ProgressEvent`s and, as each image is encoded, its `EncodedImage`, then one `WorkerResult`. Refusals raise typed `GenserveError`s: among them
    `ResourceRefused` (resource_not_found / resource_unusable / resource_disabled), `LikenessBlocked`
    (likeness_blocked, a SafetyBlocked), `LikenessCheckFailed`, `LoraInvalid`, `LoraIncompatible`,
    `UnknownSampler`, `ResourceIntegrityError` and safety's `EmbeddingUnavailable`.
    """

    def __init__(self, family: str, settings: dict[str, Any]):
        disable_progress_bars()
        self.core = WorkerCore(family, settings_from_handoff(settings))

        self._loaded: dict[str, LoadedCheckpoint] = {}

        async def load_checkpoint(checkpoint_id: str) -> LoadedCheckpoint:
            loaded = await asyncio.to_thread(self.core.load_checkpoint, checkpoint_id)
            self._loaded[checkpoint_id] = loaded
            return loaded

        # the limit comes from settings, so the multiplexed loader is wired per instance
        self.get_checkpoint = serve.multiplexed(
            max_num_models_per_replica=self.core.config.max_models_per_replica
        )(load_checkpoint)

    def _resident(self) -> list[LoadedCheckpoint]:
        """Checkpoints the multiplexer still holds (an evicted one was closed through `__del__`)."""
        for checkpoint_id, loaded in list(self._loaded.items()):
            if loaded.closing:
                self._loaded.pop(checkpoint_id, None)
        return list(self._loaded.values())

    async def generate(self, request: WorkerRequest) -> AsyncIterator[ProgressEvent | WorkerResult]:
        model_id = serve.get_multiplexed_model_id()
        if model_id and model_id != request.checkpoint_id:
            raise CheckpointMismatch(f"routed as {model_id} but asks for {request.checkpoint_id}")
        self.core.validate(request)
        loaded = await self.get_checkpoint(request.checkpoint_id)
        cancel = threading.Event()
        # a cancelled Serve request or a closed stream sets `cancel`: the denoising loop stops within a step
        async for item in stream_from_thread(
            lambda on_event: self.core.run(loaded, request, on_event, cancel), cancel
        ):
            yield item

    def check_health(self) -> None:
        self.core.check_health(self._resident())

    def stats(self) -> dict[str, Any]:
        """This replica's counters and resident checkpoints (for operators; Serve routes to any replica)."""
        return {**self.core.stats(), "checkpoints": [m.checkpoint_id for m in self._resident()]}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config, self._resident())


class ServeWorkers:
    """`WorkerBackend` over the family workers' handles: routed by checkpoint id (multiplexing)."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    def generate(self, family: str, request: WorkerRequest):  # noqa: ANN201 - a DeploymentResponseGenerator
        handle = self.handles.get(family)
        if handle is None:
            raise Unavailable(f"no worker deployment serves the {family} family", code="family_unavailable")
        return handle.options(multiplexed_model_id=request.checkpoint_id, stream=True).generate.remote(request)

    @staticmethod
    def is_backpressure(exc: BaseException) -> bool:
        return isinstance(exc, BackPressureError)
