"""Alembic migrations on SQLite and PostgreSQL: up, down, up again, and in step with the models."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

from genserve.core.db import Database, alembic_config, all_metadata, current_revision, downgrade, migrate


def revisions_in_order() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [s.revision for s in reversed(list(script.walk_revisions("base", "heads")))]


HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def schema_diffs(engine: Engine) -> list[Any]:
    """What autogenerate would still emit: empty when the migrations build exactly the models."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, all_metadata())


def describe(diffs: list[Any]) -> str:
    """One line per difference, e.g. `add_table trainings` or `modify_nullable jobs status`."""
    lines = []
    for diff in diffs:
        for op in diff if isinstance(diff, list) else [diff]:
            names = [getattr(x, "name", x) for x in op[1:] if isinstance(x, str) or hasattr(x, "name")]
            lines.append(" ".join([op[0], *map(str, names)]))
    return "migrations and models differ (write the migration):\n  " + "\n  ".join(lines)


def schema_snapshot(engine: Engine) -> dict[str, Any]:
    """Tables, columns, keys, indexes and constraints, plus what the inspector does not show
    (SQLite triggers; PostgreSQL enum types, functions, sequences and triggers). Alembic's own
    version table is left out: it exists from the first upgrade on."""
    insp = inspect(engine)
    snap: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        snap[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table).get("constrained_columns"),
            "fks": sorted((fk["name"] or "", tuple(fk["constrained_columns"])) for fk in insp.get_foreign_keys(table)),
            "indexes": sorted((i["name"] or "", tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)),
            "uniques": sorted((u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(table)),
            "checks": sorted(c["name"] or c["sqltext"] for c in insp.get_check_constraints(table)),
        }
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            snap["_sqlite_master"] = sorted(
                tuple(r) for r in conn.execute(text("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND tbl_name <> 'alembic_version'"))
            )
        else:
            snap["_pg_objects"] = sorted(tuple(r) for r in conn.execute(text(PG_OBJECTS)))
    return snap


PG_OBJECTS = """
SELECT 'type', t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
  WHERE n.nspname = 'public' AND t.typtype = 'e'
UNION ALL SELECT 'function', p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = 'public'
UNION ALL SELECT 'sequence', sequence_name FROM information_schema.sequences WHERE sequence_schema = 'public'
UNION ALL SELECT 'trigger', tgname FROM pg_trigger WHERE NOT tgisinternal
"""


def leftovers(engine: Engine) -> list[Any]:
    """Everything in the schema except Alembic's own version table."""
    snap = schema_snapshot(engine)
    return [t for t in snap if not t.startswith("_")] + snap.get("_sqlite_master", []) + snap.get("_pg_objects", [])


def check_up_down_up(engine: Engine) -> None:
    migrate(engine, "head")
    assert current_revision(engine) == HEAD
    at_head = schema_snapshot(engine)

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert leftovers(engine) == []

    migrate(engine, "head")
    assert current_revision(engine) == HEAD
    assert schema_snapshot(engine) == at_head


def check_each_downgrade_undoes_its_upgrade(engine: Engine) -> None:
    revisions = revisions_in_order()
    before: dict[str, Any] = {}
    previous = "base"
    for rev in revisions:
        before[rev] = (previous, schema_snapshot(engine))
        migrate(engine, rev)
        previous = rev
    for rev in reversed(revisions):
        target, expected = before[rev]
        downgrade(engine, target)
        assert schema_snapshot(engine) == expected, f"downgrade of {rev} does not restore the schema before it"


def test_revision_chain_is_linear():
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert revisions_in_order()[:5] == ["0001_resources", "0002_ledger", "0003_safety", "0004_jobs", "0005_trainings"]


def test_sqlite_migrations_match_models(db):
    diffs = schema_diffs(db.engine)
    assert diffs == [], describe(diffs)


@pytest.mark.postgres
def test_postgres_migrations_match_models(pg_db):
    diffs = schema_diffs(pg_db.engine)
    assert diffs == [], describe(diffs)


def test_sqlite_up_down_up(settings):
    db = Database.from_settings(settings)
    try:
        check_up_down_up(db.engine)
    finally:
        db.dispose()


def test_sqlite_each_downgrade_undoes_its_upgrade(settings):
    db = Database.from_settings(settings)
    try:
        check_each_downgrade_undoes_its_upgrade(db.engine)
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_mode(db, settings):
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == settings.database.sqlite_busy_timeout_ms
    # WAL is a property of the file: a plain connection that sets nothing sees it too.
    path = settings.data_dir / "genserve.db"
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
def test_postgres_up_down_up(postgres_url: str):
    db = Database(postgres_url)
    try:
        check_up_down_up(db.engine)
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_each_downgrade_undoes_its_upgrade(postgres_url: str):
    db = Database(postgres_url)
    try:
        check_each_downgrade_undoes_its_upgrade(db.engine)
    finally:
        db.dispose()


def run_cli_migrate(env: dict[str, str | None]) -> dict[str, Any]:
    from genserve.cli import app

    result = CliRunner().invoke(app, ["migrate", "--json"], env={"GENSERVE_SETTINGS_JSON": None, **env})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cli_migrate_json_on_sqlite(tmp_path):
    data_dir = tmp_path / "data"
    env = {"GENSERVE_DATA_DIR": str(data_dir), "GENSERVE_DATABASE_URL": None}
    out = run_cli_migrate(env)
    assert out["revision"] == HEAD
    assert out["database"] == f"sqlite:///{(data_dir / 'genserve.db').resolve()}"
    with sqlite3.connect(data_dir / "genserve.db") as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"alembic_version", "resources"} <= tables
    assert run_cli_migrate(env)["revision"] == HEAD  # a second run is a no-op


@pytest.mark.postgres
def test_cli_migrate_json_on_postgres(tmp_path, postgres_url: str):
    out = run_cli_migrate({"GENSERVE_DATA_DIR": str(tmp_path / "data"), "GENSERVE_DATABASE_URL": postgres_url})
    assert out["revision"] == HEAD
    assert out["database"].startswith("postgresql")
    db = Database(postgres_url)
    try:
        assert current_revision(db.engine) == HEAD
        assert "resources" in inspect(db.engine).get_table_names()
    finally:
        db.dispose()
