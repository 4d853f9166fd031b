"""Ledger throughput: hold -> capture cycles per second, each capture paying three parties
(the platform, a resource owner's licence fee and a creator tip).

SQLite: one process on a fresh file. PostgreSQL: 8 worker processes on a fresh database, each
with its own user account, all capturing into the same (hot) revenue account. The PostgreSQL
part is skipped with a message when the server is unreachable.

    .venv/bin/python bench/ledger.py [--cycles N] [--pg-url URL] [--pg-workers 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where other scripts' names (safety.py)
# would shadow the project's packages: import the project from the repository root instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
sys.path.insert(1, str(_ROOT / "tests"))  # the load generator the ledger tests share

from ledger_loadgen import hold_capture_cycles  # noqa: E402

from genserve.billing.ledger import Ledger  # noqa: E402
from genserve.core.db import Database  # noqa: E402

DEFAULT_PG = os.environ.get("GENSERVE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def bench_sqlite(cycles: int) -> tuple[float, float]:
    """(cycles per second, client CPU milliseconds per cycle)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        db = Database(url)
        db.migrate()
        Ledger(db).grant("user:bench", 10**9, "seed")
        db.dispose()
        hold_capture_cycles(url, "user:bench", 500, "warm")  # as the PostgreSQL workers are warmed
        seconds, cpu = hold_capture_cycles(url, "user:bench", cycles, "sqlite")
        verify = Ledger(Database(url)).verify()
        assert verify.ok, verify.problems
    return cycles / seconds, cpu / cycles * 1000


def _pg_database(server_url: str) -> tuple[str, str] | None:
    from sqlalchemy import create_engine, text

    name = f"gs_bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(server_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "no PostgreSQL here"
        print(f"PostgreSQL unreachable at {server_url} ({type(exc).__name__}); skipping the PostgreSQL part")
        return None
    return server_url.rsplit("/", 1)[0] + "/" + name, name


def _drop_pg_database(server_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def bench_postgres(server_url: str, cycles_per_worker: int, workers: int) -> tuple[float, float] | None:
    """(cycles per second over all workers, client CPU milliseconds per cycle), or None without a server."""
    made = _pg_database(server_url)
    if made is None:
        return None
    url, name = made
    try:
        db = Database(url)
        db.migrate()
        ledger = Ledger(db)
        accounts = [f"user:bench{i}" for i in range(workers)]
        for account in accounts:
            ledger.grant(account, 10**9, f"seed-{account}")
        db.dispose()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            # Warm the workers (imports, connections) before the timed run.
            pool.starmap(hold_capture_cycles, [(url, a, 20, f"warm-{a}") for a in accounts], chunksize=1)
            start = time.perf_counter()
            runs = pool.starmap(
                hold_capture_cycles, [(url, a, cycles_per_worker, f"run-{a}") for a in accounts], chunksize=1
            )
            seconds = time.perf_counter() - start
        ledger = Ledger(Database(url))
        verify = ledger.verify()
        ledger.close()
        assert verify.ok, verify.problems
        total = cycles_per_worker * workers
        return total / seconds, sum(cpu for _, cpu in runs) / total * 1000
    finally:
        _drop_pg_database(server_url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=4000, help="SQLite cycles (one process)")
    parser.add_argument("--pg-cycles", type=int, default=600, help="PostgreSQL cycles per worker")
    parser.add_argument("--pg-workers", type=int, default=8)
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server URL (a scratch database is made)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    sqlite_rate, sqlite_cpu = bench_sqlite(args.cycles)
    print(
        f"SQLite: {sqlite_rate:,.0f} hold->capture cycles/s (1 process, {args.cycles} cycles), "
        f"client CPU {sqlite_cpu:.2f} ms/cycle"
    )
    pg = bench_postgres(args.pg_url, args.pg_cycles, args.pg_workers)
    if pg is not None:
        print(
            f"PostgreSQL: {pg[0]:,.0f} hold->capture cycles/s ({args.pg_workers} processes x {args.pg_cycles} "
            f"cycles, one shared revenue account), client CPU {pg[1]:.2f} ms/cycle"
        )
    load_after = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores; 1-minute load average {load_before:.1f} before, {load_after:.1f} after")
    print(
        json.dumps(
            {
                "sqlite_cycles_per_s": round(sqlite_rate, 1),
                "sqlite_client_cpu_ms": round(sqlite_cpu, 3),
                "postgres_cycles_per_s": None if pg is None else round(pg[0], 1),
                "postgres_client_cpu_ms": None if pg is None else round(pg[1], 3),
                "postgres_workers": args.pg_workers,
                "cpu_count": os.cpu_count(),
                "load_avg_1m_before": round(load_before, 2),
                "load_avg_1m_after": round(load_after, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
