"""Synthetic ledger workloads, shared by `bench/ledger.py` and the concurrency checks.

Each function opens its own `Database` from a URL, so it can run in a fresh process
(multiprocessing `spawn`) as well as in a thread.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from genserve.billing.ledger import REVENUE_GENERATION, Ledger
from genserve.core.db import Database
from genserve.core.errors import Conflict, InsufficientFunds

# every capture pays three parties, as a generation with a fee-bearing LoRA and a creator tip does
CREATORS = ("user:creator-a", "user:creator-b")


def three_legs(amount: int) -> list[tuple[str, int, str]]:
    """`amount` split between the platform and two creators (licence fee, tip); they sum to it."""
    fee, tip = amount // 3, amount // 4
    return [(REVENUE_GENERATION, amount - fee - tip, "capture"), (CREATORS[0], fee, "licence_fee"),
            (CREATORS[1], tip, "creator_tip")]


@dataclass
class MixStats:
    holds: int = 0
    captures: int = 0
    releases: int = 0
    retries: int = 0
    refused: int = 0
    captured_buzz: int = 0
    calls: list[tuple] = field(default_factory=list)


def random_mix(
    url: str, accounts: list[str], n_ops: int, seed: int, *, ledger: Ledger | None = None, record: bool = False
) -> MixStats:
    """Random holds, captures, releases and same-key retries on a few (hot) accounts.

    Every result of a retry must equal the first result; a mismatch raises AssertionError.
    With `record`, every call and its result is kept in `calls` for a later replay.
    """
    own = ledger is None
    ledger = ledger or Ledger(Database(url))
    rng = random.Random(seed)
    stats = MixStats()
    open_holds = []
    try:
        for i in range(n_ops):
            tag = f"{seed}-{i}"
            r = rng.random()
            if r < 0.45 or not open_holds:
                account = rng.choice(accounts)
                args = ("hold", account, rng.randint(1, 30), f"h-{tag}")
                try:
                    hold = ledger.hold(args[1], args[2], args[3], destination=REVENUE_GENERATION)
                except InsufficientFunds:
                    stats.refused += 1
                    continue
                stats.holds += 1
                open_holds.append(hold)
                result = hold
            elif r < 0.8:
                hold = open_holds.pop(rng.randrange(len(open_holds)))
                args = ("capture", hold.id, rng.randint(0, hold.amount), f"c-{tag}")
                result = ledger.capture(*args[1:], legs=three_legs(args[2]))
                stats.captures += 1
                stats.captured_buzz += result.captured
            else:
                hold = open_holds.pop(rng.randrange(len(open_holds)))
                args = ("release", hold.id, f"r-{tag}")
                result = ledger.release(*args[1:])
                stats.releases += 1
            if record:
                stats.calls.append((args, result))
            if rng.random() < 0.2:
                stats.retries += 1
                again = replay_call(ledger, args)
                if again != result:
                    raise AssertionError(f"retry of {args} returned {again}, first {result}")
        for hold in open_holds:
            try:
                ledger.release(hold.id, f"final-{hold.id}")
                stats.releases += 1
            except Conflict:
                stats.refused += 1
    finally:
        if own:
            ledger.close()
            ledger.db.dispose()
    return stats


def replay_call(ledger: Ledger, args: tuple):  # noqa: ANN201 - HoldInfo
    """Run one recorded call again with the same key."""
    op = args[0]
    if op == "hold":
        return ledger.hold(args[1], args[2], args[3], destination=REVENUE_GENERATION)
    if op == "capture":
        return ledger.capture(args[1], args[2], args[3], legs=three_legs(args[2]))
    return ledger.release(args[1], args[2])


def hold_capture_cycles(url: str, account: str, n: int, prefix: str, owner: str | None = None
                        ) -> tuple[float, float]:
    """Run `n` hold -> capture cycles on `account`, each capture paying three parties (the platform,
    a resource owner's fee and a creator tip, to `owner`, by default one per paying account); returns
    (wall seconds, this process's CPU seconds)."""
    db = Database(url)
    ledger = Ledger(db)
    ledger.balance(account)  # connect and create system accounts outside the timed loop
    owner = owner or f"{account}-owner"
    legs = [(REVENUE_GENERATION, 1, "capture"), (owner, 1, "licence_fee"), (owner, 1, "creator_tip")]
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            hold = ledger.hold(account, 4, f"{prefix}-h{i}", destination=REVENUE_GENERATION)
            ledger.capture(hold.id, 3, f"{prefix}-c{i}", legs=legs)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        ledger.close()
        db.dispose()
