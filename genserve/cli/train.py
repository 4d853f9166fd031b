"""`genserve train submit|status|cancel|download`: LoRA training through the local service's HTTP API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from genserve.cli.common import JsonOption, console, emit, get_settings, handle_errors
from genserve.core.errors import GenserveError

TERMINAL = {"succeeded", "failed", "canceled", "denied"}

UserOption = typer.Option(None, "--user", help="User id (default: the settings' demo user)")
UrlOption = typer.Option(None, "--url", envvar="GENSERVE_URL", help="Service URL (default: http://<server.host>:<server.port>)")


def _client(ctx: typer.Context, user: str | None, url: str | None):  # noqa: ANN202 - TrainingClient
    from training.client import TrainingClient

    settings = get_settings(ctx)
    base = url or f"http://{settings.server.host}:{settings.server.port}"
    return TrainingClient(base, settings.auth.service_token.get_secret_value(), user or settings.generation.demo_user)


def _params(pairs: list[str], named: dict[str, Any]) -> dict[str, Any]:
    """Named options plus `--param KEY=VALUE` (values parsed as JSON when they are JSON)."""
    import json

    out = {k: v for k, v in named.items() if v is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GenserveError(f"--param wants KEY=VALUE, got {pair!r}", code="invalid_training_params")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _caption_edits(path: Path) -> dict[str, str]:
    """`train captions --json` output (or a plain {name: caption} object) -> {name: caption}."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "images" in data:
        return {i["name"]: i["caption"] for i in data["images"]}
    return {str(k): str(v) for k, v in data.items()}


def _summary(view: dict[str, Any]) -> str:
    p = view["progress"]
    line = f"training {view['id']}: {view['status']} — step {p['step']}/{p['total_steps']}, epoch {p['epoch']}/{p['epochs']}"
    if p.get("loss") is not None:
        line += f", loss {p['loss']:.4f}"
    if view.get("resource_id"):
        line += f"\nLoRA resource: {view['resource_id']} (sha256 {view.get('output_sha256')})"
    if view.get("charged") is not None:
        line += f"\ncharged {view['charged']} of {view['quote_total']} buzz held"
    if view.get("error"):
        line += f"\nerror {view['error']['code']}: {view['error']['message']}"
    if view["safety"].get("rules"):
        line += f"\nsafety: {view['safety']['action']} ({', '.join(view['safety']['rules'])})"
    return line


