"""Ledger behaviour: grants, two-phase holds, idempotency, expiry, refusals and the database's own guards."""

from __future__ import annotations

import datetime as dt
import random
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from genserve.billing.ledger import Ledger, LedgerEntry, utcnow
from genserve.core.config.billing import BillingConfig
from genserve.core.db import Database
from genserve.core.errors import Conflict, InsufficientFunds, InvalidRequest, NotFound

REV = "revenue:generation"


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory) -> Path:
    """One migrated SQLite file per module; each test gets a copy (much faster than migrating)."""
    path = tmp_path_factory.mktemp("ledger-template") / "genserve.db"
    database = Database(f"sqlite:///{path}")
    database.migrate()
    Ledger(database).ensure_account("mint")
    database.dispose()
    return path


@pytest.fixture
def sqlite_db(migrated_sqlite, tmp_path):
    path = tmp_path / "genserve.db"
    shutil.copy(migrated_sqlite, path)
    database = Database(f"sqlite:///{path}")
    yield database
    database.dispose()


@pytest.fixture
def ledger(sqlite_db):
    return Ledger(sqlite_db, BillingConfig(expired_hold_grace_s=0))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_ledger(request):
    """The same checks on SQLite and on PostgreSQL (skipped where no server runs)."""
    database = request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")
    ledger = Ledger(database, BillingConfig(expired_hold_grace_s=0))
    yield ledger
    ledger.close()


def snapshot(ledger: Ledger) -> tuple:
    """Everything a refused call must leave untouched."""
    with ledger.db.engine.connect() as c:
        accounts = c.execute(text("SELECT id, posted, held FROM ledger_accounts ORDER BY id")).all()
        holds = c.execute(text("SELECT id, status, captured FROM ledger_holds ORDER BY id")).all()
        entries = c.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
        keys = c.execute(text("SELECT count(*) FROM ledger_idempotency")).scalar_one()
    return accounts, holds, entries, keys


def test_grant_hold_capture_moves_buzz_to_destination(any_ledger):
    ledger = any_ledger
    entry = ledger.grant("user:1", 100, "g1", reason="welcome")
    assert isinstance(entry, LedgerEntry) and entry.amount == 100 and entry.counterparty == "mint"
    hold = ledger.hold("user:1", 30, "h1", destination=REV, reason="job-1")
    assert hold.status == "open" and hold.amount == 30 and hold.captured == 0
    assert ledger.balance("user:1").to_dict() == {"posted": 100, "held": 30, "available": 70}

    done = ledger.capture(hold.id, 12, "c1")
    assert (done.status, done.captured, done.remaining) == ("captured", 12, 0)
    assert ledger.balance("user:1").to_dict() == {"posted": 88, "held": 0, "available": 88}
    assert ledger.balance(REV).posted == 12
    assert ledger.balance("mint").posted == -100
    assert ledger.get_hold(hold.id).status == "captured"
    kinds = [e.kind for e in ledger.history("user:1")]
    assert kinds == ["capture", "admin_grant"]
    assert ledger.history("user:1")[0].amount == -12
    assert ledger.verify().ok


def test_release_and_zero_capture_return_everything(ledger):
    ledger.grant("user:1", 50, "g")
    a = ledger.hold("user:1", 20, "ha", destination=REV)
    b = ledger.hold("user:1", 20, "hb", destination=REV)
    assert ledger.release(a.id, "ra").status == "released"
    zero = ledger.capture(b.id, 0, "cb")
    assert (zero.status, zero.captured) == ("released", 0)
    assert ledger.balance("user:1").to_dict() == {"posted": 50, "held": 0, "available": 50}
    assert ledger.balance(REV).posted == 0
    assert ledger.verify().ok


def test_hold_beyond_available_is_insufficient_funds(ledger):
    ledger.grant("user:1", 10, "g")
    ledger.hold("user:1", 8, "h1", destination=REV)
    before = snapshot(ledger)
    with pytest.raises(InsufficientFunds) as exc:
        ledger.hold("user:1", 3, "h2", destination=REV)
    assert exc.value.code == "insufficient_funds" and exc.value.http_status == 402
    assert exc.value.details["available"] == 2
    with pytest.raises(InsufficientFunds):
        ledger.hold("user:never-seen", 1, "h3", destination=REV)
    assert snapshot(ledger) == before


