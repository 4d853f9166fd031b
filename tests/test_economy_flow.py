"""The creator economy through the real generation flow (in-process engine, SQLite ledger) and its
HTTP routes: fee-bearing LoRAs, tips, a withheld image, receipts, early access and the allowance."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import pytest
from sqlalchemy import update
from test_service_flow import _finish, _lora, _request, _run, env  # noqa: F401 - `env` is the shared module fixture

import genserve.resources.registry as registry_module
from genserve.billing.ledger import REVENUE_GENERATION, user_account
from genserve.economy.api import build_router
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.resources.models import Resource
from safety.image_scan import ScanResult
from safety.levels import NsfwLevel as ScanLevel

SERVICE = {"Authorization": "Bearer local-service-token"}
ADMIN = {"Authorization": "Bearer local-admin-token"}


class _ThirdImageX:
    """The third image of each four scans as X (withheld); the rest PG."""

    def __init__(self):
        self.scans = 0

    def scan(self, image):
        self.scans += 1
        return ScanResult(ScanLevel.X if self.scans % 4 == 3 else ScanLevel.PG)


@pytest.fixture
def public_owned(monkeypatch):
    """Owned resources usable by everyone, as the resources branch's `visibility=public` makes them."""
    original = registry_module._check_usable
    monkeypatch.setattr(registry_module, "_check_usable", lambda rid, row, user_id: original(rid, row, None))


def _owned_lora(env, seed: int, owner: str, fee: int) -> str:  # noqa: F811
    rid = _lora(env, "sd1", seed, rid=f"eco-lora-{seed}")
    with env.db.transaction() as s:
        s.execute(update(Resource).where(Resource.id == rid).values(owner_user_id=owner))
    env.service.economy.set_terms(owner, rid, licence_fee=fee)
    return rid


def _app(service):
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    return create_api(service, moderation, start_background=False,
                      routers=[functools.partial(build_router, service)])


def _http(app, *calls):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.request(m, url, **kw) for m, url, kw in calls]
    return asyncio.run(go())


def test_two_fee_loras_tips_and_a_withheld_image_pay_every_party_exactly(env, public_owned):  # noqa: F811
    from generation_support import in_process_service

    service = in_process_service(env.settings, db=env.db, store=env.service.store, scanner=_ThirdImageX())
    lora_a = _owned_lora(env, 41, "alice", 10)
    lora_b = _owned_lora(env, 42, "bob", 7)
    caller = env.user(grant=5000)
    request = _request(quantity=4, steps=2, resources=[{"id": lora_a}, {"id": lora_b}], creator_tip_pct=25,
                       platform_tip_pct=10)
    quote = service.quote(caller, request)
    names = [i.name for i in quote.items]
    assert f"licence_fee:{lora_a}" in names and f"licence_fee:{lora_b}" in names
    assert "creator_tip" in names and "platform_tip" in names
    assert quote.total == 4 * quote.per_image == sum(i.amount for i in quote.items)
    plan = service.admission.plan(caller, request)
    expected = {}
    for account, amount, _kind in plan.quote.legs_per_image:
        expected[account] = expected.get(account, 0) + 3 * amount
    before = {a: env.ledger.balance(a).posted for a in expected}

    job = _run(_finish(service, caller, request, timeout=400))
    assert job.status.value == "succeeded" and len(job.images) == 3 and len(job.withheld) == 1
    assert job.charged == 3 * quote.per_image
    assert env.available(caller) == 5000 - job.charged
    for account, amount in expected.items():
        assert env.ledger.balance(account).posted - before[account] == amount, account
    assert expected[user_account("alice")] > 0 and expected[user_account("bob")] > 0
    assert sum(expected.values()) == job.charged
    assert env.ledger.verify().ok

    app = _app(service)
    [r] = _http(app, ("GET", f"/v1/generations/{job.id}/receipt",
                      {"headers": {**SERVICE, "X-User-Id": caller.user_id}}))
    body = r.json()
    assert r.status_code == 200 and body["captured"] == job.charged and body["legs_sum_to_capture"]
    assert body["released"] == quote.total - job.charged and body["delivered"] == 3
    assert {leg["kind"] for leg in body["legs"]} >= {"capture", "licence_fee", "creator_tip", "platform_tip"}
    assert body["quote"]["items"] and body["audit"]
    [other] = _http(app, ("GET", f"/v1/generations/{job.id}/receipt", {"headers": {**SERVICE, "X-User-Id": "x1"}}))
    assert other.status_code == 404
    [earn] = _http(app, ("GET", "/v1/accounts/alice/earnings", {"headers": {**SERVICE, "X-User-Id": "alice"}}))
    assert earn.json()["by_kind"]["licence_fee"]["amount"] >= 3 * 7

    from typer.testing import CliRunner

    from genserve.cli import app as cli_app
    res = CliRunner().invoke(cli_app, ["buzz", "receipt", job.id, "--json"],
                             env={"GENSERVE_DATA_DIR": str(env.settings.data_dir)})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["legs"] == body["legs"]


