"""Training pays its base model's owner: the licence fee is a line of the quote, held with it, and
captured to the owner (less the platform share) only when the run delivers its LoRA; a failed or
canceled run pays no fee. A base model in early access refuses training until it is unlocked.

Runs in one process as test_training_service.py does (`JobRunner` instead of a Ray Job)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sqlalchemy import update
from test_training_service import SMALL, make_service, one_thread  # noqa: F401 - shared fixtures
from training_support import available, fund, toy_zip

from genserve.billing.accounts import REVENUE_TRAINING, user_account
from genserve.billing.economy import CreatorTerms, price_training
from genserve.billing.pricing import MILLI, Pricing
from genserve.core.config.billing import EconomyConfig
from genserve.economy.store import EarlyAccessLocked
from genserve.resources.models import Resource
from training.records import quote_from_dict, quote_to_dict
from training.run import JobRunner
from training.service import Submission

FEE = 40  # 30 % platform share: 28 to the owner, 12 to revenue:training
STEPS_PRICE = math.ceil(4 * 200 / 1000) + 2 * 10  # SMALL on 4 images: 4 steps, 2 saved epochs


def _own_base_model(service, owner: str = "olga", fee: int = FEE, **terms) -> str:  # noqa: ANN001
    """Make the sd1 base model a resource of `owner` with a licence fee (and any other terms)."""
    deps = service.deps
    base = deps.limits.base_models["sd1"].checkpoint
    with deps.db.transaction() as s:
        s.execute(update(Resource).where(Resource.id == base).values(owner_user_id=owner))
    deps.economy.set_terms(owner, base, licence_fee=fee, **terms)
    return base


def _posted(deps, account: str) -> int:  # noqa: ANN001
    return deps.ledger.balance(account).posted


def test_price_training_adds_the_fee_once_with_legs_summing_to_it():
    pricing = Pricing.load(Path(__file__).resolve().parents[1] / "configs" / "pricing.yaml")
    plain = pricing.quote_training("sd1", 4, 2)
    cfg = EconomyConfig(platform_share_pct=30, licence_fee_cap=100)
    q = price_training(plain, payer="alice", base=CreatorTerms("ckpt", "olga", 45), config=cfg)
    assert q.total == plain.total + 45 and q.owner_fee == 45
    assert q.items[-1].name == "licence_fee:ckpt" and q.items[-1].amount == 45
    assert sum(i.amount for i in q.items) == q.total
    assert dict(((a, k), n) for a, n, k in q.owner_fee_legs) == {
        ("user:olga", "licence_fee"): 45 - 13, (REVENUE_TRAINING, "platform_share"): 13}
    # the fee is owed only for a delivered LoRA
    assert q.for_progress(4, 2) == plain.total and q.for_progress(4, 2, delivered=True) == q.total
    assert q.legs_for_progress(4, 2, delivered=False, destination=REVENUE_TRAINING) is None
    legs = q.legs_for_progress(4, 2, delivered=True, destination=REVENUE_TRAINING)
    assert sum(n for _, n, _ in legs) == q.total
    assert quote_from_dict(quote_to_dict(q)) == q  # the job row's JSON keeps it whole
    # no fee: the payer's own base model, a base model without an owner, a fee of 0; capped by config
    assert price_training(plain, payer="olga", base=CreatorTerms("ckpt", "olga", 45), config=cfg) == plain
    assert price_training(plain, payer="alice", base=CreatorTerms("ckpt", None, 45), config=cfg) == plain
    assert price_training(plain, payer="alice", base=CreatorTerms("ckpt", "olga", 0), config=cfg) == plain
    capped = price_training(plain, payer="alice", base=CreatorTerms("ckpt", "olga", 500),
                            config=EconomyConfig(licence_fee_cap=60))
    assert capped.owner_fee == 60 and capped.items[-1].millibuzz == 60 * MILLI


def test_a_fee_bearing_base_model_pays_its_owner_exactly_when_the_run_delivers(tmp_path: Path,
        make_service):  # noqa: F811 - the fixture
    service = make_service()
    deps = service.deps
    base = _own_base_model(service)
    revenue_before = _posted(deps, REVENUE_TRAINING)
    row = service.submit("alice", toy_zip(tmp_path / "fee.zip"), Submission("sd1", False, params=SMALL))
    items = {i["name"]: i["amount"] for i in row.quote["items"]}
    assert items[f"licence_fee:{base}"] == FEE
    assert row.quote_total == STEPS_PRICE + FEE == sum(items.values())
    assert deps.ledger.balance("user:alice").held == row.quote_total  # the hold covers the fee

    assert JobRunner(deps, row.id, row.ray_job_id).run() == 0
    done = service.get(row.id, "alice")
    assert done.status == "succeeded" and done.charged == row.quote_total
    assert available(deps, "alice") == 1000 - (STEPS_PRICE + FEE)  # the user pays exactly the quote
    assert deps.ledger.balance("user:alice").held == 0
    assert _posted(deps, user_account("olga")) == FEE - FEE * 30 // 100
    assert _posted(deps, REVENUE_TRAINING) - revenue_before == STEPS_PRICE + FEE * 30 // 100
    legs = {(e.account, e.kind): e.amount for e in deps.ledger.hold_entries(row.hold_id)
            if e.account != user_account("alice")}
    assert legs == {(REVENUE_TRAINING, "capture"): STEPS_PRICE, (user_account("olga"), "licence_fee"): 28,
                    (REVENUE_TRAINING, "platform_share"): 12}
    assert deps.economy.earnings("olga")["by_kind"]["licence_fee"]["amount"] == 28
    report = deps.ledger.verify()
    assert report.ok, report.problems


def test_a_failed_or_canceled_run_pays_no_fee(tmp_path: Path, make_service):  # noqa: F811 - the fixture
    service = make_service()
    deps = service.deps
    _own_base_model(service)
    failed = service.submit("alice", toy_zip(tmp_path / "f.zip"), Submission("sd1", False, params=SMALL))
    assert failed.quote_total == STEPS_PRICE + FEE
    deps.records.transition(failed.id, ["queued"], "running")
    deps.records.set_fields(failed.id, step=3)
    deps.records.transition(failed.id, ["running"], "failed", error_code="training_failed")
    service.reconcile()
    assert deps.records.get(failed.id).charged == 0 and available(deps, "alice") == 1000

    # canceled mid-run: the steps run are paid, the owner nothing (no LoRA was delivered)
    canceled = service.submit("alice", toy_zip(tmp_path / "c.zip"), Submission("sd1", False, params=SMALL))
    deps.records.transition(canceled.id, ["queued"], "running")
    deps.records.set_fields(canceled.id, step=3, cancel_requested=True)
    deps.records.transition(canceled.id, ["running"], "canceled")
    done = deps.records.settle(deps.ledger, canceled.id, deps.store)
    assert done.charged == math.ceil(3 * 200 / 1000) and available(deps, "alice") == 1000 - done.charged
    assert _posted(deps, user_account("olga")) == 0
    assert deps.ledger.balance("user:alice").held == 0 and deps.ledger.verify().ok


def test_a_base_model_in_early_access_refuses_training_until_unlocked(tmp_path: Path,
        make_service):  # noqa: F811 - the fixture
    service = make_service()
    deps = service.deps
    base = _own_base_model(service, early_access_days=7, unlock_price=50)
    zip_path = toy_zip(tmp_path / "ea.zip")
    with pytest.raises(EarlyAccessLocked) as err:
        service.submit("alice", zip_path, Submission("sd1", real_person=False, params=SMALL))
    assert err.value.code == "early_access" and err.value.details["resources"][0]["id"] == base
    assert service.list() == [] and available(deps, "alice") == 1000  # refused before anything was held

    deps.economy.unlock("alice", base)
    row = service.submit("alice", zip_path, Submission("sd1", real_person=False, params=SMALL))
    assert row.status == "queued" and row.quote_total == STEPS_PRICE + FEE
    assert available(deps, "alice") == 1000 - 50 - row.quote_total

    # the owner trains on their own base model: never locked out, no fee to themselves
    fund(deps, "olga", 500)
    own = service.submit("olga", zip_path, Submission("sd1", real_person=False, params=SMALL))
    assert own.quote_total == STEPS_PRICE and not any(i["name"].startswith("licence_fee")
                                                      for i in own.quote["items"])
    assert deps.ledger.verify().ok
