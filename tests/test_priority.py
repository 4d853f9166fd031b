"""Paid priority changes the order in which waiting work gets a busy replica's checkpoint."""

from __future__ import annotations

import threading
import time

from test_worker import _request, core, env  # noqa: F401 - the worker module's fixtures

from genserve.generation.worker.priority_lock import PriorityLock
from genserve.generation.worker.wire import ProgressEvent


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_priority_lock_serves_high_then_normal_then_low_each_in_arrival_order():
    lock = PriorityLock()
    order: list[str] = []
    lock.acquire()
    threads = []
    for name, prio in (("low1", "low"), ("normal1", "normal"), ("low2", "low"), ("high1", "high"),
                       ("normal2", "normal")):
        def take(name=name, prio=prio):
            with lock.prioritized(prio):
                order.append(name)
        t = threading.Thread(target=take)
        t.start()
        threads.append(t)
        _wait_for(lambda n=len(threads): lock.waiting == n)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["high1", "normal1", "normal2", "low1", "low2"]


def test_priority_lock_timeout_and_non_blocking_leave_the_queue_intact():
    lock = PriorityLock()
    assert lock.acquire()
    assert not lock.acquire(blocking=False)
    assert not lock.acquire(timeout=0.05, priority="high")
    assert lock.waiting == 0
    lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()


def test_a_high_priority_job_submitted_later_starts_first_when_the_replica_is_busy(core):  # noqa: F811
    loaded = core.checkpoint("tiny-sd1")
    started: list[str] = []

    def run(job_id: str, priority: str) -> None:
        def on_event(event):
            if isinstance(event, ProgressEvent) and job_id not in started:
                started.append(job_id)
        core.generate(_request(job_id=job_id, priority=priority, seeds=[1]), on_event)

    loaded.lock.acquire()  # the replica is busy with another generation
    try:
        low = threading.Thread(target=run, args=("low-first", "low"))
        low.start()
        _wait_for(lambda: loaded.lock.waiting == 1)
        high = threading.Thread(target=run, args=("high-later", "high"))
        high.start()
        _wait_for(lambda: loaded.lock.waiting == 2)
    finally:
        loaded.lock.release()
    low.join(120)
    high.join(120)
    assert started == ["high-later", "low-first"]
