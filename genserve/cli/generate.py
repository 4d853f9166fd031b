"""`genserve generate` and `genserve jobs`: client calls to the running service (tokens from settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from genserve.cli.common import (
    EXIT_ERROR,
    EXIT_REFUSED,
    JsonOption,
    console,
    emit,
    get_settings,
    handle_errors,
)

jobs_app = typer.Typer(no_args_is_help=True, help="Generation jobs on the running service: status, cancel.")

UserOption = typer.Option(None, "--user", help="User id (default: the settings' demo user)")
UrlOption = typer.Option(None, "--url", envvar="GENSERVE_URL", help="Service URL (default: http://<server.host>:<server.port>)")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.add_typer(jobs_app, name="jobs")


def _client(ctx: typer.Context, user: str | None, url: str | None, **kw: Any):  # noqa: ANN202 - GenserveClient
    from genserve.client import GenserveClient

    return GenserveClient.from_settings(get_settings(ctx), user_id=user, base_url=url, **kw)


def _lora(value: str) -> dict[str, Any]:
    rid, _, strength = value.partition(":")
    try:
        return {"id": rid, "strength": float(strength)} if strength else {"id": rid}
    except ValueError:
        raise typer.BadParameter(f"--lora takes ID or ID:STRENGTH, got {value!r}") from None


def _body(prompt: str | None, **opts: Any) -> dict[str, Any]:
    if opts.get("from_png") is not None:
        return _body_from_image(prompt, **opts)
    if not prompt:
        raise typer.BadParameter("give a PROMPT, or --from-png FILE")
    body: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": opts["negative"], "checkpoint": opts["checkpoint"],
        "resources": [_lora(v) for v in opts["lora"]] + [{"id": e} for e in opts["embedding"]],
        "sampler": opts["sampler"], "steps": opts["steps"], "cfg_scale": opts["cfg_scale"],
        "clip_skip": opts["clip_skip"], "quantity": opts["quantity"], "priority": opts["priority"],
    }
    for name in ("seed", "width", "height", "nsfw_level", "idempotency_key", "vae"):
        if opts[name] is not None:
            body[name] = opts[name]
    body.update(_inputs(opts))
    if opts["face_fix"]:
        body["face_fix"] = {"prompt": opts["face_prompt"], "denoise": opts["face_denoise"]}
    if opts["hires_scale"] is not None:
        body["hires"] = {"scale": opts["hires_scale"], "denoise": opts["hires_denoise"], "steps": opts["hires_steps"]}
    body["output_format"], body["quality"] = opts["output_format"], opts["quality"]
    return body


def _inputs(opts: dict[str, Any]) -> dict[str, Any]:
    """img2img (--init-image) or inpaint (--init-image and --mask): the files sent as base64; the
    service decodes and judges them."""
    import base64

    image, mask = opts.get("init_image"), opts.get("mask")
    if image is None:
        if mask is not None:
            raise typer.BadParameter("--mask goes with --init-image")
        return {}

    def data(path: Path) -> dict[str, str]:
        try:
            return {"data": base64.b64encode(path.read_bytes()).decode()}
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc}") from None

    body: dict[str, Any] = {"workflow": "inpaint" if mask else "img2img", "init_image": data(image),
                            "denoise": opts["denoise"], "resize_mode": opts["resize_mode"]}
    if mask is not None:
        body.update(mask=data(mask), mask_blur=opts["mask_blur"], inpaint_padding=opts["inpaint_padding"],
                    inpaint_only_masked=not opts["inpaint_whole"])
    return body


def _body_from_image(prompt: str | None, **opts: Any) -> dict[str, Any]:
    """Re-run a delivered image: its infotext stands in for the fields (the service reads it); a PROMPT,
    --seed, --quantity, --format or an idempotency key given here win."""
    from genserve.engine.infotext import read_infotext_text

    path: Path = opts["from_png"]
    try:
        text = read_infotext_text(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"--from-png: cannot read {path}: {exc}") from None
    if not text:
        raise typer.BadParameter(f"--from-png: {path} carries no generation parameters")
    body: dict[str, Any] = {"infotext": text, "quantity": opts["quantity"], "priority": opts["priority"],
                            "output_format": opts["output_format"], "quality": opts["quality"]}
    if prompt:
        body["prompt"] = prompt
    for name in ("seed", "nsfw_level", "idempotency_key"):
        if opts[name] is not None:
            body[name] = opts[name]
    return body


def _follow(client, job_id: str, show_progress: bool) -> None:  # noqa: ANN001
    """Stream the job's events until it ends, with a progress bar on a terminal."""
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, disable=not show_progress, transient=True) as bar:
        task = bar.add_task("queued", total=None)
        for event in client.events(job_id):
            if event.event == "progress":
                d = event.data
                bar.update(task, description=f"image {d['image'] + 1}/{d['images']}", completed=d["step"],
                           total=d["total"])
            else:
                bar.update(task, description=event.data.get("status", ""))


