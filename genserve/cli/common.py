"""What every CLI command shares: settings, `--json` output, and errors mapped to exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from genserve.core.config import Settings, load_settings
from genserve.core.errors import ConfigError, GenserveError, SafetyBlocked

EXIT_ERROR = 1
EXIT_REFUSED = 3  # a safety refusal or a blocklist match

console = Console(stderr=True)
JsonOption = typer.Option(False, "--json", help="Machine-readable output")

F = TypeVar("F", bound=Callable[..., Any])


def get_settings(ctx: typer.Context | None = None) -> Settings:
    """The settings for this invocation (the root callback may have set a config dir)."""
    config_dir = None
    if ctx is not None:
        root = ctx.find_root()
        config_dir = (root.obj or {}).get("config_dir")
    return load_settings(config_dir=config_dir)


def open_database(settings: Settings, table: str):  # noqa: ANN201 - Database, imported lazily
    """The configured database, which must already hold `table`: a command run from another folder
    (where `./.genserve` is some other, empty place) refuses instead of creating a new database and
    answering from it. `genserve migrate` (or `genserve serve`) creates and upgrades the schema."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from genserve.core.db import Database

    url = make_url(settings.database_url)
    where = f"GENSERVE_DATA_DIR={settings.data_dir}" if settings.database.url is None else "GENSERVE_DATABASE_URL"
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        from pathlib import Path

        if not Path(url.database).exists():
            raise ConfigError(
                f"no database at {url.database} ({where}); run this command from the folder that holds the "
                "service's .genserve, set GENSERVE_DATA_DIR or GENSERVE_DATABASE_URL, or create it with `genserve migrate`",
                code="database_missing", details={"database": url.database})
    db = Database.from_settings(settings)
    try:
        present = inspect(db.engine).has_table(table)
    except Exception:
        db.dispose()
        raise
    if not present:
        db.dispose()
        raise ConfigError(f"the database ({where}) has no schema yet; run `genserve migrate` first",
                          code="database_not_migrated",
                          details={"database": db.engine.url.render_as_string(hide_password=True)})
    return db


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print `data` as one JSON document, or `human` text when not in JSON mode."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, sort_keys=True) + "\n")
    else:
        typer.echo(human if human is not None else json.dumps(data, default=str, indent=2))


def exit_code_for(exc: GenserveError) -> int:
    return EXIT_REFUSED if isinstance(exc, SafetyBlocked) or exc.code.startswith("likeness") else EXIT_ERROR


def handle_errors(fn: F) -> F:
    """Turn a GenserveError into its JSON/text form and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GenserveError as exc:
            if kwargs.get("as_json"):
                sys.stdout.write(json.dumps({"error": exc.to_dict()}, default=str) + "\n")
            else:
                console.print(f"[red]error[/red] {exc.code}: {exc.message}")
            raise typer.Exit(exit_code_for(exc)) from None

    return wrapper  # type: ignore[return-value]
