"""Creator economy money flow without the generator: per-image legs, multi-party captures on both
databases (also concurrent), unlocks, contributions, refunds and the daily allowance under a race."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

import genserve.billing.ledger as ledger_module
from genserve.billing.economy import CreatorTerms, price_generation, price_training
from genserve.billing.ledger import REVENUE_TRAINING, Ledger, user_account
from genserve.billing.pricing import Quote, QuoteItem, TrainingQuote
from genserve.core.config.billing import BillingConfig, EconomyConfig
from genserve.core.errors import Conflict, InvalidRequest
from genserve.economy.store import EarlyAccessLocked, Economy
from genserve.resources.registry import ResourceRegistry

REV = "revenue:generation"
CFG = EconomyConfig(platform_share_pct=30, priority_fee_per_image={"low": 0, "normal": 0, "high": 3})


def base_quote(per_image: int = 20, quantity: int = 4) -> Quote:
    return Quote(family="sd1", quantity=quantity, per_image=per_image, total=per_image * quantity,
                 items=(QuoteItem("image", per_image * quantity, "base"),))


def two_fee_loras() -> list[CreatorTerms]:
    return [CreatorTerms("ckpt", None, 0), CreatorTerms("lora-a", "alice", 10), CreatorTerms("lora-b", "bob", 7)]


def test_quote_lists_base_fees_tips_priority_and_legs_sum_to_each_image():
    q = price_generation(base_quote(), payer="carol", terms=two_fee_loras(), config=CFG,
                         creator_tip_pct=25, platform_tip_pct=10, priority="high")
    names = [i.name for i in q.items]
    assert names == ["image", "licence_fee:lora-a", "licence_fee:lora-b", "creator_tip", "platform_tip", "priority"]
    # base 20; fees 10 + 7; creator tip ceil(20*25/100)=5 split 3 (alice, first) + 2 (bob); platform tip 2; priority 3
    assert q.per_image == 20 + 10 + 7 + 5 + 2 + 3 == 47
    assert q.total == 4 * 47 == sum(i.amount for i in q.items)
    legs = {(a, k): amt for a, amt, k in q.legs_per_image}
    assert legs[("user:alice", "licence_fee")] == 10 - 3 and legs[("user:bob", "licence_fee")] == 7 - 2
    assert legs[("user:alice", "creator_tip")] == 3 and legs[("user:bob", "creator_tip")] == 2  # 30 % of 3, 2 = 0
    assert sum(amt for _, amt, _ in q.legs_per_image) == q.per_image
    three = q.legs_for_delivered(3)
    assert sum(a for _, a, _ in three) == q.for_delivered(3) == 3 * 47
    assert q.legs_for_delivered(0) is None


def test_own_resources_pay_nothing_and_a_tip_with_no_owner_is_not_charged():
    q = price_generation(base_quote(), payer="alice", terms=[CreatorTerms("lora-a", "alice", 10)], config=CFG,
                         creator_tip_pct=50)
    assert q.per_image == 20 and q.legs_per_image == ()
    assert [i.amount for i in q.items if i.name == "creator_tip"] == [0]


@pytest.mark.parametrize("pct", [3, 101, -5, True])
def test_tips_are_whole_percent_steps_of_five(pct):
    with pytest.raises(InvalidRequest):
        price_generation(base_quote(), payer="c", terms=[], config=CFG, creator_tip_pct=pct)


def test_licence_fee_is_capped_by_config():
    q = price_generation(base_quote(), payer="c", terms=[CreatorTerms("x", "alice", 500)],
                         config=EconomyConfig(licence_fee_cap=100, platform_share_pct=0))
    assert q.per_image == 120


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_ledger(request):
    database = request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")
    ledger = Ledger(database, BillingConfig(expired_hold_grace_s=0))
    yield ledger
    ledger.close()


def test_multi_party_capture_pays_each_party_for_delivered_images_only(any_ledger):
    ledger = any_ledger
    q = price_generation(base_quote(), payer="carol", terms=two_fee_loras(), config=CFG,
                         creator_tip_pct=25, platform_tip_pct=10)
    ledger.grant("user:carol", 1000, "g")
    hold = ledger.hold("user:carol", q.total, "job:hold", destination=REV)
    legs = q.legs_for_delivered(3)  # one of four images withheld
    done = ledger.capture(hold.id, q.for_delivered(3), "job:capture", legs=legs)
    assert done.captured == 3 * 44
    assert ledger.capture(hold.id, q.for_delivered(3), "job:capture", legs=legs) == done  # a retry
    assert ledger.balance("user:carol").to_dict() == {"posted": 1000 - 132, "held": 0, "available": 1000 - 132}
    # alice: fee 10 -> 7 net, tip 3 -> 3 net; bob: fee 7 -> 5, tip 2 -> 2; per delivered image
    assert ledger.balance("user:alice").posted == 3 * (7 + 3)
    assert ledger.balance("user:bob").posted == 3 * (5 + 2)
    assert ledger.balance(REV).posted == 132 - 30 - 21
    report = ledger.verify()
    assert report.ok, report.problems
    with pytest.raises(Conflict):  # the same key with other legs
        ledger.capture(hold.id, q.for_delivered(3), "job:capture", legs=q.legs_for_delivered(2) + [(REV, 44, "capture")])


def test_a_training_capture_pays_the_base_model_owner_once_on_both_databases(any_ledger):
    ledger = any_ledger
    items = (QuoteItem("steps", 3, "10 x 300 millibuzz"), QuoteItem("saved_epochs", 10, "2 x 5"))
    plain = TrainingQuote(family="sd1", steps=10, saved_epochs=2, millibuzz_per_step=300,
                          buzz_per_saved_epoch=5, total=3 + 10, items=items)
    q = price_training(plain, payer="tara", base=CreatorTerms("ckpt", "olga", 40), config=CFG)
    ledger.grant("user:tara", 200, "g")
    done = ledger.hold("user:tara", q.total, "t1:hold", destination=REVENUE_TRAINING)
    legs = q.legs_for_progress(10, 2, delivered=True, destination=REVENUE_TRAINING)
    ledger.capture(done.id, q.for_progress(10, 2, delivered=True), "t1:capture", legs=legs)
    stopped = ledger.hold("user:tara", q.total, "t2:hold", destination=REVENUE_TRAINING)
    assert q.legs_for_progress(4, 0, delivered=False, destination=REVENUE_TRAINING) is None
    ledger.capture(stopped.id, q.for_progress(4, 0), "t2:capture")  # canceled: steps only, no fee
    assert ledger.balance("user:tara").to_dict() == {"posted": 200 - 53 - 2, "held": 0, "available": 145}
    assert ledger.balance("user:olga").posted == 40 - 12  # once, less the 30 % platform share
    assert ledger.balance(REVENUE_TRAINING).posted == 13 + 12 + 2
    report = ledger.verify()
    assert report.ok, report.problems


def test_legs_must_sum_to_the_capture_and_never_pay_the_holder(any_ledger):
    ledger = any_ledger
    ledger.grant("user:dave", 100, "g")
    hold = ledger.hold("user:dave", 50, "h", destination=REV)
    with pytest.raises(InvalidRequest, match="sum"):
        ledger.capture(hold.id, 40, "c", legs=[(REV, 30, "capture"), ("user:erin", 5, "licence_fee")])
    with pytest.raises(InvalidRequest):
        ledger.capture(hold.id, 40, "c", legs=[(REV, 30, "capture"), ("user:dave", 10, "licence_fee")])
    with pytest.raises(InvalidRequest):
        ledger.capture(hold.id, 40, "c", legs=[(REV, 40, "gift")])
    assert ledger.get_hold(hold.id).status == "open" and ledger.verify().ok


def test_verify_catches_a_leg_that_does_not_add_up(db):
    ledger = Ledger(db, BillingConfig(expired_hold_grace_s=0))
    ledger.grant("user:f", 100, "g")
    hold = ledger.hold("user:f", 50, "h", destination=REV)
    ledger.capture(hold.id, 50, "c", legs=[(REV, 40, "capture"), ("user:g", 10, "licence_fee")])
    with db.engine.begin() as c:  # a capture whose recorded amount disagrees with its legs
        c.execute(text("UPDATE ledger_holds SET captured = 45 WHERE id = :id"), {"id": hold.id})
    problems = ledger.verify().problems
    assert any("legs post 50" in p for p in problems) and any("debits its account 50" in p for p in problems)


@pytest.mark.postgres
def test_concurrent_three_party_captures_on_postgres(pg_db):
    ledger = Ledger(pg_db, BillingConfig(expired_hold_grace_s=0))
    users = [f"user:p{i}" for i in range(8)]
    for u in users:
        ledger.grant(u, 10_000, f"g:{u}")
    legs_pi = (("revenue:generation", 7, "capture"), ("user:owner1", 2, "licence_fee"),
               ("user:owner2", 1, "creator_tip"))

    def cycles(u: str) -> None:
        for i in range(25):
            hold = ledger.hold(u, 10, f"{u}:{i}:h", destination=REV)
            ledger.capture(hold.id, 10, f"{u}:{i}:c", legs=legs_pi)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cycles, users))
    assert ledger.balance("user:owner1").posted == 8 * 25 * 2
    assert ledger.balance("user:owner2").posted == 8 * 25 * 1
    assert ledger.verify().ok
    ledger.close()


def test_daily_allowance_32_concurrent_claims_credit_once(any_ledger):
    ledger = any_ledger
    barrier = threading.Barrier(32)

    def claim(_: int):
        barrier.wait()
        return ledger.daily_allowance("user:claimer")

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(claim, range(32)))
    assert sum(r is not None for r in results) == 1
    assert ledger.balance("user:claimer").posted == ledger.config.daily_allowance
    assert ledger.verify().ok


# -- early access ------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def economy(request, monkeypatch):
    db = request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")
    now = [dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)]
    monkeypatch.setattr(ledger_module, "utcnow", lambda: now[0])
    ledger = Ledger(db, BillingConfig(expired_hold_grace_s=0))
    registry = ResourceRegistry(db)
    for rid in ("ea-lora", "free-lora"):
        registry.register(id=rid, kind="lora", family="sd1", name=rid, storage_key=f"k/{rid}", sha256=rid * 2,
                          owner_user_id="olga")
    econ = Economy(db, ledger)
    econ.clock = now
    return econ


def test_early_access_refused_before_unlock_allowed_after_and_for_all_after_the_window(economy):
    econ, ledger = economy, economy.ledger
    econ.set_terms("olga", "ea-lora", early_access_days=14, unlock_price=100, licence_fee=5)
    with pytest.raises(InvalidRequest):
        econ.set_terms("olga", "free-lora", early_access_days=61, unlock_price=100)
    ledger.grant("user:ulf", 500, "g")
    with pytest.raises(EarlyAccessLocked):
        econ.admit(["ea-lora"], "ulf")
    with pytest.raises(EarlyAccessLocked):
        econ.check_download("ea-lora", "ulf")
    assert econ.admit(["ea-lora"], "olga")[0].licence_fee == 5  # the owner always may
    first = econ.unlock("ulf", "ea-lora")
    again = econ.unlock("ulf", "ea-lora")
    assert again["id"] == first["id"] and again["repeated"]
    assert ledger.balance("user:ulf").posted == 400  # paid once
    assert ledger.balance("user:olga").posted == 70  # 100 less the 30 % platform share
    assert econ.admit(["ea-lora"], "ulf")[0].owner_user_id == "olga"
    econ.check_download("ea-lora", "ulf")
    with pytest.raises(EarlyAccessLocked):
        econ.admit(["ea-lora"], "vera")
    econ.clock[0] += dt.timedelta(days=14)  # the window ends by itself
    econ.admit(["ea-lora"], "vera")
    econ.check_download("ea-lora", "vera")
    # refunds are an admin's: the buyer gets the buzz back and loses the unlock
    econ.clock[0] -= dt.timedelta(days=1)
    econ.refund(first["id"])
    econ.refund(first["id"])  # idempotent
    assert ledger.balance("user:ulf").posted == 500
    with pytest.raises(EarlyAccessLocked):
        econ.admit(["ea-lora"], "ulf")
    assert ledger.verify().ok


def test_a_contribution_goal_reached_by_several_users_makes_it_public_early(economy):
    econ, ledger = economy, economy.ledger
    econ.set_terms("olga", "ea-lora", early_access_days=30, unlock_price=300, contribution_goal=250)
    for u in ("a1", "a2", "a3"):
        ledger.grant(user_account(u), 200, f"g:{u}")
    econ.contribute("a1", "ea-lora", 100, "k1")
    econ.contribute("a1", "ea-lora", 100, "k1")  # a retry: counted once
    econ.contribute("a2", "ea-lora", 100, "k1")
    with pytest.raises(EarlyAccessLocked):
        econ.admit(["ea-lora"], "zed")
    out = econ.contribute("a3", "ea-lora", 50, "k")
    assert out["terms"]["goal_reached_at"] is not None and not out["terms"]["early_access"]
    econ.admit(["ea-lora"], "zed")
    assert ledger.balance("user:olga").posted == 250 - 250 * 30 // 100
    with pytest.raises(Conflict):
        econ.contribute("a3", "ea-lora", 10, "late")
    assert ledger.verify().ok
