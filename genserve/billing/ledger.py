"""The buzz ledger: double-entry accounts with two-phase holds (TigerBeetle's pending/post/void).

It is written here rather than taken from a library because no maintained Python library keeps
double-entry accounts with two-phase holds in the service's own SQLite/PostgreSQL database
(TigerBeetle, whose model it follows, runs as a separate server).

Every operation is one database transaction, so a process that dies half-way leaves nothing
behind. Balances live in `ledger_accounts` rows whose CHECK constraints refuse a negative user
balance; the Python checks only turn that refusal into a typed error before it happens.

Concurrency: on SQLite each transaction starts with BEGIN IMMEDIATE (one writer at a time). On
PostgreSQL the hold row is locked first (SELECT ... FOR UPDATE), then account rows in one global
order (user accounts before system accounts, each by id), so two operations never wait on each
other in a cycle; deadlock and serialization failures are retried as a whole transaction. System
accounts (mint, promo, revenue) keep their posted balance in several shard rows, one picked at
random per transfer, so concurrent captures do not all queue on one revenue row.

Idempotency: every call carries a key. The first result is stored with the key in the same
transaction; a retry with the same key and arguments returns it unchanged, the same key with
other arguments is refused (`idempotency_key_reused`). The arguments compared are the ones that
move money (accounts, amounts, hold id, grant kind), not free text or expiry times.

The parts: account names and argument checks (`accounts`), returned values (`records`), SQL and
transactions (`transactions`), shared plumbing (`ledger_base`), grants and history (`grants`),
holds (`holds`) and invariant checks (`verify`). `Ledger` composes them, and this module keeps
every public name importable from here.
"""

from __future__ import annotations

import datetime as dt

from genserve.billing.accounts import (
    GRANT_KINDS,
    MINT,
    PROMO,
    REVENUE_GENERATION,
    REVENUE_TRAINING,
    SYSTEM_ACCOUNTS,
    USER_PREFIX,
    check_account,
    check_amount,
    check_key,
    check_user_account,
    is_system_account,
    user_account,
)
from genserve.billing.grants import GrantOps
from genserve.billing.holds import HoldOps
from genserve.billing.records import Balance, HoldInfo, LedgerEntry, VerifyReport, utcnow
from genserve.billing.transactions import PostgresTx, SqliteTx
from genserve.billing.verify import Verification

__all__ = [
    "GRANT_KINDS",
    "MINT",
    "PROMO",
    "REVENUE_GENERATION",
    "REVENUE_TRAINING",
    "SYSTEM_ACCOUNTS",
    "USER_PREFIX",
    "Balance",
    "HoldInfo",
    "Ledger",
    "LedgerEntry",
    "VerifyReport",
    "check_account",
    "check_amount",
    "check_key",
    "check_user_account",
    "is_system_account",
    "user_account",
    "utcnow",
]

# The crash tests pause a commit by patching the transaction classes under these names.
_SqliteTx = SqliteTx
_PostgresTx = PostgresTx


class Ledger(GrantOps, HoldOps, Verification):
    """Buzz accounts, transfers and holds on one `Database`. Thread-safe; one per process is enough.

    On PostgreSQL the ledger keeps its own pool (`PooledConnections`), which `close()` releases;
    on SQLite it runs on the Database's per-thread connections, closed with the Database.
    """

    def _now(self) -> dt.datetime:
        # Every operation reads the time through this module's `utcnow`, so replacing
        # `genserve.billing.ledger.utcnow` moves the clock of the whole ledger at once.
        return utcnow()

    def ensure_account(self, account: str) -> None:
        """Create the account if needed (user accounts are also created by their first grant)."""
        account = check_account(account)
        self._run(lambda tx: self._insert_account(tx, account, self._now()))

    def balance(self, account: str) -> Balance:
        """The account's balance; a user that never had buzz has all zeros."""
        account = check_account(account)
        rows = self._read("balance", {"account": account})
        posted, held = rows[0] if rows else (0, 0)
        return Balance(posted=posted, held=held, available=posted - held)
