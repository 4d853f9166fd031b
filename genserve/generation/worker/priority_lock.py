"""`PriorityLock`: the one-generation-at-a-time lock of a loaded checkpoint, handed to waiters by
paid priority (high, then normal, then low) and, within a priority, in arrival order.

This is where queued work waits for a replica's capacity: a replica admits a few requests at once
(Serve's `max_ongoing_requests`) and runs one per checkpoint, so the others wait on this lock. A
plain `threading.Lock` wakes an arbitrary waiter; this one wakes the best-placed one, so a high-
priority job that arrives while a low one waits starts first. Work is never preempted: the running
generation finishes. It keeps `threading.Lock`'s interface (`acquire(blocking, timeout)`, `release`,
`with`), so callers that do not name a priority are `normal`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Iterator

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}


class PriorityLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._waiting: list[tuple[int, int]] = []  # heap of (rank, arrival)
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def locked(self) -> bool:
        return self._held

    def acquire(self, blocking: bool = True, timeout: float = -1, priority: str = "normal") -> bool:
        with self._cond:
            if not self._held and not self._waiting:
                self._held = True
                return True
            if not blocking:
                return False
            ticket = (PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"]), next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
            while self._held or self._waiting[0] != ticket:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                    self._cond.notify_all()  # the next in line may be free to go now
                    return False
                self._cond.wait(remaining)
            heapq.heappop(self._waiting)
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unlocked PriorityLock")
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def prioritized(self, priority: str) -> Iterator[None]:
        self.acquire(priority=priority)
        try:
            yield
        finally:
            self.release()
