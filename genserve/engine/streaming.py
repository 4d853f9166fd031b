"""Bridge from a blocking generation in a thread to an async stream of its progress and result."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any


async def stream_from_thread(run: Callable[[Callable[[Any], None]], Any],
                             cancel: threading.Event) -> AsyncIterator[Any]:
    """Run `run(on_progress)` in a thread; yield every progress event as it arrives, then its result.

    If the consumer stops early (a cancelled Serve request, a caller that stopped reading), `cancel`
    is set so the denoising loop stops within a step, and the thread is waited for: no work outlives
    the request that asked for it.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()

    def on_progress(event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = asyncio.ensure_future(asyncio.to_thread(run, on_progress))
    try:
        while not job.done():
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        while not events.empty():
            yield events.get_nowait()
        yield job.result()
    finally:
        if not job.done():
            cancel.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(job)
