"""`genserve serve`: the whole service on this machine with embedded defaults, until Ctrl-C."""

from __future__ import annotations

import math
import os
import signal
import threading

import typer

from genserve.cli.common import JsonOption, console, emit, get_settings, handle_errors


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


@handle_errors
def serve_command(
    ctx: typer.Context,
    host: str | None = typer.Option(None, "--host", help="Default: server.host"),
    port: int | None = typer.Option(None, "--port", help="Default: server.port"),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard",
                                   help="Start Ray's dashboard, which hosts the job server training runs need"),
    build_models: bool = typer.Option(True, "--build-models/--no-build-models",
                                      help="Build the tiny models when they are missing"),
    as_json: bool = JsonOption,
) -> None:
    """Start local Ray + Serve with the tiny models registered and a funded demo user; block until Ctrl-C."""
    import ray
    from ray import serve

    from genserve.app import APP_NAME, build_app, ingress_environment, load_serve_config, required_cpus
    from genserve.bootstrap import bootstrap
    from genserve.core.config import check_deployment
    from genserve.core.db import Database
    from genserve.core.log import configure_logging
    from genserve.core.storage import object_store_from_settings
    from genserve.resources.catalog import load_model_catalog
    from training.ray_jobs import local_ray_init_kwargs

    settings = get_settings(ctx)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update=overrides)})
    check_deployment(settings)  # before anything starts: default or short tokens off this machine
    configure_logging(settings.logging.level, settings.logging.json_lines)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    db = Database.from_settings(settings)
    db.migrate()
    report = bootstrap(settings, db, object_store_from_settings(settings), build_models=build_models)
    db.dispose()

    serve_config = load_serve_config(settings.config_path(settings.server.serve_config))
    num_cpus = settings.server.num_cpus
    if num_cpus is None and settings.server.ray_address is None:
        # Ray's CPUs are scheduling units: a small machine still gets room for every replica
        families = list(load_model_catalog(settings.models_file).families)
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(serve_config, families)))
    if not ray.is_initialized():
        if settings.server.ray_address is None:  # a cluster chose its HTTP ingress when it started
            os.environ.update(ingress_environment(settings))
        # a local Ray gets the job server (in the dashboard) that training runs are submitted to
        local = {} if settings.server.ray_address else {
            "num_cpus": num_cpus, "include_dashboard": dashboard,
            **(local_ray_init_kwargs(settings) if dashboard else {}),
        }
        ray.init(
            address=settings.server.ray_address,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                      **settings.to_env()}},
            **local,
        )
    http = {**(serve_config.get("http_options") or {}), "host": settings.server.host, "port": settings.server.port}
    serve.start(http_options=http)
    serve.run(build_app(settings, serve_config), name=APP_NAME, route_prefix="/")

    url = f"http://{settings.server.host}:{settings.server.port}"
    info = {"url": url, "openapi": f"{url}/openapi.json", **report.to_dict()}
    emit(info, as_json, "\n".join([
        f"genserve is running at {url} (OpenAPI: {url}/openapi.json)",
        f"checkpoints: {', '.join(report.checkpoints)}; demo user {report.demo_user!r} has "
        f"{report.demo_balance} buzz",
        "try:",
        '  genserve generate "a red fox" --out out/',
        f"  curl -s {url}/v1/generations -H 'Authorization: Bearer <service token>' "
        f"-H 'X-User-Id: {report.demo_user}' -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"a red fox\", \"checkpoint\": \"tiny-sd1\"}'",
        "press Ctrl-C to stop",
    ]))

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    console.print("stopping ...")
    serve.shutdown()
    ray.shutdown()
