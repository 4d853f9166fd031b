"""How the ledger talks to its database: its SQL statements, one transaction per operation, and
which failures are safe to retry.

Each ledger operation is one transaction (`SqliteTx` or `PostgresTx`), so a process that dies
half-way leaves nothing behind. On SQLite the transaction takes the write lock up front (BEGIN
IMMEDIATE); on PostgreSQL rows are locked as the statements reach them, in the order the ledger
sends them, and a deadlock or serialization failure is retried as a whole transaction
(`is_retryable`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Any

from sqlalchemy import create_engine, event

from genserve.billing.records import as_utc
from genserve.core.db import Database
from genserve.core.errors import ConfigError

# PostgreSQL: serialization_failure, deadlock_detected. A unique violation on the idempotency key
# means a concurrent call with the same key committed first: retrying returns its result.
_RETRY_PGCODES = {"40001", "40P01"}
_IDEMPOTENCY_PK = "pk_ledger_idempotency"

# The write path speaks plain SQL through the DBAPI cursor: it is the hot path (a hold and a
# capture per generation), and building ORM/Core statements costs more than running them.
_SQL = {
    "recall": "SELECT operation, request, result FROM ledger_idempotency WHERE key = :key",
    "remember": "INSERT INTO ledger_idempotency (key, operation, request, result, created_at) "
    "VALUES (:key, :operation, :request, :result, :now)",
    "ensure_account": "INSERT INTO ledger_accounts (id, kind, posted, held, created_at) "
    "VALUES (:id, :kind, 0, 0, :now) ON CONFLICT (id) DO NOTHING",
    # Reserves only for a key not used before, so a first hold takes one statement.
    "reserve_new": "UPDATE ledger_accounts SET held = held + :amount "
    "WHERE id = :account AND posted - held >= :amount "
    "AND NOT EXISTS (SELECT 1 FROM ledger_idempotency WHERE key = :key)",
    "balance": "SELECT a.posted + COALESCE((SELECT SUM(s.posted) FROM ledger_account_shards s "
    "WHERE s.account_id = a.id), 0), a.held FROM ledger_accounts a WHERE a.id = :account",
    "ensure_shard": "INSERT INTO ledger_account_shards (account_id, shard, posted) VALUES (:account, :shard, 0) "
    "ON CONFLICT (account_id, shard) DO NOTHING",
    "move_shard": "UPDATE ledger_account_shards SET posted = posted + :posted WHERE account_id = :account "
    "AND shard = :shard",
    "move": "UPDATE ledger_accounts SET posted = posted + :posted, held = held + :held WHERE id = :account",
    # credits a user account, creating it on its first credit (a resource owner paid by a capture leg)
    "credit_account": "INSERT INTO ledger_accounts (id, kind, posted, held, created_at) "
    "VALUES (:account, 'user', :posted, 0, :now) ON CONFLICT (id) DO UPDATE SET posted = ledger_accounts.posted + "
    "EXCLUDED.posted",
    "insert_hold": "INSERT INTO ledger_holds (id, account_id, destination_id, amount, captured, status, "
    "idempotency_key, reason, expires_at, created_at) VALUES (:id, :account, :destination, :amount, 0, 'open', "
    ":key, :reason, :expires_at, :now)",
    # Locks the hold and reads what an earlier call with the same key returned, in one statement.
    "lock_hold_recall": "SELECT h.id, h.account_id, h.destination_id, h.amount, h.captured, h.status, "
    "h.idempotency_key, h.reason, h.expires_at, h.created_at, h.closed_at, i.operation, i.request, i.result "
    "FROM ledger_holds h LEFT JOIN ledger_idempotency i ON i.key = :key WHERE h.id = :id{for_update}",
    "get_hold": "SELECT id, account_id, destination_id, amount, captured, status, idempotency_key, reason, "
    "expires_at, created_at, closed_at FROM ledger_holds WHERE id = :id",
    "close_hold": "UPDATE ledger_holds SET captured = :captured, status = :status, closed_at = :now WHERE id = :id",
    "insert_transfer": "INSERT INTO ledger_entries (transfer_id, account_id, counterparty_id, amount, kind, hold_id, "
    "idempotency_key, reason, created_at) VALUES "
    "(:transfer_id, :source, :destination, -CAST(:amount AS BIGINT), :kind, :hold_id, :key, :reason, :now), "
    "(:transfer_id, :destination, :source, :amount, :kind, :hold_id, :key, :reason, :now) RETURNING id, amount",
    # one line of a multi-leg transfer (a capture paying several parties: one debit, a credit per leg)
    "insert_entry": "INSERT INTO ledger_entries (transfer_id, account_id, counterparty_id, amount, kind, hold_id, "
    "idempotency_key, reason, created_at) VALUES (:transfer_id, :account, :counterparty, :amount, :kind, :hold_id, "
    ":key, :reason, :now)",
    "expired_holds": "SELECT id, account_id, amount FROM ledger_holds WHERE status = 'open' AND expires_at <= :now "
    "ORDER BY id LIMIT :batch{for_update_skip_locked}",
    "expire_hold": "UPDATE ledger_holds SET status = 'expired', closed_at = :now WHERE id = :id AND status = 'open'",
}
_FOR_UPDATE = {
    "sqlite": {"for_update": "", "for_update_skip_locked": ""},
    "postgresql": {"for_update": " FOR UPDATE OF h", "for_update_skip_locked": " FOR UPDATE SKIP LOCKED"},
}


_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def dialect_sql(dialect: str) -> dict[str, str]:
    """The statements as the ledger sends them: sqlite3 runs them with `:name` parameters; on
    PostgreSQL each is an `EXECUTE` of a statement prepared once per connection (`_postgres_sql`)."""
    if dialect not in _FOR_UPDATE:
        raise ConfigError(f"the ledger runs on SQLite or PostgreSQL, not {dialect}", code="unsupported_database")
    if dialect == "postgresql":
        return _postgres_sql()[0]
    return {name: sql.format(**_FOR_UPDATE[dialect]) for name, sql in _SQL.items()}


def _postgres_sql() -> tuple[dict[str, str], str]:
    """(the `EXECUTE` of each statement, the `PREPARE`s that define them): planning a statement
    costs the server more than running it, so each connection plans them once."""
    executes, prepares = {}, []
    for name, sql in _SQL.items():
        params = list(dict.fromkeys(_PARAM.findall(sql)))
        position = {param: i + 1 for i, param in enumerate(params)}
        body = _PARAM.sub(lambda m, at=position: f"${at[m.group(1)]}", sql.format(**_FOR_UPDATE["postgresql"]))
        prepares.append(f"PREPARE ledger_{name} AS {body}")
        executes[name] = f"EXECUTE ledger_{name}(" + ", ".join(f"%({p})s" for p in params) + ")"
    return executes, "; ".join(prepares)


def sqlite_ts(value: dt.datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text form (UTC), so ORM readers and string order both work."""
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")


