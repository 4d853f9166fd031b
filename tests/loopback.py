"""HTTP against an ASGI app in tests: served by uvicorn on a free loopback port in a thread (for the CLI
and clients that need a real socket), or called in process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn


@contextmanager
def loopback_server(app, *, lifespan: str = "off") -> Iterator[str]:  # noqa: ANN001
    """The base URL of `app` while the block runs. Lifespan is off by default: a module-wide service
    behind the app must outlive one test's server, and the lifespan's exit would close it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def asgi_calls(app, *requests: tuple[str, str, dict]) -> list[httpx.Response]:  # noqa: ANN001
    """(method, url, kwargs) requests against `app` in one event loop, in order; their responses."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            return [await client.request(method, url, **kw) for method, url, kw in requests]

    return asyncio.run(go())
