"""`genserve tiny-models`: build the offline tiny SD1/SDXL models and their safety embeddings."""

from __future__ import annotations

from pathlib import Path

import typer

from genserve.cli.common import JsonOption, emit, get_settings, handle_errors


def register(app: typer.Typer) -> None:
    app.command("tiny-models")(tiny_models)


@handle_errors
def tiny_models(
    ctx: typer.Context,
    out: Path | None = typer.Option(None, "--out", help="Models dir (default: the settings' models dir)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights; same seed, same files"),
    force: bool = typer.Option(False, "--force", help="Rebuild even when an identical build exists"),
    as_json: bool = JsonOption,
) -> None:
    """Build tiny random-weight SD1 and SDXL models (diffusers folder, single file, safety embeddings)."""
    from genserve.tinymodels import build_tiny_models

    models_dir = out if out is not None else get_settings(ctx).models_dir
    models = build_tiny_models(models_dir, seed=seed, force=force)
    data = {
        "models_dir": str(Path(models_dir).resolve()),
        "seed": seed,
        "models": {
            family: {
                "root": str(m.root),
                "diffusers_dir": str(m.diffusers_dir),
                "single_file": str(m.single_file),
                "config_dir": str(m.config_dir),
                "embeddings": {kind: str(p) for kind, p in m.embeddings.items()},
            }
            for family, m in models.items()
        },
    }
    lines = [f"tiny models (seed {seed}) in {data['models_dir']}"]
    for family, m in data["models"].items():
        lines += [
            f"  {family}: {m['diffusers_dir']}",
            f"  {family}: {m['single_file']} (config {m['config_dir']})",
        ]
        lines += [f"  {family}: {kind} embedding {p}" for kind, p in m["embeddings"].items()]
    emit(data, as_json, "\n".join(lines))
