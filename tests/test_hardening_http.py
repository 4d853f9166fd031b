"""Issue 17's findings on the `/v1` HTTP API in-process: SSE resumption, user ids, strict bodies,
NUL characters, malformed JSON, redirects on the local store, and admission under a burst."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_service_flow import GRANT, env  # noqa: F401 - `env` is the shared module fixture
from test_service_http import BODY, _call, _headers

from genserve.billing.errors import InvalidAccount
from genserve.billing.ledger import check_account, user_account
from genserve.core.errors import QueueFull
from genserve.core.ids import is_user_id
from genserve.generation.inputs import body_limit
from genserve.generation.jobs import JobStatus
from genserve.generation.protocol import GenerationRequest
from genserve.ingress import MAX_EVENT_SEQ, MAX_JSON_BODY_BYTES, last_event_seq

SSE_DEADLINE_S = 10.0


def _finished_job(client, user):  # noqa: ANN001, ANN202
    async def go(client, _):
        r = await client.post("/v1/generations?wait=true", json=BODY, headers=_headers(user))
        assert r.json()["status"] == "succeeded", r.text
        return r.json()["id"]
    return go


def _events(job_index: int, user: str, last_event_id: str | None):  # noqa: ANN202
    async def go(client, prior):
        headers: dict = _headers(user)
        if last_event_id is not None:  # as raw bytes: `²` is one latin-1 byte, which Starlette decodes back to `²`
            try:
                headers["Last-Event-ID"] = last_event_id.encode("latin-1")
            except UnicodeEncodeError:
                headers["Last-Event-ID"] = last_event_id.encode()
        started = time.monotonic()
        try:
            r = await asyncio.wait_for(client.get(f"/v1/generations/{prior[job_index]}/events", headers=headers),
                                       SSE_DEADLINE_S)
        except asyncio.TimeoutError:
            return None, SSE_DEADLINE_S
        return r, time.monotonic() - started
    return go


def _seqs(text: str) -> list[int]:
    return [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]


# ------------------------------------------------------------------------------ findings 3 and 4


def test_sse_reconnect_after_the_last_event_ends_at_once(env):  # noqa: F811
    user = env.user().user_id
    job, full = _call(env, _finished_job(None, user), _events(0, user, None))[0:2]
    response, _ = full
    seqs = _seqs(response.text)
    assert seqs and seqs == sorted(seqs)
    last = seqs[-1]
    _, at_end, past_end, before_end = _call(
        env, lambda c, p: asyncio.sleep(0, job), _events(0, user, str(last)), _events(0, user, str(last + 5)),
        _events(0, user, str(last - 1)))
    for r, took in (at_end, past_end):
        assert r is not None, "the stream must end, not poll forever"
        assert r.status_code == 200 and _seqs(r.text) == [] and took < 5
    r, _ = before_end
    assert _seqs(r.text) == [last] and '"status": "succeeded"' in r.text


@pytest.mark.parametrize("header", ["²", "١٢", "1" * 26, "-3", "abc", " 7 ", "9" * 19])
def test_odd_last_event_ids_never_give_a_server_error(env, header):  # noqa: F811
    user = env.user().user_id
    _, (r, _) = _call(env, _finished_job(None, user), _events(0, user, header))
    assert r is not None and r.status_code == 200
    seqs = _seqs(r.text)
    if header.strip().isascii() and header.strip().isdigit() and int(header) > 1000:
        assert seqs == []  # past every event: the ended stream closes at once
    elif header != " 7 ":
        assert seqs and seqs[0] == 1  # not a number we sent: from the start


def test_last_event_seq_parsing():
    assert last_event_seq(None) == 0 and last_event_seq("") == 0
    assert last_event_seq("²") == 0 and last_event_seq("١٢") == 0 and last_event_seq("1e3") == 0
    assert last_event_seq("42") == 42 and last_event_seq(" 42 ") == 42
    assert last_event_seq("9" * 26) == MAX_EVENT_SEQ and last_event_seq("9" * 18) == int("9" * 18)
    assert last_event_seq("9" * 19) == MAX_EVENT_SEQ


# ------------------------------------------------------------------------------------ finding 5


@pytest.mark.parametrize("user_id", ["user:X", "a:b", ".x", "-x", "@x", "_x", "x" * 65, "é", "a b", "a/b"])
def test_user_ids_the_ledger_refuses_are_refused_by_the_ingress(env, user_id):  # noqa: F811
    headers = {**_headers("x"), "X-User-Id": user_id.encode("latin-1")}
    (r,) = _call(env, ("POST", "/v1/quotes", {"json": BODY, "headers": headers}))
    assert (r.status_code, r.json()["code"]) == (401, "user_missing")
    assert not is_user_id(user_id)
    with pytest.raises(InvalidAccount):
        user_account(user_id)


@pytest.mark.parametrize("user_id", ["42", "X", "a.b", "a-b_c@d.e", "x" * 64, "9"])
def test_every_user_id_the_ingress_accepts_has_its_own_account(env, user_id):  # noqa: F811
    assert is_user_id(user_id)
    assert check_account(user_account(user_id)) == f"user:{user_id}"
    (r,) = _call(env, ("GET", f"/v1/accounts/{user_id}/balance", {"headers": _headers(user_id)}))
    assert r.status_code == 200 and r.json()["user_id"] == user_id


def test_prefixed_and_bare_ids_never_share_an_account(env):  # noqa: F811
    caller = env.user()
    (r,) = _call(env, ("GET", f"/v1/accounts/user:{caller.user_id}/balance",
                       {"headers": _headers(f"user:{caller.user_id}")}))
    assert r.status_code == 401


# ------------------------------------------------------------------------------------ finding 8


@pytest.mark.parametrize(("field", "value"), [
    ("steps", True), ("steps", "3"), ("steps", 3.0), ("seed", "1"), ("seed", True), ("quantity", 1.0),
    ("cfg_scale", "7"), ("cfg_scale", False), ("width", "64"), ("version", True), ("version", 1.0),
    ("clip_skip", True), ("hires", {"steps": True}), ("resources", [{"id": "x", "strength": "1"}]),
])
def test_loose_types_are_refused_and_nothing_is_held(env, field, value):  # noqa: F811
    caller = env.user()
    (r,) = _call(env, ("POST", "/v1/generations", {"json": {**BODY, field: value}, "headers": _headers(caller.user_id)}))
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), r.text
    assert env.available(caller) == GRANT


def test_float_fields_still_take_integers():
    req = GenerationRequest.model_validate({**BODY, "cfg_scale": 7, "resources": [{"id": "x", "strength": 1}]})
    assert req.cfg_scale == 7.0 and req.resources[0].strength == 1.0


@pytest.mark.parametrize(("content", "code"), [
    (b"{not json", "invalid_json"),
    (b'{"prompt": "a fox", ', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b'{"prompt": "\xff"}', "invalid_body"),
])
def test_malformed_bodies_get_a_stable_code(env, content, code):  # noqa: F811
    caller = env.user()
    (r,) = _call(env, ("POST", "/v1/generations", {"content": content, "headers": {
        **_headers(caller.user_id), "Content-Type": "application/json"}}))
    assert r.status_code == 422 and r.json()["code"] == code, r.text
    assert env.available(caller) == GRANT


@pytest.mark.parametrize(("path", "body", "admin"), [
    ("/v1/generations", {**BODY, "prompt": "a fox\u0000nude"}, False),
    ("/v1/generations", {**BODY, "negative_prompt": "\u0000"}, False),
    ("/v1/quotes", {**BODY, "resources": [{"id": "lora\u0000x"}]}, False),
    ("/v1/generations", {**BODY, "idempotency_key": None, "checkpoint": "tiny-sd1\u0000"}, False),
    ("/v1/admin/likeness", {"resource_id": "x", "person": "Jane\u0000Doe"}, True),
    ("/v1/admin/takedowns", {"person": "Jane", "resource_ids": ["a\u0000"]}, True),
])
def test_nul_characters_are_refused(env, path, body, admin):  # noqa: F811
    caller = env.user()
    headers = {"Authorization": "Bearer local-admin-token"} if admin else _headers(caller.user_id)
    (r,) = _call(env, ("POST", path, {"json": body, "headers": headers}))
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
    assert "NUL" in r.text
    assert env.available(caller) == GRANT


def test_oversized_json_bodies_are_refused_while_streaming(env):  # noqa: F811
    caller = env.user()
    pulled = []
    # the limit leaves room for a base64 input image and mask; the stream goes well past it
    chunks = body_limit(env.settings.generation.input_images, MAX_JSON_BODY_BYTES) // (1 << 20) + 16

    async def body():
        for _ in range(chunks):
            pulled.append(1)
            yield b" " * (1 << 20)

    (r,) = _call(env, ("POST", "/v1/generations", {"content": body(), "headers": {
        **_headers(caller.user_id), "Content-Type": "application/json"}}))
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert len(pulled) < chunks


# ----------------------------------------------------------------------------------- finding 10


def test_redirect_on_the_local_store_never_hands_out_a_server_path(env):  # noqa: F811
    user = env.user().user_id

    async def image(client, prior):
        return await client.get(f"/v1/generations/{prior[0]}/images/0?redirect=true", headers=_headers(user))

    _, r = _call(env, _finished_job(None, user), image)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert "location" not in r.headers and "file:" not in r.text[:0]


# ------------------------------------------------------------------------------------ finding 6


def test_a_burst_of_submits_never_exceeds_the_users_queue_limit(env, monkeypatch):  # noqa: F811
    """16 concurrent submits of a free user (queue 4): exactly 4 accepted, the others 429 with their
    holds released. Planning is slowed so that every submit passes the early check first."""
    service = env.service
    caller = env.user(grant=100_000)
    limit = service.limits.tier(None).queue
    plan = service.admission.plan

    def slow_plan(*args, **kwargs):
        time.sleep(0.3)
        return plan(*args, **kwargs)

    monkeypatch.setattr(service.admission, "plan", slow_plan)
    barrier = threading.Barrier(16)
    outcomes: list[object] = []

    def submit(i: int) -> None:
        request = GenerationRequest.model_validate({**BODY, "seed": i})
        barrier.wait()
        try:
            outcomes.append(service._accept(caller, request))
        except QueueFull as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    accepted = [o for o in outcomes if not isinstance(o, QueueFull)]
    try:
        assert len(outcomes) == 16
        assert len(accepted) == limit, f"{len(accepted)} accepted with a queue limit of {limit}"
        assert service.jobs.active_counts(caller.user_id)[0] == limit
        quote = service.quote(caller, GenerationRequest.model_validate(BODY)).total
        assert env.available(caller) == 100_000 - limit * quote  # the refused submits hold nothing
    finally:
        for job, running in accepted:  # the accepted jobs never ran: end them and release their holds
            service.jobs.finish(job.id, JobStatus.canceled)
            service.runner.settlement.release(job.id, running.hold_id)
        assert service.ledger.verify().ok
    assert all(service.jobs.get(job.id).status is JobStatus.canceled for job, _ in accepted)
