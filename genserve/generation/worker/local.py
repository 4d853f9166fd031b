"""`InProcessWorkers`: the `WorkerBackend` that runs the real engine (`WorkerCore`) in this process,
one per family: the whole generation flow without Ray (tests, benchmarks, a one-process deployment)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

from genserve.core.errors import Unavailable
from genserve.engine.streaming import stream_from_thread
from genserve.generation.worker.core import WorkerCore
from genserve.generation.worker.wire import WorkerRequest, WorkerStreamItem


class InProcessWorkers:

    def __init__(self, cores: dict[str, WorkerCore]):
        self.cores = cores

    def generate(self, family: str, request: WorkerRequest) -> _ThreadStream:
        core = self.cores.get(family)
        if core is None:
            raise Unavailable(f"no worker serves the {family} family", code="family_unavailable")
        return _ThreadStream(core, request)

    @staticmethod
    def is_backpressure(exc: BaseException) -> bool:
        return False


class _ThreadStream:
    """Runs one generation in a thread and streams its progress events, then its result."""

    def __init__(self, core: WorkerCore, request: WorkerRequest):
        self._core = core
        self._request = request
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[WorkerStreamItem]:
        core, request, cancel = self._core, self._request, self._cancel
        return stream_from_thread(lambda on_event: core.generate(request, on_event, cancel), cancel)
