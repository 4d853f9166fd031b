"""What the deployment relies on from the running service, in-process (no Ray): a token rotation with an
overlap window (old and new both accepted, then only the new), and the queue depth on `/v1/metrics`
falling back to 0 once a burst of jobs is done."""

from __future__ import annotations

import asyncio
import re

import httpx
from test_service_flow import env  # noqa: F401 - the shared module fixture

from genserve.core.config import load_settings
from genserve.ingress import create_api
from genserve.moderation import Moderation

BODY = {"prompt": "a red fox", "checkpoint": "tiny-sd1", "steps": 2, "seed": 3}


def _app(env, monkeypatch, tokens: dict[str, str]):  # noqa: F811
    """The HTTP app as a replica started with these GENSERVE_* token variables would serve it."""
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(env.settings.data_dir), **tokens})
    monkeypatch.setattr(env.service, "settings", settings)
    moderation = Moderation(env.service.registry, env.service.resource_cache, env.service.safety)
    return create_api(env.service, moderation, start_background=False)


def _statuses(app, user: str, service_tokens: list[str], admin_tokens: list[str]) -> dict[str, int]:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            out = {}
            for token in service_tokens:
                r = await client.get(f"/v1/accounts/{user}/balance",
                                     headers={"Authorization": f"Bearer {token}", "X-User-Id": user})
                out[f"service:{token}"] = r.status_code
                if r.status_code == 401:
                    assert r.json()["code"] == "token_invalid"
            for token in admin_tokens:
                r = await client.post("/v1/admin/takedowns", json={}, headers={"Authorization": f"Bearer {token}"})
                out[f"admin:{token}"] = 401 if r.status_code == 401 else 200  # past auth: 4xx on the empty body
            return out

    return asyncio.run(go())


def test_token_rotation_accepts_old_and_new_during_the_overlap_then_only_new(env, monkeypatch):  # noqa: F811
    """The RUNBOOK's rotation, phase by phase, as the pods' environment would carry it."""
    user = env.user().user_id
    services, admins = ["svc-old", "svc-new"], ["adm-old", "adm-new"]
    # 1. before: only the old tokens
    before = _statuses(_app(env, monkeypatch, {"GENSERVE_SERVICE_TOKEN": "svc-old", "GENSERVE_ADMIN_TOKEN": "adm-old"}),
                       user, services, admins)
    assert before == {"service:svc-old": 200, "service:svc-new": 401, "admin:adm-old": 200, "admin:adm-new": 401}
    # 2. overlap: the new tokens current, the old ones as GENSERVE_PREVIOUS_*; callers switch meanwhile
    overlap = _statuses(_app(env, monkeypatch, {
        "GENSERVE_SERVICE_TOKEN": "svc-new", "GENSERVE_PREVIOUS_SERVICE_TOKEN": "svc-old",
        "GENSERVE_ADMIN_TOKEN": "adm-new", "GENSERVE_PREVIOUS_ADMIN_TOKEN": "adm-old"}), user, services, admins)
    assert overlap == {"service:svc-old": 200, "service:svc-new": 200, "admin:adm-old": 200, "admin:adm-new": 200}
    # a service token never opens the admin API, nor the reverse, during the overlap either
    crossed = _statuses(_app(env, monkeypatch, {
        "GENSERVE_SERVICE_TOKEN": "svc-new", "GENSERVE_PREVIOUS_SERVICE_TOKEN": "svc-old",
        "GENSERVE_ADMIN_TOKEN": "adm-new", "GENSERVE_PREVIOUS_ADMIN_TOKEN": "adm-old"}), user, admins, services)
    assert set(crossed.values()) == {401}
    # 3. after: the previous values emptied (the Secret keeps the keys, blank), only the new tokens
    after = _statuses(_app(env, monkeypatch, {
        "GENSERVE_SERVICE_TOKEN": "svc-new", "GENSERVE_PREVIOUS_SERVICE_TOKEN": "",
        "GENSERVE_ADMIN_TOKEN": "adm-new", "GENSERVE_PREVIOUS_ADMIN_TOKEN": ""}), user, services, admins)
    assert after == {"service:svc-old": 401, "service:svc-new": 200, "admin:adm-old": 401, "admin:adm-new": 200}


def _depth(text: str, family: str) -> float:
    match = re.search(rf'^genserve_generation_queue_depth\{{family="{family}"\}} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def test_queue_depth_rises_under_a_burst_and_falls_back_to_zero(env, monkeypatch):  # noqa: F811
    app = _app(env, monkeypatch, {"GENSERVE_SERVICE_TOKEN": "local-service-token"})
    user = env.user().user_id
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": user}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            submitted = [await client.post("/v1/generations", json={**BODY, "seed": s}, headers=headers) for s in range(3)]
            assert all(r.status_code == 202 for r in submitted), [r.text for r in submitted]
            peak, depth = 0.0, None
            for _ in range(600):
                depth = _depth((await client.get("/v1/metrics")).text, "sd1")
                peak = max(peak, depth)
                if depth == 0:
                    break
                await asyncio.sleep(0.05)
            jobs = [(await client.get(f"/v1/generations/{r.json()['id']}", headers=headers)).json() for r in submitted]
            return peak, depth, jobs

    peak, depth, jobs = asyncio.run(go())
    assert peak >= 1, "the burst shows in the queue depth"
    assert depth == 0, "the depth falls back once every job ended"
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, "nothing lost"

