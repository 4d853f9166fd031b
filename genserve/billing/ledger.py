"""The buzz ledger: double-entry accounts with two-phase holds (TigerBeetle's pending/post/void).

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
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, func, select

from genserve.billing import models
from genserve.billing.errors import (
    AccountNotFound,
    CaptureExceedsHold,
    HoldClosed,
    HoldNotFound,
    IdempotencyKeyReused,
    InsufficientBuzz,
    InvalidAccount,
    InvalidAmount,
    InvalidIdempotencyKey,
)
from genserve.core import metrics
from genserve.core.config.billing import BillingConfig
from genserve.core.db import Database, ThreadConnections
from genserve.core.errors import ConfigError, InvalidRequest
from genserve.core.ids import USER_ID_DESCRIPTION, USER_ID_RULE, is_user_id

MINT = "mint"
PROMO = "promo"
REVENUE_GENERATION = "revenue:generation"
REVENUE_TRAINING = "revenue:training"
SYSTEM_ACCOUNTS = (MINT, PROMO, REVENUE_GENERATION, REVENUE_TRAINING)
USER_PREFIX = "user:"
GRANT_KINDS = ("admin_grant", "purchase", "compensation")

_USER_ACCOUNT = re.compile(USER_PREFIX + USER_ID_RULE, re.ASCII)
_MAX_KEY_LEN = 200
_MAX_REASON_LEN = 200
# PostgreSQL: serialization_failure, deadlock_detected. A unique violation on the idempotency key
# means a concurrent call with the same key committed first: retrying returns its result.
_RETRY_PGCODES = {"40001", "40P01"}
_IDEMPOTENCY_PK = "pk_ledger_idempotency"

accounts_t = models.AccountRow.__table__
holds_t = models.HoldRow.__table__
shards_t = models.AccountShardRow.__table__
entries_t = models.EntryRow.__table__

T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _utc(value: dt.datetime) -> dt.datetime:
    """Aware UTC datetime; naive values (SQLite reads) are taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else _utc(value).isoformat()