@handle_errors
def generate(
    ctx: typer.Context,
    prompt: str | None = typer.Argument(None, help="What to draw (A1111 syntax); optional with --from-png"),
    out: Path = typer.Option(..., "--out", help="Folder the delivered images are saved into"),
    from_png: Path | None = typer.Option(None, "--from-png", help="Re-run the parameters (infotext) of a "
                                         "delivered PNG, JPEG or WebP"),
    output_format: str = typer.Option("png", "--format", help="png | jpeg | webp"),
    quality: int = typer.Option(90, "--quality", help="JPEG/WebP quality"),
    negative: str = typer.Option("", "--negative", help="Negative prompt"),
    checkpoint: str = typer.Option("tiny-sd1", "--checkpoint", help="Checkpoint resource id"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA resource ID or ID:STRENGTH (repeatable)"),
    embedding: list[str] = typer.Option([], "--embedding", help="Embedding resource id (repeatable)"),
    vae: str | None = typer.Option(None, "--vae", help="VAE resource id or name (default: the checkpoint's own)"),
    sampler: str = typer.Option("Euler a", "--sampler"),
    steps: int = typer.Option(20, "--steps"),
    cfg_scale: float = typer.Option(7.0, "--cfg"),
    clip_skip: int = typer.Option(1, "--clip-skip"),
    seed: int | None = typer.Option(None, "--seed", help="Default or -1: random (always reported)"),
    width: int | None = typer.Option(None, "--width"),
    height: int | None = typer.Option(None, "--height"),
    quantity: int = typer.Option(1, "--quantity", "-n"),
    hires_scale: float | None = typer.Option(None, "--hires-scale", help="Turn on the hires fix at this upscale"),
    hires_denoise: float = typer.Option(0.4, "--hires-denoise"),
    hires_steps: int = typer.Option(10, "--hires-steps"),
    init_image: Path | None = typer.Option(None, "--init-image", help="img2img: start from this PNG/JPEG/WebP"),
    mask: Path | None = typer.Option(None, "--mask", help="inpaint (with --init-image): white is repainted"),
    denoise: float = typer.Option(0.75, "--denoise", help="img2img/inpaint denoising strength"),
    resize_mode: str = typer.Option("just_resize", "--resize-mode",
                                    help="just_resize | crop_and_resize | resize_and_fill"),
    mask_blur: int = typer.Option(4, "--mask-blur"),
    inpaint_padding: int = typer.Option(32, "--inpaint-padding", help="pixels around the mask's box"),
    inpaint_whole: bool = typer.Option(False, "--inpaint-whole", help="repaint at the whole image's size, "
                                       "not only the masked box"),
    face_fix: bool = typer.Option(False, "--face-fix", help="ADetailer-style: repaint each detected face"),
    face_prompt: str = typer.Option("", "--face-prompt", help="The faces' prompt (default: the image's)"),
    face_denoise: float = typer.Option(0.4, "--face-denoise"),
    priority: str = typer.Option("normal", "--priority", help="low | normal | high"),
    nsfw_level: str | None = typer.Option(None, "--nsfw-level", help="Lower the allowed level for this request"),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    user: str | None = UserOption,
    tier: str | None = typer.Option(None, "--tier", help="Membership tier sent as X-User-Tier"),
    max_nsfw: str | None = typer.Option(None, "--max-nsfw", help="X-Max-Nsfw-Level the back end allows"),
    url: str | None = UrlOption,
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the job"),
    as_json: bool = JsonOption,
) -> None:
    """Generate images with the running service and save the delivered images into OUT."""
    from genserve.engine.infotext import EXTENSIONS, image_format

    body = _body(prompt, **{k: v for k, v in locals().items() if k not in ("ctx", "prompt", "as_json")})
    with _client(ctx, user, url, tier=tier, max_nsfw_level=max_nsfw, timeout_s=60.0) as client:
        job = client.generate(body)
        if job["status"] in ("queued", "running"):
            _follow(client, job["id"], show_progress=not as_json and console.is_terminal)
        job = client.job(job["id"])
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for image in job["images"]:
            data = client.image(job["id"], image["index"])
            path = out / f"{job['id']}-{image['index']}.{EXTENSIONS[image_format(data)]}"
            path.write_bytes(data)
            saved.append(str(path))
    data = {**job, "files": saved}
    lines = [f"generation {job['id']}: {job['status']}, {len(saved)} image(s), {job['charged']} buzz charged"]
    lines += [f"  {p} (seed {i['seed']})" for p, i in zip(saved, job["images"], strict=True)]
    lines += [f"  withheld image {w['index']} (seed {w['seed']}): {', '.join(w['reasons'])}" for w in job["withheld"]]
    if job.get("error"):
        lines.append(f"  {job['error']['code']}: {job['error']['message']}")
    emit(data, as_json, "\n".join(lines))
    if job["status"] != "succeeded":
        raise typer.Exit(EXIT_REFUSED if job["status"] == "blocked" else EXIT_ERROR)


@jobs_app.command("status")
@handle_errors
def status(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"), user: str | None = UserOption,
           url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """One generation job as the service reports it."""
    with _client(ctx, user, url) as client:
        job = client.job(job_id)
    progress = job["progress"]
    emit(job, as_json, f"{job['id']}: {job['status']} (step {progress['step']}/{progress['total']}, "
                       f"{len(job['images'])} image(s), {job['charged']}/{job['quote']} buzz)")


@jobs_app.command("cancel")
@handle_errors
def cancel(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"), user: str | None = UserOption,
           url: str | None = UrlOption, as_json: bool = JsonOption) -> None:
    """Ask a generation to stop; its hold is released."""
    with _client(ctx, user, url) as client:
        job = client.cancel(job_id)
    emit(job, as_json, f"{job['id']}: {job['status']} (cancel requested)")
