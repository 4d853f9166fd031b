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
from genserve.core.errors import GenserveError, SafetyBlocked

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