def _from_iso(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


@dataclass(frozen=True)
class Balance:
    """`available` = `posted` - `held`: what a new hold may reserve."""

    posted: int
    held: int
    available: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class HoldInfo:
    id: str
    account: str
    destination: str
    amount: int
    captured: int
    status: str  # open | captured | released | expired
    expires_at: dt.datetime
    key: str
    reason: str = ""
    created_at: dt.datetime | None = None
    closed_at: dt.datetime | None = None

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    @property
    def remaining(self) -> int:
        """Buzz still reserved by this hold."""
        return self.amount - self.captured if self.is_open else 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("expires_at", "created_at", "closed_at"):
            d[k] = _iso(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HoldInfo:
        d = dict(d)
        for k in ("expires_at", "created_at", "closed_at"):
            d[k] = _from_iso(d[k])
        return cls(**d)


@dataclass(frozen=True)
class LedgerEntry:
    """One line of a transfer, seen from `account`: `amount` > 0 credits it, < 0 debits it."""

    id: int
    transfer_id: str
    account: str
    counterparty: str
    amount: int
    kind: str
    hold_id: str | None
    key: str | None
    reason: str
    created_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["created_at"] = _iso(self.created_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        d = dict(d)
        d["created_at"] = _from_iso(d["created_at"])
        return cls(**d)


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_system_account(account: str) -> bool:
    return account in SYSTEM_ACCOUNTS


def user_account(user_id: str) -> str:
    """The account name for a user id (`"42"` -> `"user:42"`). The id follows the one rule the ingress
    checks (`genserve.core.ids`): a prefixed name such as `"user:42"` is not a user id."""
    if not is_user_id(user_id):
        raise InvalidAccount(f"malformed user id {user_id!r} ({USER_ID_DESCRIPTION})")
    return USER_PREFIX + user_id


def check_account(account: Any) -> str:
    """A valid account name, or a typed refusal."""
    if not isinstance(account, str):
        raise InvalidAccount(f"account must be a string, got {type(account).__name__}")
    if account in SYSTEM_ACCOUNTS:
        return account
    if account.startswith(USER_PREFIX):
        if _USER_ACCOUNT.fullmatch(account):
            return account
        raise InvalidAccount(f"malformed user account {account!r} (user:<id>, id of {USER_ID_DESCRIPTION})")
    raise AccountNotFound(f"unknown account {account!r}", details={"known": list(SYSTEM_ACCOUNTS)})


def check_user_account(account: Any) -> str:
    account = check_account(account)
    if is_system_account(account):
        raise InvalidAccount(f"{account!r} is a system account; only user accounts can do this")
    return account


def check_amount(amount: Any, max_amount: int, *, allow_zero: bool = False) -> int:
    """Amounts are plain ints (never bool or float), positive (or zero where it means 'nothing')."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"amount must be an integer number of buzz, got {type(amount).__name__} {amount!r}")
    low = 0 if allow_zero else 1
    if amount < low or amount > max_amount:
        raise InvalidAmount(f"amount must be between {low} and {max_amount}, got {amount}")
    return amount


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LEN:
        raise InvalidIdempotencyKey(f"idempotency key must be a non-empty string of at most {_MAX_KEY_LEN} chars")
    return key


def _check_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise InvalidRequest("reason must be a string", code="invalid_reason")
    return reason[:_MAX_REASON_LEN]


def _lock_order(account: str) -> tuple[bool, str]:
    """Rows are locked users first, then system accounts: the hot revenue rows are held shortest."""
    return (is_system_account(account), account)


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
    "expired_holds": "SELECT id, account_id, amount FROM ledger_holds WHERE status = 'open' AND expires_at <= :now "
    "ORDER BY id LIMIT :batch{for_update_skip_locked}",
    "expire_hold": "UPDATE ledger_holds SET status = 'expired', closed_at = :now WHERE id = :id AND status = 'open'",
}
_FOR_UPDATE = {
    "sqlite": {"for_update": "", "for_update_skip_locked": ""},
    "postgresql": {"for_update": " FOR UPDATE OF h", "for_update_skip_locked": " FOR UPDATE SKIP LOCKED"},
}


_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def _dialect_sql(dialect: str) -> dict[str, str]:
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


def _sqlite_ts(value: dt.datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text form (UTC), so ORM readers and string order both work."""
    return _utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")


def _read_ts(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return _utc(value)


class _SqliteTx:
    """SQLite runs in-process: statements execute as they come, after BEGIN IMMEDIATE takes the write lock."""

    ts = staticmethod(_sqlite_ts)

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


class _PostgresTx:
    """On PostgreSQL a round trip costs more than the statement: statements whose results are not
    needed are queued and sent with the next one that is; BEGIN goes with the first statement and
    COMMIT with the last writes. The connection is in autocommit mode, so the transaction is explicit."""

    ts = staticmethod(_utc)

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


_Tx = _SqliteTx | _PostgresTx


def _prepare_statements(prepares: str, dbapi_conn: Any, _record: Any) -> None:
    """Prepare the ledger's statements on a new PostgreSQL connection (they live as long as it does)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(prepares)
    finally:
        cur.close()
    if not dbapi_conn.autocommit:
        dbapi_conn.commit()


def _is_retryable(exc: Exception, dialect: str) -> bool:
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


class _PooledConnections:
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


class Ledger:
    """Buzz accounts, transfers and holds on one `Database`. Thread-safe; one per process is enough.

    On PostgreSQL the ledger keeps its own pool (`_PooledConnections`), which `close()` releases;
    on SQLite it runs on the Database's per-thread connections, closed with the Database.
    """

    def __init__(self, db: Database, config: BillingConfig | None = None):
        self.db = db
        self.config = config or BillingConfig()
        self._dialect = db.engine.dialect.name
        self._sql = _dialect_sql(self._dialect)
        self._dbapi_error: type[Exception] = db.engine.dialect.loaded_dbapi.Error
        if self._dialect == "postgresql":
            self._connections: _PooledConnections | ThreadConnections = _PooledConnections(db)
            self._tx_class: type[_SqliteTx] | type[_PostgresTx] = _PostgresTx
        else:
            self._connections = db.thread_connections
            self._tx_class = _SqliteTx
        self._system_ready = False

    def close(self) -> None:
        """Release the ledger's own connections (PostgreSQL); the Database stays the caller's."""
        if isinstance(self._connections, _PooledConnections):
            self._connections.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, fn: Callable[[_Tx], T]) -> T:
        """Run `fn` in one transaction, retrying it whole on deadlock/serialization failures."""
        if not self._system_ready:
            self._create_system_accounts()
        attempts = self.config.retry_attempts
        for attempt in range(attempts):
            try:
                return self._once(fn)
            except self._dbapi_error as exc:
                if attempt + 1 >= attempts or not _is_retryable(exc, self._dialect):
                    raise
                time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))
        raise AssertionError("unreachable")

    def _once(self, fn: Callable[[_Tx], T]) -> T:
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
        self._system_ready = True
        try:
            self._run(self._insert_system_accounts)
        except BaseException:
            self._system_ready = False
            raise

    def _insert_system_accounts(self, tx: _Tx) -> None:
        for account in SYSTEM_ACCOUNTS:
            self._insert_account(tx, account, utcnow())
            for shard in range(self.config.system_account_shards):
                tx.write("ensure_shard", {"account": account, "shard": shard})

    @staticmethod
    def _insert_account(tx: _Tx, account: str, now: dt.datetime) -> None:
        """Create the account row if it does not exist yet (safe under concurrency)."""
        kind = "system" if is_system_account(account) else "user"
        tx.write("ensure_account", {"id": account, "kind": kind, "now": tx.ts(now)})

    @staticmethod
    def _request(**args: Any) -> str:
        return json.dumps(args, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def _recall(tx: _Tx, key: str, operation: str, request: str) -> dict | None:
        """The stored result of an earlier call with `key`, or None; a different call is refused."""
        row = tx.run("recall", {"key": key}).fetchone()
        return None if row is None else Ledger._check_prior(key, operation, request, *row)

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
    def _remember(tx: _Tx, key: str, operation: str, request: str, result: Any, now: dt.datetime) -> None:
        tx.write(
            "remember",
            {"key": key, "operation": operation, "request": request, "result": json.dumps(result), "now": tx.ts(now)},
        )

    def _move(self, tx: _Tx, deltas: dict[str, tuple[int, int]]) -> None:
        """Apply (posted, held) deltas to accounts, locking rows in the global order. A system
        account's posted delta goes to one of its shards, picked at random."""
        for account in sorted(deltas, key=_lock_order):
            d_posted, d_held = deltas[account]
            if is_system_account(account) and not d_held:
                shard = random.randrange(self.config.system_account_shards)
                tx.write("move_shard", {"account": account, "shard": shard, "posted": d_posted})
                continue
            tx.write("move", {"account": account, "posted": d_posted, "held": d_held})

    @staticmethod
    def _write_transfer(
        tx: _Tx,
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

    def _credit_user(
        self, tx: _Tx, source: str, account: str, amount: int, key: str, kind: str, reason: str, now: dt.datetime
    ) -> LedgerEntry:
        self._insert_account(tx, account, now)
        self._move(tx, {account: (amount, 0), source: (-amount, 0)})
        return self._write_transfer(
            tx, source=source, destination=account, amount=amount, kind=kind, key=key, reason=reason, now=now
        )

    @staticmethod
    def _hold_from_row(row: Any) -> HoldInfo:
        hold_id, account, destination, amount, captured, status, key, reason, expires_at, created_at, closed_at = row
        return HoldInfo(
            id=hold_id, account=account, destination=destination, amount=amount, captured=captured, status=status,
            expires_at=_read_ts(expires_at), key=key, reason=reason, created_at=_read_ts(created_at),
            closed_at=_read_ts(closed_at),
        )

    def _locked_open_hold(self, tx: _Tx, hold_id: str, key: str, operation: str, request: str) -> HoldInfo | dict:
        """The open hold, locked; or the stored result when `key` was used before (a retry)."""
        row = tx.run("lock_hold_recall", {"id": hold_id, "key": key}).fetchone()
        if row is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        if row[11] is not None:
            return self._check_prior(key, operation, request, *row[11:])
        hold = self._hold_from_row(row[:11])
        if not hold.is_open:
            raise HoldClosed(
                f"hold {hold_id} is already {hold.status}", code=f"hold_{hold.status}", details={"hold": hold.to_dict()}
            )
        return hold

    def _close(self, tx: _Tx, hold: HoldInfo, captured: int, now: dt.datetime) -> HoldInfo:
        """Unreserve the hold, post `captured` of it to its destination, and mark it closed."""
        deltas = {hold.account: (-captured, -hold.amount)}
        if captured:
            deltas[hold.destination] = (captured, 0)
        self._move(tx, deltas)
        if captured:
            self._write_transfer(
                tx, source=hold.account, destination=hold.destination, amount=captured, kind="capture",
                key=hold.key, reason=hold.reason, now=now, hold_id=hold.id, need_entry=False,
            )
        status = "captured" if captured else "released"
        tx.write("close_hold", {"id": hold.id, "captured": captured, "status": status, "now": tx.ts(now)})
        return replace(hold, captured=captured, status=status, closed_at=now)

    # -- accounts ---------------------------------------------------------------------------

    def ensure_account(self, account: str) -> None:
        """Create the account if needed (user accounts are also created by their first grant)."""
        account = check_account(account)
        self._run(lambda tx: self._insert_account(tx, account, utcnow()))

    def balance(self, account: str) -> Balance:
        """The account's balance; a user that never had buzz has all zeros."""
        account = check_account(account)
        rows = self._read("balance", {"account": account})
        posted, held = rows[0] if rows else (0, 0)
        return Balance(posted=posted, held=held, available=posted - held)

    def history(self, account: str, limit: int = 100) -> list[LedgerEntry]:
        """The account's entries, newest first."""
        account = check_account(account)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest("limit must be a positive integer", code="invalid_limit")
        e = entries_t.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(entries_t).where(e.account_id == account).order_by(e.id.desc()).limit(limit))
            return [
                LedgerEntry(
                    id=r.id, transfer_id=r.transfer_id, account=r.account_id, counterparty=r.counterparty_id,
                    amount=r.amount, kind=r.kind, hold_id=r.hold_id, key=r.idempotency_key, reason=r.reason,
                    created_at=_utc(r.created_at),
                )
                for r in rows
            ]

    # -- grants -----------------------------------------------------------------------------

    def grant(self, account: str, amount: int, key: str, *, kind: str = "admin_grant", reason: str = "") -> LedgerEntry:
        """Credit a user from `mint` (admin grant, purchase, compensation); returns the user's entry."""
        account = check_user_account(account)
        amount = check_amount(amount, self.config.max_amount)
        key = check_key(key)
        reason = _check_reason(reason)
        if kind not in GRANT_KINDS:
            raise InvalidRequest(f"grant kind must be one of {GRANT_KINDS}, got {kind!r}", code="invalid_grant_kind")
        request = self._request(account=account, amount=amount, kind=kind)

        def tx_grant(tx: _Tx) -> LedgerEntry:
            prior = self._recall(tx, key, "grant", request)
            if prior is not None:
                return LedgerEntry.from_dict(prior)
            now = utcnow()
            entry = self._credit_user(tx, MINT, account, amount, key, kind, reason, now)
            self._remember(tx, key, "grant", request, entry.to_dict(), now)
            return entry

        return self._run(tx_grant)

    def daily_allowance(self, account: str, *, day: dt.date | None = None) -> LedgerEntry | None:
        """Grant the free daily buzz from `promo`, once per user per UTC day.

        Returns the entry this call created, or None when that day's allowance was already given
        (or the allowance is configured to 0).
        """
        account = check_user_account(account)
        amount = self.config.daily_allowance
        if day is None:
            day = utcnow().date()
        elif not isinstance(day, dt.date) or isinstance(day, dt.datetime):
            raise InvalidRequest("day must be a date", code="invalid_day")
        if amount == 0:
            return None
        key = f"daily_allowance:{account}:{day.isoformat()}"
        request = self._request(account=account, day=day.isoformat())

        def tx_allowance(tx: _Tx) -> LedgerEntry | None:
            if self._recall(tx, key, "daily_allowance", request) is not None:
                return None
            now = utcnow()
            entry = self._credit_user(
                tx, PROMO, account, amount, key, "daily_allowance", f"daily allowance {day.isoformat()}", now
            )
            self._remember(tx, key, "daily_allowance", request, entry.to_dict(), now)
            return entry

        return self._run(tx_allowance)

    # -- two-phase transfers ----------------------------------------------------------------

    def hold(
        self,
        account: str,
        amount: int,
        key: str,
        *,
        destination: str,
        expires_at: dt.datetime | None = None,
        reason: str = "",
    ) -> HoldInfo:
        """Reserve `amount` of the user's available buzz for `destination` until `expires_at`.

        Raises InsufficientBuzz (402, `insufficient_funds`) when the available balance is short.
        """
        account = check_user_account(account)
        destination = check_account(destination)
        if destination == account:
            raise InvalidAccount("a hold cannot pay its own account", code="same_account")
        amount = check_amount(amount, self.config.max_amount)
        key = check_key(key)
        reason = _check_reason(reason)
        if expires_at is not None and not isinstance(expires_at, dt.datetime):
            raise InvalidRequest("expires_at must be a datetime", code="invalid_expiry")
        request = self._request(account=account, destination=destination, amount=amount)
        fresh: list[bool] = []

        def tx_hold(tx: _Tx) -> HoldInfo:
            fresh.clear()
            now = utcnow()
            expires = now + dt.timedelta(seconds=self.config.default_hold_ttl_s) if expires_at is None else _utc(expires_at)
            if not now < expires <= now + dt.timedelta(seconds=self.config.max_hold_ttl_s):
                prior = self._recall(tx, key, "hold", request)
                if prior is not None:
                    return HoldInfo.from_dict(prior)
                raise InvalidRequest(
                    f"expires_at must be in the future and within {self.config.max_hold_ttl_s} s",
                    code="invalid_expiry",
                )
            if not is_system_account(destination):
                self._insert_account(tx, destination, now)
            if tx.run("reserve_new", {"account": account, "amount": amount, "key": key}).rowcount != 1:
                prior = self._recall(tx, key, "hold", request)
                if prior is not None:
                    return HoldInfo.from_dict(prior)
                row = tx.run("balance", {"account": account}).fetchone()
                available = row[0] - row[1] if row else 0
                raise InsufficientBuzz(
                    f"{account} has {available} buzz available, {amount} needed",
                    details={"account": account, "available": available, "needed": amount},
                )
            hold = HoldInfo(
                id=uuid.uuid4().hex, account=account, destination=destination, amount=amount, captured=0,
                status="open", expires_at=expires, key=key, reason=reason, created_at=now,
            )
            tx.write(
                "insert_hold",
                {"id": hold.id, "account": account, "destination": destination, "amount": amount, "key": key,
                 "reason": reason, "expires_at": tx.ts(expires), "now": tx.ts(now)},
            )
            self._remember(tx, key, "hold", request, hold.to_dict(), now)
            fresh.append(True)
            return hold

        hold = self._run(tx_hold)
        if fresh:
            metrics.inc("genserve_buzz_total", amount, operation="held", destination=destination)
        return hold

    def capture(self, hold_id: str, amount: int, key: str) -> HoldInfo:
        """Post `amount` (<= the hold) to the hold's destination and void the rest; 0 is a release."""
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        amount = check_amount(amount, self.config.max_amount, allow_zero=True)
        key = check_key(key)
        request = self._request(hold_id=hold_id, amount=amount)
        fresh: list[bool] = []

        def tx_capture(tx: _Tx) -> HoldInfo:
            fresh.clear()
            hold = self._locked_open_hold(tx, hold_id, key, "capture", request)
            if isinstance(hold, dict):
                return HoldInfo.from_dict(hold)
            now = utcnow()
            if now >= hold.expires_at:
                raise HoldClosed(
                    f"hold {hold_id} expired at {hold.expires_at.isoformat()}; its buzz goes back to the user",
                    code="hold_expired",
                    details={"hold": hold.to_dict()},
                )
            if amount > hold.amount:
                raise CaptureExceedsHold(
                    f"capture of {amount} exceeds hold {hold_id} of {hold.amount}",
                    details={"hold_id": hold_id, "held": hold.amount, "requested": amount},
                )
            done = self._close(tx, hold, amount, now)
            self._remember(tx, key, "capture", request, done.to_dict(), now)
            fresh.append(True)
            return done

        done = self._run(tx_capture)
        if fresh:
            _record_close(done)
        return done

    def release(self, hold_id: str, key: str) -> HoldInfo:
        """Void an open hold (also allowed past its expiry time, before the reaper gets to it)."""
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        key = check_key(key)
        request = self._request(hold_id=hold_id)
        fresh: list[bool] = []

        def tx_release(tx: _Tx) -> HoldInfo:
            fresh.clear()
            hold = self._locked_open_hold(tx, hold_id, key, "release", request)
            if isinstance(hold, dict):
                return HoldInfo.from_dict(hold)
            now = utcnow()
            done = self._close(tx, hold, 0, now)
            self._remember(tx, key, "release", request, done.to_dict(), now)
            fresh.append(True)
            return done

        done = self._run(tx_release)
        if fresh:
            _record_close(done)
        return done

    def get_hold(self, hold_id: str) -> HoldInfo:
        if not isinstance(hold_id, str):
            raise HoldNotFound(f"no hold {hold_id!r}")
        if not self._system_ready:
            self._create_system_accounts()
        rows = self._read("get_hold", {"id": hold_id})
        if not rows:
            raise HoldNotFound(f"no hold {hold_id!r}")
        return self._hold_from_row(rows[0])

    def reap_expired(self, now: dt.datetime | None = None, *, batch: int = 500) -> int:
        """Void every open hold whose expiry has passed; returns how many. Safe to run anywhere, any time."""
        now = _utc(now) if now is not None else utcnow()

        def tx_reap(tx: _Tx) -> int:
            rows = tx.run("expired_holds", {"now": tx.ts(now), "batch": batch}).fetchall()
            per_account: dict[str, int] = {}
            for _hold_id, account, amount in rows:
                per_account[account] = per_account.get(account, 0) + amount
            self._move(tx, {account: (0, -held) for account, held in per_account.items()})
            if rows:
                for r in rows:
                    tx.write("expire_hold", {"id": r[0], "now": tx.ts(now)})
            return len(rows)

        total = 0
        while True:
            n = self._run(tx_reap)
            total += n
            if n < batch:
                return total

    # -- reconciliation ---------------------------------------------------------------------

    def verify(self, now: dt.datetime | None = None) -> VerifyReport:
        """Check the ledger's invariants from the raw tables; never changes anything."""
        now = _utc(now) if now is not None else utcnow()
        problems: list[str] = []
        e, a, h, sh = entries_t.c, accounts_t.c, holds_t.c, shards_t.c
        with self.db.engine.connect() as conn:
            total = conn.execute(select(func.coalesce(func.sum(e.amount), 0))).scalar_one()
            if total != 0:
                problems.append(f"entries sum to {total}, not 0")
            unbalanced = conn.execute(
                select(e.transfer_id, func.sum(e.amount))
                .group_by(e.transfer_id)
                .having(func.sum(e.amount) != 0)
                .limit(20)
            ).all()
            problems += [f"transfer {t} is unbalanced by {s}" for t, s in unbalanced]

            entry_sums = select(e.account_id, func.sum(e.amount).label("s")).group_by(e.account_id).subquery()
            open_held = (
                select(h.account_id, func.sum(h.amount).label("s"))
                .where(h.status == "open")
                .group_by(h.account_id)
                .subquery()
            )
            shard_sums = (
                select(sh.account_id, func.sum(sh.posted).label("s")).group_by(sh.account_id).subquery()
            )
            accounts = conn.execute(
                select(
                    a.id,
                    a.kind,
                    a.posted + func.coalesce(shard_sums.c.s, 0),
                    a.held,
                    func.coalesce(entry_sums.c.s, 0),
                    func.coalesce(open_held.c.s, 0),
                )
                .outerjoin(shard_sums, shard_sums.c.account_id == a.id)
                .outerjoin(entry_sums, entry_sums.c.account_id == a.id)
                .outerjoin(open_held, open_held.c.account_id == a.id)
            ).all()
            for account, kind, posted, held, entry_sum, held_sum in accounts:
                if posted != entry_sum:
                    problems.append(f"{account}: posted balance {posted} != sum of its entries {entry_sum}")
                if held != held_sum:
                    problems.append(f"{account}: held {held} != sum of its open holds {held_sum}")
                if held < 0:
                    problems.append(f"{account}: held is negative ({held})")
                if kind == "user" and (posted < 0 or posted - held < 0):
                    problems.append(f"{account}: negative user balance (posted {posted}, held {held})")

            over = conn.execute(select(h.id, h.amount, h.captured).where(h.captured > h.amount).limit(20)).all()
            problems += [f"hold {i} captured {c} beyond its amount {amt}" for i, amt, c in over]
            posted_by_hold = func.coalesce(func.sum(e.amount), 0)
            mismatched = conn.execute(
                select(h.id, h.status, h.captured, posted_by_hold)
                .outerjoin(entries_t, (e.hold_id == h.id) & (e.account_id == h.destination_id))
                .group_by(h.id, h.status, h.captured)
                .having(posted_by_hold != h.captured)
                .limit(20)
            ).all()
            problems += [f"hold {i} ({s}) records {c} captured but its entries post {p}" for i, s, c, p in mismatched]
            grace = now - dt.timedelta(seconds=self.config.expired_hold_grace_s)
            stale = conn.execute(
                select(h.id, h.expires_at).where(h.status == "open", h.expires_at < grace).limit(20)
            ).all()
            problems += [f"hold {i} is open past its expiry {_iso(_utc(x))} (run the reaper)" for i, x in stale]

            stats = {
                "accounts": len(accounts),
                "entries": conn.execute(select(func.count()).select_from(entries_t)).scalar_one(),
                "holds_open": conn.execute(select(func.count()).where(h.status == "open")).scalar_one(),
                "holds_total": conn.execute(select(func.count()).select_from(holds_t)).scalar_one(),
            }
        return VerifyReport(ok=not problems, problems=problems, stats=stats)


def _record_close(hold: HoldInfo) -> None:
    """Metrics for a hold this call closed: what was posted and what went back to the user."""
    metrics.inc("genserve_buzz_total", hold.captured, operation="captured", destination=hold.destination)
    metrics.inc("genserve_buzz_total", hold.amount - hold.captured, operation="released", destination=hold.destination)
