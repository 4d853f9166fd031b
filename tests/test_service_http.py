"""The `/v1` HTTP API in-process (no Ray): auth, error mapping, SSE, images, quotes, admin routes."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image
from test_service_flow import GRANT, _lora, env  # noqa: F401 - `env` is the shared module fixture

from genserve.ingress import create_api
from genserve.moderation import Moderation

SERVICE = {"Authorization": "Bearer local-service-token"}
ADMIN = {"Authorization": "Bearer local-admin-token"}
BODY = {"prompt": "a red fox", "checkpoint": "tiny-sd1", "steps": 3, "seed": 5}


def _headers(user: str, **extra: str) -> dict[str, str]:
    return {**SERVICE, "X-User-Id": user, **extra}


def _call(env, *requests):  # noqa: F811 - the fixture
    """Run (method, url, kwargs) requests against the app in one event loop; returns the responses."""
    moderation = Moderation(env.service.registry, env.service.resource_cache, env.service.safety)
    app = create_api(env.service, moderation, start_background=False)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            out = []
            for item in requests:
                if callable(item):
                    out.append(await item(client, out))
                else:
                    method, url, kw = item
                    out.append(await client.request(method, url, **kw))
            return out

    return asyncio.run(go())


def test_submit_stream_fetch_and_balance(env):  # noqa: F811
    caller = env.user()
    user = caller.user_id

    async def stream(client, prior):
        job_id = prior[0].json()["id"]
        return await client.get(f"/v1/generations/{job_id}/events", headers=_headers(user))

    async def job(client, prior):
        return await client.get(f"/v1/generations/{prior[0].json()['id']}", headers=_headers(user))

    async def image(client, prior):
        return await client.get(prior[2].json()["images"][0]["url"], headers=_headers(user))

    submitted, events, done, png, balance = _call(
        env,
        ("POST", "/v1/generations", {"json": BODY, "headers": _headers(user)}),
        stream, job, image,
        ("GET", f"/v1/accounts/{user}/balance", {"headers": _headers(user)}),
    )
    assert submitted.status_code == 202 and submitted.headers["location"].endswith(submitted.json()["id"])
    assert events.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in events.text.split("\n\n") if b.strip()]
    kinds = [line.split(": ", 1)[1] for b in blocks for line in b.splitlines() if line.startswith("event:")]
    assert kinds[0] == "status" and "progress" in kinds and kinds[-1] == "status"
    assert '"status": "succeeded"' in blocks[-1]
    body = done.json()
    assert body["status"] == "succeeded" and body["images"][0]["seed"] == 5
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).info["parameters"].startswith("a red fox")
    assert balance.json() == {"user_id": user, "posted": GRANT - body["charged"], "held": 0,
                              "available": GRANT - body["charged"]}


def test_wait_true_returns_the_finished_job(env):  # noqa: F811
    user = env.user().user_id
    (resp,) = _call(env, ("POST", "/v1/generations?wait=true&timeout=60", {"json": BODY, "headers": _headers(user)}))
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded"


def test_authentication_and_cross_user_access(env):  # noqa: F811
    owner = env.user().user_id
    other = env.user().user_id

    async def submit(client, _):
        r = await client.post("/v1/generations?wait=true", json=BODY, headers=_headers(owner))
        return r.json()["id"]

    async def probes(client, prior):
        job_id = prior[0]
        return [
            await client.post("/v1/generations", json=BODY),
            await client.post("/v1/generations", json=BODY, headers={"Authorization": "Bearer wrong"}),
            await client.post("/v1/generations", json=BODY, headers=SERVICE),
            await client.post("/v1/generations", json=BODY, headers={**ADMIN, "X-User-Id": owner}),
            await client.get(f"/v1/generations/{job_id}", headers=_headers(other)),
            await client.post(f"/v1/generations/{job_id}/cancel", headers=_headers(other)),
            await client.get(f"/v1/generations/{job_id}/images/0", headers=_headers(other)),
            await client.get(f"/v1/generations/{job_id}/events", headers=_headers(other)),
            await client.get(f"/v1/accounts/{owner}/balance", headers=_headers(other)),
            await client.post("/v1/admin/likeness", json={"resource_id": "x", "person": "y"}, headers=SERVICE),
        ]

    _, responses = _call(env, submit, probes)
    codes = [(r.status_code, r.json()["code"]) for r in responses]
    assert codes == [
        (401, "token_missing"), (401, "token_invalid"), (401, "user_missing"), (401, "token_invalid"),
        (404, "job_not_found"), (404, "job_not_found"), (404, "job_not_found"), (404, "job_not_found"),
        (403, "not_your_account"), (401, "token_invalid"),
    ]
    assert responses[0].headers["www-authenticate"] == "Bearer"


def test_malformed_requests_get_422_with_field_errors(env):  # noqa: F811
    caller = env.user()
    user = caller.user_id
    responses = _call(
        env,
        ("POST", "/v1/generations", {"json": {**BODY, "prompt_embeds": [[0.0]]}, "headers": _headers(user)}),
        ("POST", "/v1/generations", {"json": {**BODY, "steps": 0, "sampler": "nope"}, "headers": _headers(user)}),
        ("POST", "/v1/generations", {"content": b"{not json", "headers": {**_headers(user),
                                                                         "Content-Type": "application/json"}}),
        ("POST", "/v1/generations", {"json": BODY, "headers": _headers(user, **{"X-Max-Nsfw-Level": "extreme"})}),
        ("GET", "/v1/generations/not-a-job-id", {"headers": _headers(user)}),
    )
    embeds, bounds, broken, level, bad_id = responses
    assert embeds.status_code == 422 and embeds.json()["code"] == "invalid_request"
    assert [e["loc"] for e in embeds.json()["details"]["errors"]] == [["body", "prompt_embeds"]]
    assert embeds.json()["details"]["errors"][0]["type"] == "extra_forbidden"
    assert {tuple(e["loc"]) for e in bounds.json()["details"]["errors"]} == {("body", "steps"), ("body", "sampler")}
    assert broken.status_code == 422
    assert (level.status_code, level.json()["code"]) == (422, "invalid_nsfw_level")
    assert bad_id.status_code == 422
    assert env.available(caller) == GRANT  # nothing was held or charged


def test_safety_refusal_quote_and_queue_full_mapping(env, monkeypatch):  # noqa: F811
    from genserve.core.errors import QueueFull

    caller = env.user()
    user = caller.user_id
    blocked, quote = _call(
        env,
        ("POST", "/v1/generations", {"json": {**BODY, "prompt": "child, nude"}, "headers": _headers(user)}),
        ("POST", "/v1/quotes", {"json": {**BODY, "quantity": 3}, "headers": _headers(user)}),
    )
    assert blocked.status_code == 403 and blocked.json()["code"] == "safety_blocked"
    assert blocked.json()["details"]["rules"]
    q = quote.json()
    assert q["total"] == 3 * q["per_image"] and q["balance_available"] == GRANT and q["items"]

    def full(*_a, **_k):
        raise QueueFull("busy", retry_after_s=7)

    monkeypatch.setattr(env.service.admission, "check_queue", full)
    (busy,) = _call(env, ("POST", "/v1/generations", {"json": BODY, "headers": _headers(user)}))
    assert busy.status_code == 429 and busy.headers["retry-after"] == "7" and busy.json()["code"] == "queue_full"
    assert env.available(caller) == GRANT


def test_takedown_approval_blocks_the_resource(env):  # noqa: F811
    user = env.user().user_id
    rid = _lora(env, "sd1", 31, rid="takedown-target")
    created, = _call(env, ("POST", "/v1/admin/takedowns",
                           {"json": {"person": "C. Person", "resource_ids": [rid]}, "headers": ADMIN}))
    assert created.status_code == 201
    td = created.json()["id"]
    approved, refused = _call(
        env,
        ("POST", f"/v1/admin/takedowns/{td}/approve", {"json": {"moderator": "mod-1"}, "headers": ADMIN}),
        ("POST", "/v1/generations", {"json": {**BODY, "resources": [{"id": rid}]}, "headers": _headers(user)}),
    )
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert refused.status_code == 422 and refused.json()["code"] == "resource_disabled"
    again, = _call(env, ("POST", f"/v1/admin/takedowns/{td}/approve", {"json": {"moderator": "m"}, "headers": ADMIN}))
    assert again.status_code == 409


def test_operations_endpoints(env):  # noqa: F811
    health, metrics, openapi = _call(env, ("GET", "/v1/healthz", {}), ("GET", "/v1/metrics", {}),
                                     ("GET", "/openapi.json", {}))
    assert health.json()["status"] == "ok"
    assert "genserve_http_requests_total" in metrics.text and "genserve_generation_jobs" in metrics.text
    paths = openapi.json()["paths"]
    for path in ("/v1/generations", "/v1/generations/{job_id}", "/v1/generations/{job_id}/cancel",
                 "/v1/generations/{job_id}/events", "/v1/quotes", "/v1/accounts/{user}/balance",
                 "/v1/admin/likeness", "/v1/admin/takedowns", "/v1/healthz", "/v1/metrics"):
        assert path in paths
    assert "prompt_embeds" not in str(openapi.json()["components"]["schemas"]["GenerationRequest"])


@pytest.mark.parametrize("level", ["pg", "x"])
def test_nsfw_level_header_is_recorded(env, level):  # noqa: F811
    user = env.user().user_id
    (resp,) = _call(env, ("POST", "/v1/generations?wait=true",
                          {"json": BODY, "headers": _headers(user, **{"X-Max-Nsfw-Level": level})}))
    assert resp.status_code == 200
    assert env.service.jobs.get(resp.json()["id"]).request["allowed_nsfw_level"] == level


def test_previous_token_is_accepted_during_rotation(env):  # noqa: F811
    from genserve.core.config import load_settings
    from genserve.ingress import Auth

    settings = load_settings(env={"GENSERVE_DATA_DIR": str(env.settings.data_dir),
                                  "GENSERVE_SERVICE_TOKEN": "new-token",
                                  "GENSERVE_PREVIOUS_SERVICE_TOKEN": "local-service-token"})
    auth = Auth(settings)
    for token in ("new-token", "local-service-token"):
        assert auth.caller(f"Bearer {token}", "u1", None, None, "r").user_id == "u1"
    with pytest.raises(Exception) as info:  # noqa: B017
        auth.caller("Bearer stale-token", "u1", None, None, "r")
    assert info.value.code == "token_invalid"
    with pytest.raises(Exception) as info:  # noqa: B017
        auth.admin("Bearer local-service-token")
    assert info.value.code == "token_invalid"


def test_request_ids_unmapped_errors_and_route_counters(env, monkeypatch):  # noqa: F811
    user = "u-request-ids"

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(env.service, "balance", broken)  # an unmapped error inside a route
    given, fresh, failed, metrics_page = _call(
        env,
        ("GET", "/v1/healthz", {"headers": {"X-Request-Id": "req-from-site"}}),
        ("GET", "/v1/healthz", {}),
        ("GET", f"/v1/accounts/{user}/balance", {"headers": _headers(user)}),
        ("GET", "/v1/metrics", {}),
    )
    assert given.headers["x-request-id"] == "req-from-site"
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.headers["x-request-id"] != "req-from-site"
    assert failed.status_code == 500 and failed.json()["code"] == "internal_error"
    assert len(failed.headers["x-request-id"]) == 32
    text = metrics_page.text
    assert 'genserve_http_requests_total{route="/v1/healthz",status="200"} 2' in text
    assert 'genserve_http_requests_total{route="/v1/accounts/{user}/balance",status="500"} 1' in text
