"""The `genserve` command line. Each command group lives in its own module and is added here."""

from __future__ import annotations

from pathlib import Path

import typer

from genserve.cli.common import JsonOption, emit, get_settings, handle_errors

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Stable Diffusion generation and LoRA training service.")


@app.callback()
def _root(
    ctx: typer.Context,
    config_dir: Path | None = typer.Option(None, "--config-dir", envvar="GENSERVE_CONFIG_DIR", help="Folder holding genserve.yaml"),
) -> None:
    ctx.obj = {"config_dir": config_dir}


@app.command()
@handle_errors
def migrate(ctx: typer.Context, revision: str = typer.Argument("head"), as_json: bool = JsonOption) -> None:
    """Upgrade the database schema (SQLite or PostgreSQL) to REVISION."""
    from genserve.core.db import Database, current_revision

    settings = get_settings(ctx)
    db = Database.from_settings(settings)
    db.migrate(revision)
    rev = current_revision(db.engine)
    emit({"revision": rev, "database": db.engine.url.render_as_string(hide_password=True)}, as_json, f"schema at {rev}")


def _register_groups() -> None:
    """Command groups live in their own modules (kept out of this file so each stays small)."""
    from genserve.cli import audit_prompt, buzz, generate, models, resources, safety, serve, train

    for group in (models, serve, buzz, safety, audit_prompt, generate, train, resources):
        group.register(app)


_register_groups()


def main() -> None:
    app()