def test_early_access_over_http_refuses_generation_until_unlocked(env, public_owned):  # noqa: F811
    lora = _lora(env, "sd1", 43, rid="eco-ea-lora")
    with env.db.transaction() as s:
        s.execute(update(Resource).where(Resource.id == lora).values(owner_user_id="olga"))
    app = _app(env.service)
    buyer = env.user(grant=1000)
    h_owner = {**SERVICE, "X-User-Id": "olga"}
    h_buyer = {**SERVICE, "X-User-Id": buyer.user_id}
    body = {"prompt": "a red fox", "checkpoint": "tiny-sd1", "steps": 2, "seed": 5, "resources": [{"id": lora}]}
    terms, too_long, refused, dl, unlock, again, quote, dl2 = _http(
        app,
        ("PUT", f"/v1/resources/{lora}/terms", {"json": {"early_access_days": 7, "unlock_price": 120},
                                                 "headers": h_owner}),
        ("PUT", f"/v1/resources/{lora}/terms", {"json": {"early_access_days": 61}, "headers": h_owner}),
        ("POST", "/v1/quotes", {"json": body, "headers": h_buyer}),
        ("GET", f"/v1/resources/{lora}/access", {"headers": h_buyer}),
        ("POST", f"/v1/resources/{lora}/unlock", {"headers": h_buyer}),
        ("POST", f"/v1/resources/{lora}/unlock", {"headers": h_buyer}),
        ("POST", "/v1/quotes", {"json": body, "headers": h_buyer}),
        ("GET", f"/v1/resources/{lora}/access", {"headers": h_buyer}),
    )
    assert terms.status_code == 200 and terms.json()["early_access"], terms.text
    assert too_long.status_code == 422 and too_long.json()["code"] == "invalid_early_access_days"
    assert refused.status_code == 403 and refused.json()["code"] == "early_access"
    assert dl.status_code == 403
    assert unlock.status_code == 200 and again.json()["repeated"] and again.json()["id"] == unlock.json()["id"]
    assert quote.status_code == 200 and dl2.status_code == 200
    assert env.available(buyer) == 1000 - 120
    assert env.ledger.balance(user_account("olga")).posted >= 120 - 36
    [refund] = _http(app, ("POST", f"/v1/admin/unlocks/{unlock.json()['id']}/refund", {"headers": ADMIN}))
    assert refund.status_code == 200 and env.available(buyer) == 1000
    assert env.ledger.balance(REVENUE_GENERATION).posted is not None and env.ledger.verify().ok


def test_allowance_route_claims_once_per_day(env):  # noqa: F811
    app = _app(env.service)
    h = {**SERVICE, "X-User-Id": "allow1"}
    first, second, other = _http(app, ("POST", "/v1/accounts/allow1/allowance", {"headers": h}),
                                 ("POST", "/v1/accounts/allow1/allowance", {"headers": h}),
                                 ("POST", "/v1/accounts/someone/allowance", {"headers": h}))
    assert first.json()["granted"] == env.settings.billing.daily_allowance and not first.json()["already_claimed"]
    assert second.json() == {"granted": 0, "already_claimed": True, "available": first.json()["available"]}
    assert other.status_code == 403
