"""The ledger under concurrency, crashes and replays: threads on SQLite, processes on PostgreSQL,
a child process killed with SIGKILL inside a transaction, and a full replay of recorded calls."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from ledger_loadgen import CREATORS, random_mix, replay_call
from sqlalchemy import text

from genserve.billing.ledger import REVENUE_GENERATION, Ledger
from genserve.core.db import Database

HOT = [f"user:hot{i}" for i in range(3)]
SEED_BUZZ = 400


def _seed(ledger: Ledger) -> None:
    for account in HOT:
        ledger.grant(account, SEED_BUZZ, f"seed-{account}")


def _assert_consistent(ledger: Ledger, captured: int) -> None:
    report = ledger.verify()
    assert report.ok, report.problems
    balances = [ledger.balance(a) for a in HOT]
    assert all(b.posted >= 0 and b.held == 0 and b.available >= 0 for b in balances)
    paid = ledger.balance(REVENUE_GENERATION).posted + sum(ledger.balance(c).posted for c in CREATORS)
    assert sum(b.posted for b in balances) + paid == SEED_BUZZ * len(HOT)
    assert paid == captured  # every capture paid three parties
    assert ledger.balance("mint").posted == -SEED_BUZZ * len(HOT)


def _snapshot(db: Database) -> tuple:
    with db.engine.connect() as c:
        return (
            c.execute(text("SELECT id, posted, held FROM ledger_accounts ORDER BY id")).all(),
            c.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one(),
            c.execute(text("SELECT count(*) FROM ledger_holds")).scalar_one(),
        )


def test_threads_on_sqlite_keep_invariants(db):
    ledger = Ledger(db)
    _seed(ledger)
    results, errors = [], []

    def worker(seed: int) -> None:
        try:
            results.append(random_mix(db.url, HOT, 120, seed, ledger=ledger))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 8 and sum(r.retries for r in results) > 0
    _assert_consistent(ledger, sum(r.captured_buzz for r in results))


@pytest.mark.postgres
def test_processes_on_postgres_keep_invariants(pg_db):
    ledger = Ledger(pg_db)
    _seed(ledger)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(5) as pool:
        results = pool.starmap(random_mix, [(pg_db.url, HOT, 150, seed) for seed in range(5)], chunksize=1)
    assert sum(r.holds for r in results) > 100 and sum(r.retries for r in results) > 0
    _assert_consistent(ledger, sum(r.captured_buzz for r in results))


def test_replaying_every_call_changes_nothing(db):
    ledger = Ledger(db)
    _seed(ledger)
    run = random_mix(db.url, HOT, 200, seed=11, ledger=ledger, record=True)
    grants = [(a, SEED_BUZZ, f"seed-{a}") for a in HOT]
    before = _snapshot(db)
    for args, first in run.calls:
        assert replay_call(ledger, args) == first
    for account, amount, key in grants:
        assert ledger.grant(account, amount, key).amount == amount
    assert _snapshot(db) == before
    assert ledger.verify().ok


# A child that stops inside a transaction right before its COMMIT (SQLite: every write of the
# operation done; PostgreSQL: the statements whose results were needed already ran on the server,
# for a grant that includes the balance updates and entries); the parent then kills it with SIGKILL.
PAUSED_CHILD = textwrap.dedent(
    """
    import sys, time
    from genserve.billing import ledger as L
    from genserve.core.db import Database

    LEGS = [(L.REVENUE_GENERATION, 15, "capture"), ("user:owner", 7, "licence_fee"), ("user:tipped", 3, "creator_tip")]
    ledger = L.Ledger(Database(sys.argv[1]))
    ledger.grant("user:k", 100, "seed")
    hold = ledger.hold("user:k", 40, "hold", destination=L.REVENUE_GENERATION)
    armed = False
    for cls in (L._SqliteTx, L._PostgresTx):
        def paused_commit(self, commit=cls.commit):
            if armed:
                print("PAUSED", hold.id, flush=True)
                time.sleep(600)
            commit(self)
        cls.commit = paused_commit
    armed = True
    if sys.argv[2] == "capture":
        ledger.capture(hold.id, 25, "capture", legs=LEGS)
    else:
        ledger.grant("user:k", 500, "grant")
    """
)

LOOP_CHILD = textwrap.dedent(
    """
    import sys
    from genserve.billing import ledger as L
    from genserve.core.db import Database

    ledger = L.Ledger(Database(sys.argv[1]))
    ledger.grant("user:loop", 10**6, "seed")
    print("READY", flush=True)
    i = 0
    while True:
        hold = ledger.hold("user:loop", 7, f"h{sys.argv[2]}-{i}", destination=L.REVENUE_GENERATION)
        print(i, flush=True)
        if i % 3:
            n = i % 8
            legs = [(L.REVENUE_GENERATION, n - n // 2, "capture"), ("user:owner", n // 2, "licence_fee")]
            ledger.capture(hold.id, n, f"c{sys.argv[2]}-{i}", legs=legs)
        else:
            ledger.release(hold.id, f"r{sys.argv[2]}-{i}")
        i += 1
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)


def _killed_mid_operation_leaves_no_partial_transfer(db: Database, op: str) -> None:
    child = _spawn(PAUSED_CHILD, db.url, op)
    try:
        line = child.stdout.readline().split()
        assert line and line[0] == "PAUSED", line
        hold_id = line[1]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    ledger = Ledger(db)
    assert ledger.verify().ok, ledger.verify().problems
    assert ledger.get_hold(hold_id).status == "open"
    assert ledger.balance("user:k").to_dict() == {"posted": 100, "held": 40, "available": 60}
    assert ledger.balance(REVENUE_GENERATION).posted == 0
    assert len(ledger.history("user:k")) == 1
    if op == "grant":
        assert ledger.grant("user:k", 500, "grant").amount == 500
        assert ledger.grant("user:k", 500, "grant").amount == 500
        assert ledger.balance("user:k").to_dict() == {"posted": 600, "held": 40, "available": 560}
        assert ledger.verify().ok
        return
    # The caller's retry with the same key completes the (three-party) capture exactly once.
    legs = [(REVENUE_GENERATION, 15, "capture"), ("user:owner", 7, "licence_fee"), ("user:tipped", 3, "creator_tip")]
    assert ledger.capture(hold_id, 25, "capture", legs=legs).captured == 25
    assert ledger.capture(hold_id, 25, "capture", legs=legs).captured == 25
    assert ledger.balance("user:k").to_dict() == {"posted": 75, "held": 0, "available": 75}
    assert (ledger.balance("user:owner").posted, ledger.balance("user:tipped").posted) == (7, 3)
    assert ledger.verify().ok


def _killed_at_random_keeps_invariants(db: Database) -> None:
    for round_ in range(2):
        child = _spawn(LOOP_CHILD, db.url, str(round_))
        try:
            assert child.stdout.readline().strip() == "READY"
            # Kill after a set number of holds (not a set time, which a loaded machine stretches),
            # at a random moment in the operations that follow.
            while int(child.stdout.readline()) < 5 + 4 * round_:
                pass
            time.sleep(random.Random(round_).uniform(0.0, 0.05))
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
    ledger = Ledger(db)
    assert ledger.reap_expired() == 0
    report = ledger.verify()
    assert report.ok, report.problems
    assert report.stats["holds_total"] > 3
    bal = ledger.balance("user:loop")
    assert bal.posted + ledger.balance(REVENUE_GENERATION).posted + ledger.balance("user:owner").posted == 10**6
    assert bal.held == 7 * report.stats["holds_open"]


@pytest.mark.parametrize("op", ["capture", "grant"])
def test_sigkill_inside_transaction_sqlite(db, op):
    _killed_mid_operation_leaves_no_partial_transfer(db, op)


@pytest.mark.postgres
@pytest.mark.parametrize("op", ["capture", "grant"])
def test_sigkill_inside_transaction_postgres(pg_db, op):
    _killed_mid_operation_leaves_no_partial_transfer(pg_db, op)


def test_sigkill_at_random_sqlite(db):
    _killed_at_random_keeps_invariants(db)


@pytest.mark.postgres
def test_sigkill_at_random_postgres(pg_db):
    _killed_at_random_keeps_invariants(pg_db)
