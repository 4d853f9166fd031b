"""`genserve resources add|list|show|download|disable|enable`: client calls to the running service's
resource API (`disable`/`enable` and `list --all` with the admin token from the settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from genserve.cli.common import JsonOption, emit, get_settings, handle_errors

resources_app = typer.Typer(no_args_is_help=True,
                            help="User resources (LoRAs, embeddings, VAEs, checkpoints): register, discover, disable.")

UserOption = typer.Option(None, "--user", help="User id (default: the settings' demo user)")
UrlOption = typer.Option(None, "--url", envvar="GENSERVE_URL", help="Service URL (default: http://<server.host>:<server.port>)")


def register(app: typer.Typer) -> None:
    app.add_typer(resources_app, name="resources")


def _url(settings: Any, url: str | None) -> str:
    return url or f"http://{settings.server.host}:{settings.server.port}"


def _client(ctx: typer.Context, user: str | None, url: str | None):  # noqa: ANN202 - ResourcesClient
    from genserve.resources.client import ResourcesClient

    settings = get_settings(ctx)
    return ResourcesClient(_url(settings, url), settings.auth.service_token.get_secret_value(),
                           user or settings.generation.demo_user, timeout_s=600.0)


def _admin(ctx: typer.Context, url: str | None):  # noqa: ANN202 - ResourcesAdminClient
    from genserve.resources.client import ResourcesAdminClient

    settings = get_settings(ctx)
    return ResourcesAdminClient(_url(settings, url), settings.auth.admin_token.get_secret_value())


def _line(r: dict[str, Any]) -> str:
    flags = ",".join(k for k, v in r["flags"].items() if v) or "-"
    state = "" if r["enabled"] else " DISABLED"
    return (f"{r['id']}  {r['kind']}/{r['type']}  {r['family']}  {r['visibility']}  {r['name']}  "
            f"AutoV2 {r['hashes']['autov2']}  flags {flags}{state}" + (f"  {r['air']}" if r.get("air") else ""))


@resources_app.command("add")
@handle_errors
def add(
    ctx: typer.Context,
    file: Path | None = typer.Argument(None, help="A .safetensors file (LoRA, embedding, VAE or single-file checkpoint)"),
    key: str | None = typer.Option(None, "--key", help="Register an object already staged under uploads/<user>/"),
    kind: str | None = typer.Option(None, "--kind", help="checkpoint | lora | embedding | vae (default: detected)"),
    family: str | None = typer.Option(None, "--family", help="sd1 | sdxl (default: detected from the keys)"),
    name: str | None = typer.Option(None, "--name"),
    public: bool = typer.Option(False, "--public", help="Visible to every user (default: private)"),
    minor: bool = typer.Option(False, "--minor"),
    poi: bool = typer.Option(False, "--poi", help="Depicts a real person"),
    nsfw: bool = typer.Option(False, "--nsfw"),
    sfw_only: bool = typer.Option(False, "--sfw-only"),
    air: str | None = typer.Option(None, "--air", help="AIR alias, urn:air:<family>:<kind>:<source>:<id>@<version>"),
    trigger: list[str] = typer.Option([], "--trigger", help="Trigger word (repeatable)"),
    token: str | None = typer.Option(None, "--token", help="An embedding's prompt token"),
    user: str | None = UserOption,
    url: str | None = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Register FILE (or a staged --key) as a resource of the user; refused files are never stored."""
    if (file is None) == (key is None):
        raise typer.BadParameter("give a FILE or --key")
    with _client(ctx, user, url) as client:
        r = client.register(file, key=key, kind=kind, family=family, name=name,
                            visibility="public" if public else None, minor=minor, poi=poi, nsfw=nsfw,
                            sfw_only=sfw_only, air=air, trigger_words=list(trigger), token=token)
    emit(r, as_json, f"registered {_line(r)}\n  sha256 {r['hashes']['sha256']}")


@resources_app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    kind: str | None = typer.Option(None, "--kind"),
    family: str | None = typer.Option(None, "--family"),
    owner: str | None = typer.Option(None, "--owner", help="A user id, or `me`"),
    visibility: str | None = typer.Option(None, "--visibility", help="private | public"),
    all_: bool = typer.Option(False, "--all", help="Every resource (admin token)"),
    user: str | None = UserOption,
    url: str | None = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Resources the user may use (public and their own), or every one with --all."""
    filters = {"kind": kind, "family": family, "owner": owner, "visibility": visibility, "limit": 500}
    if all_:
        with _admin(ctx, url) as admin:
            page = admin.list(**filters)
    else:
        with _client(ctx, user, url) as client:
            page = client.list(**filters)
    emit(page, as_json, "\n".join(_line(r) for r in page["resources"]) or "no resources")


@resources_app.command("show")
@handle_errors
def show(ctx: typer.Context, resource_id: str = typer.Argument(..., metavar="ID", help="Id or AIR alias"),
         user: str | None = UserOption, url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """One resource as the user sees it."""
    with _client(ctx, user, url) as client:
        r = client.get(resource_id)
    emit(r, as_json, _line(r) + f"\n  sha256 {r['hashes']['sha256']}  AutoV3 {r['hashes']['autov3']}  "
                               f"{r['size_bytes']} bytes  owner {r['owner']}")


@resources_app.command("download")
@handle_errors
def download(ctx: typer.Context, resource_id: str = typer.Argument(..., metavar="ID", help="Id or AIR alias"),
             out: Path = typer.Option(Path("."), "--out", help="A file, or a folder for the server's name"),
             user: str | None = UserOption, url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """Save a resource's file (refused during early access until the user unlocked it)."""
    with _client(ctx, user, url) as client:
        r = client.download(resource_id, out)
    emit(r, as_json, f"saved {r['path']}  {r['bytes']} bytes  sha256 {r['sha256']}")


@resources_app.command("disable")
@handle_errors
def disable(ctx: typer.Context, resource_id: str = typer.Argument(..., metavar="ID"),
            reason: str = typer.Option(..., "--reason"), moderator: str = typer.Option("cli", "--moderator"),
            url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """Turn a resource off for generation on every replica (admin token)."""
    with _admin(ctx, url) as admin:
        r = admin.disable(resource_id, moderator, reason)
    emit(r, as_json, f"disabled {_line(r)}")


@resources_app.command("enable")
@handle_errors
def enable(ctx: typer.Context, resource_id: str = typer.Argument(..., metavar="ID"),
           moderator: str = typer.Option("cli", "--moderator"), url: str | None = UrlOption,
           as_json: bool = JsonOption) -> None:
    """Turn a disabled resource back on (admin token)."""
    with _admin(ctx, url) as admin:
        r = admin.enable(resource_id, moderator)
    emit(r, as_json, f"enabled {_line(r)}")
