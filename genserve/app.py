"""The Ray Serve application: one ingress deployment and one worker deployment per model family,
composed by handles.

Deployment options (autoscaling, `max_ongoing_requests`, `max_queued_requests`, `user_config` for hot
settings) come from a Serve config file (`configs/serve.local.yaml` by default), so the same file
drives `genserve serve` and `serve run configs/serve.local.yaml`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.handle import DeploymentHandle

from genserve.core.config import (
    Settings,
    check_deployment,
    load_settings,
    settings_from_handoff,
    settings_handoff,
)
from genserve.core.errors import ConfigError
from genserve.core.log import configure_logging
from genserve.economy.api import build_router as build_economy_router
from genserve.generation.service import GenerationService
from genserve.generation.uploads_api import build_upload_router
from genserve.generation.worker.deployment import FamilyWorker, ServeWorkers
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.moderation_api import build_moderation_router
from genserve.resources.api import build_router as build_resources_router
from genserve.resources.catalog import load_model_catalog
from genserve.resources.service import ResourceService
from training.api import build_router as build_training_router
from training.service import TrainingService

logger = logging.getLogger(__name__)

APP_NAME = "genserve"
INGRESS_NAME = "Ingress"


def worker_name(family: str) -> str:
    return f"worker-{family}"


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()
class Ingress:
    """HTTP front door: builds the generation and training services once per replica."""

    def __init__(self, settings: dict[str, Any], workers: dict[str, DeploymentHandle]):
        self.settings = settings_from_handoff(settings)
        configure_logging(self.settings.logging.level, self.settings.logging.json_lines)
        self.service = GenerationService.from_settings(self.settings, ServeWorkers(workers))
        self.moderation = Moderation(self.service.registry, self.service.resource_cache, self.service.safety)
        self.trainings = TrainingService.from_settings(self.settings, db=self.service.db)
        self.trainings.start_background()
        self.resources = resource_service(self.settings, self.service)

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - the ASGI app
        return create_api(self.service, self.moderation,
                          routers=[functools.partial(build_training_router, self.trainings),
                                   resources_router(self.resources),
                                   functools.partial(build_economy_router, self.service),
                                   functools.partial(build_moderation_router, self.moderation,
                                                     self.settings.generation.input_images),
                                   functools.partial(build_upload_router, self.service)])

    def __del__(self) -> None:
        self.trainings.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Hot settings (`user_config`): tier limits, blocklist and person-name refresh."""
        self.service.reconfigure(config or {})

    def check_health(self) -> None:
        self.service.count_active()


def resource_service(settings: Settings, service: GenerationService) -> ResourceService:
    """Resource registration and downloads over the generation service's registry, object store, gate,
    cache and early-access rule."""
    return ResourceService.from_parts(settings, service.registry, service.store, service.safety,
                                      resource_cache=service.resource_cache,
                                      access_check=service.economy.check_download)


def resources_router(resources: ResourceService) -> functools.partial:
    """The `/v1/resources` and `/v1/models` routes, for `create_api(routers=...)`."""
    return functools.partial(build_resources_router, resources, resources.catalog)


def load_serve_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read Serve config {path}: {exc}", code="serve_config_invalid") from exc
    if not isinstance(config.get("applications"), list) or not config["applications"]:
        raise ConfigError(f"{path} lists no applications", code="serve_config_invalid")
    return config


def deployment_options(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-deployment options of the genserve application in a Serve config, keyed by name."""
    app = next((a for a in config["applications"] if a.get("name", APP_NAME) == APP_NAME), config["applications"][0])
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}


def required_cpus(serve_config: dict[str, Any], families: list[str]) -> float:
    """Logical CPUs the application asks Ray for at its largest (every deployment at max replicas)."""
    options = deployment_options(serve_config)
    total = 0.0
    for name in (INGRESS_NAME, *(worker_name(f) for f in families)):
        opts = options.get(name, {})
        replicas = opts.get("num_replicas") or (opts.get("autoscaling_config") or {}).get("max_replicas", 1)
        total += float((opts.get("ray_actor_options") or {}).get("num_cpus", 1)) * int(replicas)
    return total


def build_app(settings: Settings, serve_config: dict[str, Any] | None = None, *,
              worker: serve.Deployment = FamilyWorker) -> serve.Application:
    """Ingress + one `worker` per family in `configs/models.yaml`, with the Serve config's options
    (`worker` is `FamilyWorker` or a deployment of a subclass, such as the benchmark's)."""
    if serve_config is None:
        serve_config = load_serve_config(settings.config_path(settings.server.serve_config))
    options = deployment_options(serve_config)
    # secrets by reference only: deployment arguments are kept by Serve's controller
    dumped = settings_handoff(settings)
    workers = {
        family: worker.options(name=worker_name(family), **options.get(worker_name(family), {})).bind(
            family, dumped
        )
        for family in load_model_catalog(settings.models_file).families
    }
    return Ingress.options(**options.get(INGRESS_NAME, {})).bind(dumped, workers)


def app_builder(args: dict[str, str]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` (import path `genserve.app:app_builder`).

    Settings come from `configs/` and `GENSERVE_*` variables; deployment options from the Serve
    config file itself, which Serve applies on top of the defaults here.
    """
    settings = load_settings(config_dir=args.get("config_dir"))
    check_deployment(settings)
    return build_app(settings, serve_config={"applications": [{"name": APP_NAME, "deployments": []}]})


def ingress_environment(settings: Settings) -> dict[str, str]:
    """Environment a local Ray must start with for `server.http_ingress` (empty for Serve's proxy).

    HAProxy comes with Serve's throughput mode, as in Ray's high-throughput guide: calls between
    deployments over gRPC, and user code and the handle router on the replica's main event loop
    instead of a loop thread each (a generation's dispatch to the worker and its result's way back
    took 3.5 and 1.8 ms in it against 5.7 and 2.7 ms, a one-off probe on 2 cores). The routes keep
    blocking work off that loop (`genserve.ingress`). Only Ray's processes need it: set after
    `ray.serve` is imported, it leaves this process's own handles on their router thread, which
    code without a running event loop needs.

    HAProxy's config, admin socket and server state go to a fresh folder only this user can enter
    (the admin socket itself is world-writable) instead of the shared /tmp/haproxy-serve; a short
    one, as a socket path has at most 97 characters and Ray adds a 56-character folder to it. The
    folder is removed when this process exits (its callers stop their local Ray before that)."""
    if settings.server.http_ingress != "haproxy":
        return {}
    folder = Path(tempfile.mkdtemp(prefix="gs-hap-"))  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }


def serve_http_port(host: str = "127.0.0.1", port: int | None = None) -> int:
    """The port of this Ray cluster's Serve proxy, starting Serve on `port` (or a free one) if none runs.

    Serve has one HTTP proxy per cluster: whoever starts it first picks the port, and later
    applications (benchmarks, tests, a second app) must use that one.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        return client.http_config.port
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    serve.start(http_options={"host": host, "port": port})
    return port
