"""Database base: engines, sessions and migrations for SQLite (embedded) and PostgreSQL (at scale).

SQLite runs in WAL mode with a busy timeout, and every transaction starts with
`BEGIN IMMEDIATE`: a writer takes the lock up front instead of failing on a lock upgrade
half-way through, which is what keeps the ledger correct under many threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from safety.db import NAMING_CONVENTION

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Modules whose tables belong to the schema; imported before create_all / autogenerate.
MODEL_MODULES = (
    "genserve.resources.models",
    "genserve.billing.models",
    "safety.store",
    "genserve.generation.jobs",
    "training.table",
    "genserve.economy.models",
)


def all_metadata() -> list[MetaData]:
    """Every MetaData in the schema (genserve's and safety's own)."""
    import importlib

    for name in MODEL_MODULES:
        importlib.import_module(name)
    from safety.db import SafetyBase

    return [Base.metadata, SafetyBase.metadata]


def make_engine(url: str, *, echo: bool = False, busy_timeout_ms: int = 30_000, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False, "isolation_level": None},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            # Checkpoint every 16 MB of WAL rather than SQLite's 4 MB: each checkpoint syncs the
            # database file inside some writer's commit, and the ledger commits thousands a second.
            cur.execute("PRAGMA wal_autocheckpoint=4000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


class ThreadConnections:
    """One DBAPI connection per thread, kept open: for hot paths (the SQLite ledger) where a pool
    checkout and return costs as much as the transaction's statements. They come out of the
    engine's pool (detached from it), so they carry its pragmas.

    `acquire` returns (connection, handle); `release(handle)` after use, `discard(handle)` when
    the connection broke."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list = []

    def acquire(self) -> tuple:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            pooled = self.engine.raw_connection()
            pooled.detach()
            conn = self._local.conn = pooled.dbapi_connection
            with self._lock:
                self._open.append(conn)
        return conn, conn

    @staticmethod
    def release(handle) -> None:  # noqa: ANN001 - the connection stays with its thread
        pass

    def discard(self, conn) -> None:  # noqa: ANN001
        self._local.conn = None
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close every thread's connection; a later `acquire` opens a new one."""
        with self._lock:
            conns, self._open = self._open, []
            self._local = threading.local()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


class Database:
    """An engine plus its session factory; one per process, passed down explicitly."""

    def __init__(self, url: str, **engine_kw):
        self.url = url
        self.engine = make_engine(url, **engine_kw)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.thread_connections = ThreadConnections(self.engine)

    @classmethod
    def from_settings(cls, settings) -> Database:  # noqa: ANN001 - Settings, avoiding an import cycle
        db = settings.database
        return cls(settings.database_url, echo=db.echo, busy_timeout_ms=db.sqlite_busy_timeout_ms, pool_size=db.pool_size)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def session(self) -> Session:
        return self._sessions()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    def migrate(self, revision: str = "head") -> None:
        migrate(self.engine, revision)

    def dispose(self) -> None:
        self.thread_connections.close()
        self.engine.dispose()


def alembic_config(engine: Engine | None = None):  # noqa: ANN201
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["connection_engine"] = engine
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (Alembic)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
