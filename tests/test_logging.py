"""Structured logs: every line carries the request and job ids of the work it belongs to."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import threading

import pytest

from genserve.core.log import configure_logging, log_context

log = logging.getLogger("genserve.test")


def _genserve_handler() -> logging.Handler:
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "_genserve", False)]
    return handler


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    old_level = root.level
    yield
    for h in list(root.handlers):
        if getattr(h, "_genserve", False):
            root.removeHandler(h)
    root.setLevel(old_level)


@pytest.fixture
def json_logs(restore_root_logger):
    """The installed JSON handler, writing into a buffer; returns a function reading the lines so far."""
    configure_logging("DEBUG", json_lines=True)
    buffer = io.StringIO()
    _genserve_handler().setStream(buffer)  # type: ignore[attr-defined]

    def lines() -> list[dict]:
        entries = [json.loads(line) for line in buffer.getvalue().splitlines()]
        return [e for e in entries if e["logger"] == log.name]  # asyncio logs at DEBUG too

    return lines


def test_json_lines_carry_ids_from_log_context(json_logs):
    log.info("outside")
    with log_context(request_id="req-1", job_id="job-1"):
        log.info("inside %s", "both")
        with log_context(job_id="job-2"):
            log.warning("nested")
        log.info("back")
    log.info("after")
    lines = json_logs()
    assert [(e["msg"], e["request_id"], e["job_id"]) for e in lines] == [
        ("outside", None, None),
        ("inside both", "req-1", "job-1"),
        ("nested", "req-1", "job-2"),
        ("back", "req-1", "job-1"),
        ("after", None, None),
    ]
    assert lines[2]["level"] == "WARNING"
    assert lines[0]["logger"] == "genserve.test"
    assert lines[0]["ts"].endswith("Z")


def test_context_is_restored_when_the_block_raises(json_logs):
    with pytest.raises(RuntimeError), log_context(request_id="req-err"):
        raise RuntimeError("boom")
    log.info("after")
    assert json_logs()[-1]["request_id"] is None


def test_extra_fields_and_exceptions_are_structured(json_logs):
    with log_context(job_id="job-x"):
        log.info("charged", extra={"fields": {"buzz": 12, "user_id": "u1"}})
        try:
            raise ValueError("bad input")
        except ValueError:
            log.exception("failed")
    charged, failed = json_logs()
    assert (charged["buzz"], charged["user_id"], charged["job_id"]) == (12, "u1", "job-x")
    assert "ValueError: bad input" in failed["exc"]
    assert failed["level"] == "ERROR"


def test_ids_follow_asyncio_tasks_without_mixing(json_logs):
    async def work(name: str) -> None:
        await asyncio.sleep(0)
        log.info("step1 %s", name)
        await asyncio.sleep(0.01)
        log.info("step2 %s", name)

    async def handle(request_id: str) -> None:
        with log_context(request_id=request_id):
            # The task is created inside the block and keeps the ids after the block exits.
            task = asyncio.create_task(work(request_id))
        await task

    async def main() -> None:
        await asyncio.gather(handle("req-a"), handle("req-b"))

    asyncio.run(main())
    lines = json_logs()
    assert len(lines) == 4
    for entry in lines:
        assert entry["msg"].endswith(entry["request_id"])


def test_ids_follow_a_thread_started_with_copy_context(json_logs):
    def work() -> None:
        log.info("in thread")

    with log_context(request_id="req-t", job_id="job-t"):
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(work,))
    t.start()
    t.join()
    (entry,) = json_logs()
    assert (entry["msg"], entry["request_id"], entry["job_id"]) == ("in thread", "req-t", "job-t")


def test_ids_follow_asyncio_to_thread(json_logs):
    """How the worker runs diffusers off the event loop: `asyncio.to_thread` copies the context."""

    async def main() -> None:
        with log_context(request_id="req-x", job_id="job-x"):
            await asyncio.to_thread(log.info, "denoising")

    asyncio.run(main())
    (entry,) = json_logs()
    assert (entry["request_id"], entry["job_id"]) == ("req-x", "job-x")


def test_text_format_appends_ids(restore_root_logger):
    configure_logging("INFO", json_lines=False)
    configure_logging("INFO", json_lines=False)  # idempotent: still one handler
    buffer = io.StringIO()
    _genserve_handler().setStream(buffer)  # type: ignore[attr-defined]
    with log_context(request_id="req-9", job_id="job-9"):
        log.info("hello")
    log.debug("hidden at INFO")
    log.info("plain")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("genserve.test: hello [req=req-9 job=job-9]")
    assert lines[1].endswith("genserve.test: plain")