class SqliteTx:
    """SQLite runs in-process: statements execute as they come, after BEGIN IMMEDIATE takes the write lock."""

    ts = staticmethod(sqlite_ts)

    def __init__(self, conn: Any, sql: dict[str, str]):
        self.conn = conn
        self.sql = sql
        self.cur = conn.cursor()
        self.cur.execute("BEGIN IMMEDIATE")

    def run(self, name: str, params: dict[str, Any]) -> Any:
        """Execute now; returns the cursor holding the result."""
        self.cur.execute(self.sql[name], params)
        return self.cur

    write = run

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class PostgresTx:
    """On PostgreSQL a round trip costs more than the statement: statements whose results are not
    needed are queued and sent with the next one that is; BEGIN goes with the first statement and
    COMMIT with the last writes. The connection is in autocommit mode, so the transaction is explicit."""

    ts = staticmethod(as_utc)

    def __init__(self, conn: Any, sql: dict[str, str]):
        self.conn = conn
        self.sql = sql
        self.cur = conn.cursor()
        self._queued: list[bytes] = [b"BEGIN"]

    def _send(self, last: bytes) -> None:
        self._queued.append(last)
        batch, self._queued = b"; ".join(self._queued), []
        self.cur.execute(batch)  # no parameters: the statements are already bound

    def run(self, name: str, params: dict[str, Any]) -> Any:
        """Send the queue and this statement; returns the cursor holding this statement's result."""
        self._send(self.cur.mogrify(self.sql[name], params))
        return self.cur

    def write(self, name: str, params: dict[str, Any]) -> None:
        """Queue a statement whose result is not needed (its errors surface at the next send)."""
        self._queued.append(self.cur.mogrify(self.sql[name], params))

    def commit(self) -> None:
        self._send(b"COMMIT")

    def rollback(self) -> None:
        self._queued = []
        self.cur.execute("ROLLBACK")


Tx = SqliteTx | PostgresTx


def _prepare_statements(prepares: str, dbapi_conn: Any, _record: Any) -> None:
    """Prepare the ledger's statements on a new PostgreSQL connection (they live as long as it does)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(prepares)
    finally:
        cur.close()
    if not dbapi_conn.autocommit:
        dbapi_conn.commit()


def is_retryable(exc: Exception, dialect: str) -> bool:
    """Deadlocks, serialization failures, a lost connection (the idempotency key makes a repeat safe),
    and a concurrent first use of the same idempotency key (the repeat returns its result)."""
    if dialect != "postgresql":
        return False
    pgcode = getattr(exc, "pgcode", None)
    if pgcode in _RETRY_PGCODES:
        return True
    if pgcode is None and type(exc).__name__ in ("OperationalError", "InterfaceError"):
        return True
    diag = getattr(exc, "diag", None)
    return pgcode == "23505" and getattr(diag, "constraint_name", None) == _IDEMPOTENCY_PK


class PooledConnections:
    """PostgreSQL: the ledger's own small pool in autocommit mode (no ping or reset per checkout,
    explicit transactions), each connection with the ledger's statements prepared."""

    def __init__(self, db: Database):
        self.engine = create_engine(
            db.engine.url,
            isolation_level="AUTOCOMMIT",
            pool_pre_ping=False,
            pool_reset_on_return=None,
            pool_size=db.engine.pool.size(),
            max_overflow=db.engine.pool.size(),
        )
        event.listen(self.engine, "connect", functools.partial(_prepare_statements, _postgres_sql()[1]))

    def acquire(self) -> tuple[Any, Any]:
        """(DBAPI connection, the handle `release`/`discard` take)."""
        pooled = self.engine.raw_connection()
        return pooled.dbapi_connection, pooled

    @staticmethod
    def release(handle: Any) -> None:
        handle.close()

    @staticmethod
    def discard(handle: Any) -> None:
        handle.invalidate()
        handle.close()

    def close(self) -> None:
        self.engine.dispose()
