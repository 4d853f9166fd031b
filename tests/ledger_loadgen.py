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
                result = ledger.capture(*args[1:])
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
        return ledger.capture(args[1], args[2], args[3])
    return ledger.release(args[1], args[2])


def hold_capture_cycles(url: str, account: str, n: int, prefix: str) -> tuple[float, float]:
    """Run `n` hold -> capture cycles on `account`; returns (wall seconds, this process's CPU seconds)."""
    db = Database(url)
    ledger = Ledger(db)
    ledger.balance(account)  # connect and create system accounts outside the timed loop
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            hold = ledger.hold(account, 2, f"{prefix}-h{i}", destination=REVENUE_GENERATION)
            ledger.capture(hold.id, 1, f"{prefix}-c{i}")
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        ledger.close()
        db.dispose()