def test_daily_allowance_once_per_user_per_utc_day(ledger):
    day = dt.date(2030, 1, 2)
    first = ledger.daily_allowance("user:7", day=day)
    assert first is not None and first.amount == ledger.config.daily_allowance and first.counterparty == "promo"
    assert ledger.daily_allowance("user:7", day=day) is None
    assert ledger.daily_allowance("user:7", day=day + dt.timedelta(days=1)) is not None
    assert ledger.daily_allowance("user:8", day=day) is not None
    assert ledger.balance("user:7").posted == 2 * ledger.config.daily_allowance
    assert ledger.balance("promo").posted == -3 * ledger.config.daily_allowance
    assert ledger.verify().ok


def test_daily_allowance_off_when_configured_zero(sqlite_db):
    ledger = Ledger(sqlite_db, BillingConfig(daily_allowance=0))
    assert ledger.daily_allowance("user:1") is None
    assert ledger.balance("user:1").posted == 0


def test_idempotent_retries_return_first_result(any_ledger):
    ledger = any_ledger
    g1 = ledger.grant("user:1", 40, "g")
    assert ledger.grant("user:1", 40, "g") == g1
    h1 = ledger.hold("user:1", 25, "h", destination=REV)
    assert ledger.hold("user:1", 25, "h", destination=REV) == h1
    c1 = ledger.capture(h1.id, 10, "c")
    before = snapshot(ledger)
    assert ledger.capture(h1.id, 10, "c") == c1
    # The hold's own key still answers with the hold as first created.
    assert ledger.hold("user:1", 25, "h", destination=REV) == h1
    assert snapshot(ledger) == before


@pytest.mark.parametrize(
    "call",
    [
        lambda L, h: L.grant("user:1", 41, "g"),
        lambda L, h: L.grant("user:2", 40, "g"),
        lambda L, h: L.grant("user:1", 40, "g", kind="purchase"),
        lambda L, h: L.hold("user:1", 5, "g", destination=REV),
        lambda L, h: L.hold("user:1", 6, "h", destination=REV),
        lambda L, h: L.hold("user:1", 5, "h", destination="revenue:training"),
        lambda L, h: L.capture(h.id, 1, "h"),
        lambda L, h: L.release(h.id, "g"),
    ],
)
def test_key_reused_with_other_arguments_is_refused(ledger, call):
    ledger.grant("user:1", 40, "g")
    hold = ledger.hold("user:1", 5, "h", destination=REV)
    before = snapshot(ledger)
    with pytest.raises(Conflict) as exc:
        call(ledger, hold)
    assert exc.value.code == "idempotency_key_reused" and exc.value.http_status == 409
    assert snapshot(ledger) == before


def _bad_calls():
    """(name, call, error type, code): every one must be refused and change nothing."""
    future = utcnow() + dt.timedelta(hours=1)
    return [
        ("grant_negative", lambda L, h: L.grant("user:1", -5, "k"), InvalidRequest, "invalid_amount"),
        ("grant_zero", lambda L, h: L.grant("user:1", 0, "k"), InvalidRequest, "invalid_amount"),
        ("grant_float", lambda L, h: L.grant("user:1", 1.5, "k"), InvalidRequest, "invalid_amount"),
        ("grant_float_whole", lambda L, h: L.grant("user:1", 2.0, "k"), InvalidRequest, "invalid_amount"),
        ("grant_bool", lambda L, h: L.grant("user:1", True, "k"), InvalidRequest, "invalid_amount"),
        ("grant_str", lambda L, h: L.grant("user:1", "5", "k"), InvalidRequest, "invalid_amount"),
        ("grant_huge", lambda L, h: L.grant("user:1", 10**19, "k"), InvalidRequest, "invalid_amount"),
        ("grant_system", lambda L, h: L.grant("mint", 5, "k"), InvalidRequest, "invalid_account"),
        ("grant_kind", lambda L, h: L.grant("user:1", 5, "k", kind="gift"), InvalidRequest, "invalid_grant_kind"),
        ("grant_unknown", lambda L, h: L.grant("bank", 5, "k"), NotFound, "account_not_found"),
        ("grant_malformed", lambda L, h: L.grant("user:", 5, "k"), InvalidRequest, "invalid_account"),
        ("grant_no_key", lambda L, h: L.grant("user:1", 5, ""), InvalidRequest, "invalid_idempotency_key"),
        ("hold_negative", lambda L, h: L.hold("user:1", -1, "k", destination=REV), InvalidRequest, "invalid_amount"),
        ("hold_zero", lambda L, h: L.hold("user:1", 0, "k", destination=REV), InvalidRequest, "invalid_amount"),
        ("hold_float", lambda L, h: L.hold("user:1", 0.5, "k", destination=REV), InvalidRequest, "invalid_amount"),
        ("hold_unknown_dest", lambda L, h: L.hold("user:1", 1, "k", destination="revenue:x"), NotFound,
         "account_not_found"),
        ("hold_self", lambda L, h: L.hold("user:1", 1, "k", destination="user:1"), InvalidRequest, "same_account"),
        ("hold_from_system", lambda L, h: L.hold("mint", 1, "k", destination=REV), InvalidRequest,
         "invalid_account"),
        ("hold_past_expiry", lambda L, h: L.hold("user:1", 1, "k", destination=REV,
                                                 expires_at=utcnow() - dt.timedelta(seconds=1)),
         InvalidRequest, "invalid_expiry"),
        ("hold_too_long", lambda L, h: L.hold("user:1", 1, "k", destination=REV,
                                              expires_at=future + dt.timedelta(days=30)),
         InvalidRequest, "invalid_expiry"),
        ("capture_unknown", lambda L, h: L.capture("nope", 1, "k"), NotFound, "hold_not_found"),
        ("release_unknown", lambda L, h: L.release("nope", "k"), NotFound, "hold_not_found"),
        ("capture_above", lambda L, h: L.capture(h.id, 11, "k"), InvalidRequest, "capture_exceeds_hold"),
        ("capture_negative", lambda L, h: L.capture(h.id, -1, "k"), InvalidRequest, "invalid_amount"),
        ("capture_float", lambda L, h: L.capture(h.id, 1.0, "k"), InvalidRequest, "invalid_amount"),
        ("capture_bool", lambda L, h: L.capture(h.id, False, "k"), InvalidRequest, "invalid_amount"),
        ("balance_unknown", lambda L, h: L.balance("nobody"), NotFound, "account_not_found"),
    ]


