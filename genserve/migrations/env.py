"""Alembic environment: runs against the engine handed in by `genserve.core.db.migrate`, or the URL in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from genserve.core.db import all_metadata

config = context.config
target_metadata = all_metadata()


def run_migrations_online() -> None:
    engine = config.attributes.get("connection_engine") or create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
