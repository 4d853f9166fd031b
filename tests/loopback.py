"""An ASGI app served by uvicorn on a free loopback port in a thread, for tests that go over real HTTP
(the CLI, httpx without a transport)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
