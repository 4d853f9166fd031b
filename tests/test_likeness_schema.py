"""Migration 0003 creates exactly the tables `safety.store` declares (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from genserve.core.db import all_metadata


def _safety_diffs(database) -> list:
    merged = sa.MetaData()
    for md in all_metadata():
        for table in md.tables.values():
            table.to_metadata(merged)
    with database.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(ctx, merged) if "safety_" in str(d)]


@pytest.mark.parametrize("which", ["db", pytest.param("pg_db", marks=pytest.mark.postgres)])
def test_migration_matches_models(request, which):
    assert _safety_diffs(request.getfixturevalue(which)) == []


def test_downgrade_removes_safety_tables(db):
    from genserve.core.db import downgrade

    downgrade(db.engine, "0002_ledger")
    assert not [t for t in sa.inspect(db.engine).get_table_names() if t.startswith("safety_")]
    db.migrate()
    assert {"safety_audit_log", "safety_likeness_entries", "safety_person_names", "safety_takedowns"} <= set(
        sa.inspect(db.engine).get_table_names())
