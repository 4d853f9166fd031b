"""The ledger's plumbing, shared by every operation: one transaction per call with whole-call
retries, the idempotency record, and the balance moves and entry pairs that every transfer writes.

Every balance change goes through `_move`, which updates account rows in one global order (users
first, then system accounts, each by id) so that no two operations wait on each other in a cycle.
Every transfer goes through `_write_transfer`, which writes a debit and a credit of the same
amount, so the entries always sum to zero. The idempotency record is written in the same
transaction as the change it describes, so a retry finds both or neither.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from genserve.billing.accounts import SYSTEM_ACCOUNTS, is_system_account, lock_order
from genserve.billing.errors import IdempotencyKeyReused
from genserve.billing.records import LedgerEntry
from genserve.billing.transactions import (
    PooledConnections,
    PostgresTx,
    SqliteTx,
    Tx,
    dialect_sql,
    is_retryable,
)
from genserve.core.config.billing import BillingConfig
from genserve.core.db import Database, ThreadConnections

T = TypeVar("T")


class LedgerBase:
    """State and helpers the operation mixins (`GrantOps`, `HoldOps`, `Verification`) build on;
    `genserve.billing.ledger.Ledger` composes them."""

    def __init__(self, db: Database, config: BillingConfig | None = None):
        self.db = db
        self.config = config or BillingConfig()
        self._dialect = db.engine.dialect.name
        self._sql = dialect_sql(self._dialect)
        self._dbapi_error: type[Exception] = db.engine.dialect.loaded_dbapi.Error
        if self._dialect == "postgresql":
            self._connections: PooledConnections | ThreadConnections = PooledConnections(db)
            self._tx_class: type[SqliteTx] | type[PostgresTx] = PostgresTx
        else:
            self._connections = db.thread_connections
            self._tx_class = SqliteTx
        self._system_ready = False
        self._system_lock = threading.Lock()

    def close(self) -> None:
        """Release the ledger's own connections (PostgreSQL); the Database stays the caller's."""
        if isinstance(self._connections, PooledConnections):
            self._connections.close()

    def _now(self) -> dt.datetime:
        """The ledger's clock; `Ledger` supplies it."""
        raise NotImplementedError

    def _run(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in one transaction, retrying it whole on deadlock/serialization failures."""
        if not self._system_ready:
            self._create_system_accounts()
        return self._retrying(fn)

    def _retrying(self, fn: Callable[[Tx], T]) -> T:
        attempts = self.config.retry_attempts
        for attempt in range(attempts):
            try:
                return self._once(fn)
            except self._dbapi_error as exc:
                if attempt + 1 >= attempts or not is_retryable(exc, self._dialect):
                    raise
                time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))
        raise AssertionError("unreachable")

    def _once(self, fn: Callable[[Tx], T]) -> T:
        conn, handle = self._connections.acquire()
        try:
            tx = self._tx_class(conn, self._sql)
        except BaseException:
            self._connections.release(handle)
            raise
        try:
            result = fn(tx)
            tx.commit()
            return result
        except BaseException:
            try:
                tx.rollback()
            except Exception:  # noqa: BLE001 - a dead connection: drop it
                self._connections.discard(handle)
                handle = None
            raise
        finally:
            tx.cur.close()
            if handle is not None:
                self._connections.release(handle)

    def _read(self, name: str, params: dict[str, Any]) -> list[tuple]:
        """One read-only statement outside any write transaction (no write lock on SQLite)."""
        conn, handle = self._connections.acquire()
        try:
            cur = conn.cursor()
            try:
                cur.execute(self._sql[name], params)
                return cur.fetchall()
            finally:
                cur.close()
        finally:
            self._connections.release(handle)

    def _create_system_accounts(self) -> None:
        # under a lock, and marked ready only once they exist: a concurrent first call (32 allowance
        # claims at once) must not run ahead and credit from a system account not yet created
        with self._system_lock:
            if not self._system_ready:
                self._retrying(self._insert_system_accounts)
                self._system_ready = True

    def _insert_system_accounts(self, tx: Tx) -> None:
        for account in SYSTEM_ACCOUNTS:
            self._insert_account(tx, account, self._now())
            for shard in range(self.config.system_account_shards):
                tx.write("ensure_shard", {"account": account, "shard": shard})

    @staticmethod
    def _insert_account(tx: Tx, account: str, now: dt.datetime) -> None:
        """Create the account row if it does not exist yet (safe under concurrency)."""
        kind = "system" if is_system_account(account) else "user"
        tx.write("ensure_account", {"id": account, "kind": kind, "now": tx.ts(now)})

    @staticmethod
    def _request(**args: Any) -> str:
        return json.dumps(args, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def _recall(tx: Tx, key: str, operation: str, request: str) -> dict | None:
        """The stored result of an earlier call with `key`, or None; a different call is refused."""
        row = tx.run("recall", {"key": key}).fetchone()
        return None if row is None else LedgerBase._check_prior(key, operation, request, *row)

    @staticmethod
    def _check_prior(
        key: str, operation: str, request: str, first_operation: str, first_request: str, result: str
    ) -> dict:
        if first_operation != operation or first_request != request:
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} was already used for a different call",
                details={"key": key, "first": {"operation": first_operation, "request": json.loads(first_request)}},
            )
        return json.loads(result)

    @staticmethod
    def _remember(tx: Tx, key: str, operation: str, request: str, result: Any, now: dt.datetime) -> None:
        tx.write(
            "remember",
            {"key": key, "operation": operation, "request": request, "result": json.dumps(result), "now": tx.ts(now)},
        )

    def _move(self, tx: Tx, deltas: dict[str, tuple[int, int]], *, credit: frozenset[str] = frozenset(),
              now: dt.datetime | None = None) -> None:
        """Apply (posted, held) deltas to accounts, locking rows in the global order. A system
        account's posted delta goes to one of its shards, picked at random. Accounts in `credit`
        (user accounts only credited) are created by their credit if they do not exist yet."""
        for account in sorted(deltas, key=lock_order):
            d_posted, d_held = deltas[account]
            if account in credit:
                tx.write("credit_account", {"account": account, "posted": d_posted, "now": tx.ts(now)})
                continue
            if is_system_account(account) and not d_held:
                shard = random.randrange(self.config.system_account_shards)
                tx.write("move_shard", {"account": account, "shard": shard, "posted": d_posted})
                continue
            tx.write("move", {"account": account, "posted": d_posted, "held": d_held})

    @staticmethod
    def _write_transfer(
        tx: Tx,
        *,
        source: str,
        destination: str,
        amount: int,
        kind: str,
        key: str | None,
        reason: str,
        now: dt.datetime,
        hold_id: str | None = None,
        need_entry: bool = True,
    ) -> LedgerEntry | None:
        """The two entries of a transfer (debit source, credit destination); returns the credit one
        (or None without `need_entry`, which lets PostgreSQL send it with the commit)."""
        transfer_id = uuid.uuid4().hex
        params = {"transfer_id": transfer_id, "source": source, "destination": destination, "amount": amount,
                  "kind": kind, "hold_id": hold_id, "key": key, "reason": reason, "now": tx.ts(now)}
        if not need_entry:
            tx.write("insert_transfer", params)
            return None
        rows = tx.run("insert_transfer", params).fetchall()
        credit_id = next(entry_id for entry_id, entry_amount in rows if entry_amount > 0)
        return LedgerEntry(
            id=int(credit_id), transfer_id=transfer_id, account=destination, counterparty=source, amount=amount,
            kind=kind, hold_id=hold_id, key=key, reason=reason, created_at=now,
        )