def _wait(client, view: dict[str, Any], as_json: bool, poll_s: float) -> dict[str, Any]:  # noqa: ANN001
    """Poll until the job ends, with a progress bar on stderr (none in JSON mode)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=as_json, transient=False) as bar:
        task = bar.add_task(view["status"], total=view["progress"]["total_steps"], loss="-")
        while view["status"] not in TERMINAL:
            time.sleep(poll_s)
            view = client.get(view["id"])
            p = view["progress"]
            loss = f"{p['loss']:.4f}" if p.get("loss") is not None else "-"
            label = "waiting for review" if view["status"] == "review" else view["status"]
            bar.update(task, completed=p["step"], total=p["total_steps"], description=label, loss=loss)
    return view


def register(app: typer.Typer) -> None:
    train = typer.Typer(no_args_is_help=True, help="LoRA training jobs (through the service's HTTP API).")
    app.add_typer(train, name="train")

    @train.command("submit")
    @handle_errors
    def submit(
        ctx: typer.Context,
        dataset: Path = typer.Argument(..., exists=True, readable=True, help="Zip of images (+ .txt/.caption captions)"),
        family: str = typer.Option(..., "--family", help="sd1 | sdxl"),
        name: str = typer.Option("", "--name"),
        trigger: list[str] = typer.Option([], "--trigger", help="Trigger word (repeatable)"),
        real_person: bool = typer.Option(False, "--real-person", help="The subject is a real, identifiable person"),
        person: str = typer.Option("", "--person", help="That person's name"),
        config: Path | None = typer.Option(None, "--config", exists=True, readable=True, dir_okay=False,
                                           help="kohya config TOML (--config_file); options given here win"),
        dataset_config: Path | None = typer.Option(None, "--dataset-config", exists=True, readable=True,
                                                   dir_okay=False, help="kohya dataset TOML"),
        epochs: int | None = typer.Option(None, "--epochs", "--max-train-epochs"),
        repeats: int | None = typer.Option(None, "--repeats"),
        batch_size: int | None = typer.Option(None, "--batch-size"),
        resolution: int | None = typer.Option(None, "--resolution"),
        network_dim: int | None = typer.Option(None, "--dim", "--network-dim"),
        network_alpha: float | None = typer.Option(None, "--alpha", "--network-alpha"),
        unet_lr: float | None = typer.Option(None, "--unet-lr"),
        text_encoder_lr: float | None = typer.Option(None, "--te-lr"),
        optimizer: str | None = typer.Option(None, "--optimizer", "--optimizer-type",
                                             help="adamw | adamw8bit | prodigy | adafactor"),
        lr_scheduler: str | None = typer.Option(
            None, "--scheduler", "--lr-scheduler",
            help="constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial"),
        sample_prompts: Path | None = typer.Option(None, "--sample-prompts", exists=True, readable=True,
                                                   dir_okay=False, help="kohya sample-prompt file"),
        seed: int | None = typer.Option(None, "--seed"),
        param: list[str] = typer.Option([], "--param", help="Any training parameter as KEY=VALUE (repeatable)"),
        auto_caption: bool = typer.Option(False, "--auto-caption", help="Caption images without one (tagger/VLM)"),
        captions: Path | None = typer.Option(None, "--captions", exists=True, readable=True, dir_okay=False,
                                             help="JSON from `train captions` (edited): file name -> caption"),
        wait: bool = typer.Option(False, "--wait", help="Block with a progress bar until the job ends"),
        poll: float = typer.Option(1.0, "--poll", help="Seconds between status polls with --wait"),
        user: str | None = UserOption,
        url: str | None = UrlOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Upload DATASET and train a LoRA on it."""
        params = _params(param, {
            "epochs": epochs, "repeats": repeats, "batch_size": batch_size, "resolution": resolution,
            "network_dim": network_dim, "network_alpha": network_alpha, "unet_lr": unet_lr,
            "text_encoder_lr": text_encoder_lr, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "seed": seed,
        })
        config_text = config.read_text(encoding="utf-8") if config else None
        if config_text and sample_prompts is None and "sample_prompts" not in params:
            from training.kohya_config import sample_prompts_file

            if named := sample_prompts_file(config_text):  # kohya names a file: read it, send the prompts
                sample_prompts = (config.parent / named) if not Path(named).is_absolute() else Path(named)
        if sample_prompts is not None:
            params["sample_prompts"] = sample_prompts.read_text(encoding="utf-8").splitlines()
        with _client(ctx, user, url) as client:
            view = client.submit(dataset, family=family, real_person=real_person, name=name,
                                 trigger_words=list(trigger), person=person, params=params, config=config_text,
                                 dataset_config=dataset_config.read_text(encoding="utf-8") if dataset_config else None,
                                 captions=_caption_edits(captions) if captions else None, auto_caption=auto_caption)
            if not as_json:
                report = view["dataset"]["report"]
                console.print(f"training {view['id']} {view['status']}: {view['dataset']['images']} images kept, "
                              f"{len(report.get('skipped', []))} skipped; {view['quote_total']} buzz held")
            if wait:
                view = _wait(client, view, as_json, poll)
        emit(view, as_json, _summary(view))
        if wait and view["status"] != "succeeded":
            raise typer.Exit(1)

    @train.command("status")
    @handle_errors
    def status(ctx: typer.Context, training_id: str, wait: bool = typer.Option(False, "--wait"),
               poll: float = typer.Option(1.0, "--poll"), user: str | None = UserOption,
               url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
        """Show a training's status and progress."""
        with _client(ctx, user, url) as client:
            view = client.get(training_id)
            if wait:
                view = _wait(client, view, as_json, poll)
        emit(view, as_json, _summary(view))
        if wait and view["status"] != "succeeded":
            raise typer.Exit(1)

    @train.command("cancel")
    @handle_errors
    def cancel(ctx: typer.Context, training_id: str, user: str | None = UserOption, url: str | None = UrlOption,
               as_json: bool = JsonOption) -> None:
        """Cancel a training (a running one stops between two steps and pays for the steps run)."""
        with _client(ctx, user, url) as client:
            view = client.cancel(training_id)
        emit(view, as_json, _summary(view))

    @train.command("download")
    @handle_errors
    def download(ctx: typer.Context, training_id: str, out: Path = typer.Option(..., "--out", help="File to write"),
                 epoch: int | None = typer.Option(None, "--epoch", help="The LoRA as it was after this epoch"),
                 user: str | None = UserOption, url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
        """Save the trained LoRA (.safetensors, kohya format), or one epoch's."""
        with _client(ctx, user, url) as client:
            path = client.download(training_id, out, epoch=epoch)
        emit({"path": str(path), "bytes": path.stat().st_size}, as_json, f"saved {path}")

    @train.command("epochs")
    @handle_errors
    def epochs_(ctx: typer.Context, training_id: str, user: str | None = UserOption, url: str | None = UrlOption,
                as_json: bool = JsonOption) -> None:
        """List the epochs whose LoRA can be downloaded (`train download ID --epoch N`)."""
        with _client(ctx, user, url) as client:
            rows = client.epochs(training_id)
        emit(rows, as_json, "\n".join(f"epoch {r['epoch']}: {r['bytes']} bytes, sha256 {r.get('sha256')}"
                                       for r in rows) or "no epoch LoRA yet")

    @train.command("captions")
    @handle_errors
    def captions_(ctx: typer.Context,
                  dataset: Path = typer.Argument(..., exists=True, readable=True, help="Zip of images"),
                  overwrite: bool = typer.Option(False, "--overwrite", help="Caption every image, not only uncaptioned"),
                  user: str | None = UserOption, url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
        """Propose captions (auto-captioner) to edit, then submit with `--captions FILE`."""
        with _client(ctx, user, url) as client:
            result = client.propose_captions(dataset, overwrite=overwrite)
        emit(result, as_json, "\n".join(f"{i['name']} [{i['source']}]: {i['caption']}" for i in result["images"]))

    @train.command("publish")
    @handle_errors
    def publish_(ctx: typer.Context, training_id: str, epoch: int = typer.Option(..., "--epoch"),
                 user: str | None = UserOption, url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
        """Register one epoch's LoRA as a LoRA resource of its own."""
        with _client(ctx, user, url) as client:
            result = client.publish_epoch(training_id, epoch)
        emit(result, as_json, f"epoch {epoch}: LoRA resource {result['resource_id']} (sha256 {result['sha256']})")