@pytest.mark.parametrize("name,call,error,code", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_refused_with_stable_code_and_changes_nothing(ledger, name, call, error, code):
    ledger.grant("user:1", 100, "seed")
    hold = ledger.hold("user:1", 10, "seed-hold", destination=REV)
    before = snapshot(ledger)
    with pytest.raises(error) as exc:
        call(ledger, hold)
    assert exc.value.code == code
    assert snapshot(ledger) == before


@pytest.mark.parametrize(
    "first,second,code",
    [
        (lambda L, h: L.capture(h.id, 5, "a"), lambda L, h: L.capture(h.id, 5, "b"), "hold_captured"),
        (lambda L, h: L.capture(h.id, 5, "a"), lambda L, h: L.release(h.id, "b"), "hold_captured"),
        (lambda L, h: L.release(h.id, "a"), lambda L, h: L.capture(h.id, 5, "b"), "hold_released"),
        (lambda L, h: L.release(h.id, "a"), lambda L, h: L.release(h.id, "b"), "hold_released"),
    ],
    ids=["double_capture", "release_after_capture", "capture_after_release", "double_release"],
)
def test_closed_hold_refuses_further_transitions(ledger, first, second, code):
    ledger.grant("user:1", 100, "seed")
    hold = ledger.hold("user:1", 10, "seed-hold", destination=REV)
    first(ledger, hold)
    before = snapshot(ledger)
    with pytest.raises(Conflict) as exc:
        second(ledger, hold)
    assert exc.value.code == code
    assert snapshot(ledger) == before


def test_expired_hold_cannot_be_captured_and_is_reaped_once(any_ledger, monkeypatch):
    ledger = any_ledger
    ledger.grant("user:1", 100, "seed")
    soon = utcnow() + dt.timedelta(seconds=30)
    hold = ledger.hold("user:1", 10, "h", destination=REV, expires_at=soon)
    other = ledger.hold("user:1", 20, "h2", destination=REV)
    later = soon + dt.timedelta(seconds=1)
    # Before the reaper runs, verify (as of `later`) reports the overdue open hold.
    report = ledger.verify(now=later)
    assert not report.ok and any(hold.id in p for p in report.problems)

    # The ledger's clock moves past the expiry: capture is refused and changes nothing.
    with monkeypatch.context() as m:
        m.setattr("genserve.billing.ledger.utcnow", lambda: later)
        before = snapshot(ledger)
        with pytest.raises(Conflict) as exc:
            ledger.capture(hold.id, 5, "c")
        assert exc.value.code == "hold_expired"
        assert snapshot(ledger) == before

    assert ledger.reap_expired(later) == 1
    assert ledger.reap_expired(later) == 0
    assert ledger.get_hold(hold.id).status == "expired"
    assert ledger.get_hold(other.id).status == "open"
    assert ledger.balance("user:1").to_dict() == {"posted": 100, "held": 20, "available": 80}
    with pytest.raises(Conflict) as exc:
        ledger.release(hold.id, "r")
    assert exc.value.code == "hold_expired"
    assert ledger.verify(now=later).ok


def test_database_refuses_negative_user_balance_and_entry_edits(any_ledger):
    ledger = any_ledger
    ledger.grant("user:1", 10, "seed")
    with pytest.raises(IntegrityError), ledger.db.engine.begin() as c:
        c.execute(text("UPDATE ledger_accounts SET posted = -1 WHERE id = 'user:1'"))
    with pytest.raises(IntegrityError), ledger.db.engine.begin() as c:
        c.execute(text("UPDATE ledger_accounts SET held = 11 WHERE id = 'user:1'"))
    with pytest.raises(IntegrityError), ledger.db.engine.begin() as c:
        c.execute(text("UPDATE ledger_accounts SET held = -1 WHERE id = 'mint'"))
    for sql in ("UPDATE ledger_entries SET amount = 99", "DELETE FROM ledger_entries"):
        with pytest.raises(IntegrityError), ledger.db.engine.begin() as c:
            c.execute(text(sql))
    assert ledger.balance("user:1").posted == 10
    assert ledger.verify().ok


def test_verify_finds_tampering(ledger):
    ledger.grant("user:1", 10, "seed")
    with ledger.db.engine.begin() as c:
        c.execute(text("UPDATE ledger_accounts SET posted = 11 WHERE id = 'user:1'"))
    report = ledger.verify()
    assert not report.ok and any("user:1" in p for p in report.problems)


def test_random_sequence_keeps_invariants(any_ledger):
    ledger = any_ledger
    rng = random.Random(3)
    users = [f"user:{i}" for i in range(4)]
    for u in users:
        ledger.grant(u, 200, f"seed-{u}")
    open_holds = []
    for i in range(300 if ledger.db.is_sqlite else 120):
        op = rng.random()
        if op < 0.45:
            try:
                open_holds.append(ledger.hold(rng.choice(users), rng.randint(1, 40), f"h{i}", destination=REV))
            except InsufficientFunds:
                pass
        elif open_holds and op < 0.8:
            h = open_holds.pop(rng.randrange(len(open_holds)))
            ledger.capture(h.id, rng.randint(0, h.amount), f"c{i}")
        elif open_holds:
            ledger.release(open_holds.pop(rng.randrange(len(open_holds))).id, f"r{i}")
        else:
            ledger.grant(rng.choice(users), rng.randint(1, 50), f"g{i}")
    report = ledger.verify()
    assert report.ok, report.problems
    total_users = sum(ledger.balance(u).posted for u in users)
    assert total_users + ledger.balance(REV).posted + ledger.balance("mint").posted == 0


def test_sqlite_ledger_runs_on_one_connection_per_thread_closed_with_the_database(sqlite_db, tmp_path):
    import sqlite3
    import threading

    ledger = Ledger(sqlite_db)
    ledger.grant("user:1", 10, "seed")
    seen = []

    def work(i: int) -> None:
        ledger.grant("user:1", 1, f"t{i}")
        seen.append(ledger._connections.acquire()[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 3  # each thread its own, reused for every call
    assert ledger._connections.acquire()[0] is ledger._connections.acquire()[0]

    sqlite_db.dispose()  # closes them all, so the WAL is merged and a copy of the file alone is whole
    for conn in seen:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    path = tmp_path / "genserve.db"
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    with sqlite3.connect(copy) as raw:
        assert raw.execute("SELECT posted FROM ledger_accounts WHERE id = 'user:1'").fetchone() == (13,)
    assert ledger.balance("user:1").posted == 13  # a call after dispose opens a new connection


@pytest.mark.postgres
def test_postgres_ledger_runs_prepared_statements(pg_db):
    ledger = Ledger(pg_db)
    try:
        ledger.grant("user:1", 10, "seed")
        hold = ledger.hold("user:1", 4, "h", destination=REV)
        ledger.capture(hold.id, 3, "c")
        conn, handle = ledger._connections.acquire()
        try:
            cur = conn.cursor()
            cur.execute("SELECT name, generic_plans + custom_plans FROM pg_prepared_statements")
            plans = dict(cur.fetchall())
        finally:
            ledger._connections.release(handle)
        assert {"ledger_reserve_new", "ledger_lock_hold_recall", "ledger_insert_transfer"} <= set(plans)
        assert sum(plans.values()) >= 5  # the calls above ran through them
    finally:
        ledger.close()
