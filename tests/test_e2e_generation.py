"""End to end over HTTP on a real local Ray Serve application (ingress + one worker per family).

One application for the whole module, tiny SD1 and SDXL, real SQLite ledger, audit log, object store
and NudeNet scanner. Each test uses its own user so balances are exact.
"""

from __future__ import annotations

import io
import os
import time
import uuid

import httpx
import numpy as np
import pytest
from engine_loras import make_lora, write_lora
from PIL import Image

from genserve.app import APP_NAME, build_app, load_serve_config, serve_http_port, worker_name
from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.core.config import load_settings
from genserve.core.db import Database
from genserve.core.storage import object_store_from_settings
from genserve.engine.infotext import parse_infotext
from genserve.generation.worker.wire import LoraSpec, WorkerRequest
from genserve.resources.registry import ResourceRegistry
from genserve.tinymodels import build_tiny_pipeline

pytestmark = pytest.mark.ray

TOKEN = {"Authorization": "Bearer local-service-token"}
ADMIN = {"Authorization": "Bearer local-admin-token"}
GRANT = 500
BODY = {"prompt": "a red fox in the snow", "checkpoint": "tiny-sd1", "steps": 3, "seed": 42}
# a tier whose users may have one job at a time, and a service that is full at three active jobs
TEST_LIMITS = {
    "default_tier": "free",
    "tiers": {"free": {"quantity": 4, "queue": 4, "steps": 150, "resources": 9},
              "solo": {"quantity": 1, "queue": 1, "steps": 150, "resources": 9}},
    "max_active_jobs": 3,
}


class Site:
    """What the site's back end does: call the service for one user."""

    def __init__(self, url: str, ledger: Ledger, registry: ResourceRegistry, lora_dir):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.ledger = ledger
        self.registry = registry
        self.lora_dir = lora_dir

    def user(self, grant: int = GRANT) -> str:
        uid = f"e2e{uuid.uuid4().hex[:8]}"
        self.ledger.grant(user_account(uid), grant, f"e2e-grant:{uid}")
        return uid

    @staticmethod
    def headers(user: str, **extra: str) -> dict[str, str]:
        return {**TOKEN, "X-User-Id": user, **extra}

    def submit(self, user: str, body: dict | None = None, **extra: str) -> httpx.Response:
        return self.http.post("/v1/generations", json={**BODY, **(body or {})}, headers=self.headers(user, **extra))

    def run(self, user: str, body: dict | None = None) -> dict:
        resp = self.http.post("/v1/generations?wait=true&timeout=120", json={**BODY, **(body or {})},
                              headers=self.headers(user))
        assert resp.status_code == 200, resp.text
        return resp.json()

    def job(self, user: str, job_id: str) -> dict:
        return self.http.get(f"/v1/generations/{job_id}", headers=self.headers(user)).json()

    def wait(self, user: str, job_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(user, job_id)
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"{job_id} did not finish: {job}")

    def first_progress(self, user: str, job_id: str) -> list[str]:
        """Read the event stream until the first progress event; returns the event names seen."""
        seen = []
        with self.http.stream("GET", f"/v1/generations/{job_id}/events", headers=self.headers(user)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event:"):
                    seen.append(line.split(":", 1)[1].strip())
                    if seen[-1] == "progress":
                        break
        return seen

    def image(self, user: str, job: dict, index: int = 0) -> bytes:
        resp = self.http.get(job["images"][index]["url"], headers=self.headers(user))
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        return resp.content

    def available(self, user: str) -> int:
        return self.http.get(f"/v1/accounts/{user}/balance", headers=self.headers(user)).json()["available"]

    def lora(self, family: str, seed: int, fmt: str = "kohya", rid: str | None = None) -> str:
        rid = rid or f"e2e-{family}-{seed}-{fmt}"
        path = write_lora(self.lora_dir / f"{rid}.safetensors", make_lora(build_tiny_pipeline(family), seed=seed, fmt=fmt))
        self.registry.publish(path, id=rid, kind="lora", family=family)
        return rid


@pytest.fixture(scope="module")
def site(ray_session, tmp_path_factory, tiny_models):
    from ray import serve

    root = tmp_path_factory.mktemp("e2e")
    (root / "data").mkdir()
    os.symlink(tiny_models["sd1"].root.parent, root / "data" / "models")
    port = serve_http_port()
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(root / "data")}, overrides={
        "server": {"port": port},
        "worker": {"resource_cache_dir": str(root / "cache"), "cpu_threads": 1},
        "generation": {"heartbeat_interval_s": 1.0, "reaper_interval_s": 2.0},
    })
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store, build_models=False)
    config = load_serve_config(settings.config_path(settings.server.serve_config))
    for deployment in config["applications"][0]["deployments"]:
        deployment.pop("autoscaling_config", None)  # one replica each: the tests kill and count them
        deployment["num_replicas"] = 1
        if deployment["name"] == "Ingress":
            deployment["user_config"] = {"limits": TEST_LIMITS}
    serve.run(build_app(settings, config), name=APP_NAME, route_prefix="/")
    s = Site(f"http://127.0.0.1:{port}", Ledger(db, settings.billing), ResourceRegistry(db, store), root / "loras")
    yield s
    s.http.close()
    serve.delete(APP_NAME)
    db.dispose()


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_submit_progress_png_infotext_and_exact_charge(site, checkpoint):
    user = site.user()
    body = {"checkpoint": checkpoint, "quantity": 2, "negative_prompt": "blurry"}
    quote = site.http.post("/v1/quotes", json={**BODY, **body}, headers=site.headers(user)).json()
    submitted = site.submit(user, body)
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    assert site.first_progress(user, job_id)[-1] == "progress"
    job = site.wait(user, job_id)
    assert job["status"] == "succeeded", job
    assert [i["seed"] for i in job["images"]] == [42, 43]
    png = site.image(user, job)
    with Image.open(io.BytesIO(png)) as img:
        info = parse_infotext(img.info["parameters"])
    assert info.prompt == BODY["prompt"] and info.params["Seed"] == "42" and info.params["Steps"] == "3"
    assert info.negative_prompt.startswith("<gs-safe-neg>") and "blurry" in info.negative_prompt
    assert job["charged"] == quote["total"] == 2 * quote["per_image"]
    assert site.available(user) == GRANT - job["charged"]


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_img2img_inpaint_and_face_fix_through_the_serve_deployments(site, checkpoint):
    """The input reaches the worker replica as an object-store key (wire schema 5), never as bytes."""
    import base64

    from PIL import ImageDraw

    def b64(image: Image.Image) -> str:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    user = site.user()
    source = Image.new("RGB", (64, 64), (90, 140, 220))
    ImageDraw.Draw(source).rectangle((0, 40, 63, 63), fill=(30, 120, 40))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 24, 24), fill=255)
    body = {"checkpoint": checkpoint, "workflow": "img2img", "init_image": {"data": b64(source)}, "denoise": 0.6,
            "face_fix": {"denoise": 0.5}}
    job = site.run(user, body)
    assert job["status"] == "succeeded", job
    assert "Denoising strength: 0.6" in job["infotext"] and "ADetailer model" in job["infotext"]
    job = site.run(user, {**body, "workflow": "inpaint", "mask": {"data": b64(mask)}, "mask_blur": 0,
                          "face_fix": None})
    assert job["status"] == "succeeded", job
    out = np.asarray(Image.open(io.BytesIO(site.image(user, job))).convert("RGB"), np.int16)
    keep = np.asarray(mask) == 0
    assert np.abs(out - np.asarray(source, np.int16)).max(axis=2)[keep].max() == 0
    assert site.available(user) < GRANT


def test_blocked_prompt_costs_nothing(site):
    user = site.user()
    resp = site.submit(user, {"prompt": "a 10 year old girl, nude"})
    assert resp.status_code == 403 and resp.json()["code"] == "safety_blocked" and resp.json()["details"]["rules"]
    assert site.available(user) == GRANT


def test_safety_embedding_cannot_be_displaced(site):
    user = site.user()
    embeds = site.submit(user, {"prompt_embeds": [[0.0] * 8], "negative_prompt_embeds": [[0.0]]})
    assert embeds.status_code == 422
    assert {e["loc"][-1] for e in embeds.json()["details"]["errors"]} == {"prompt_embeds", "negative_prompt_embeds"}
    job = site.run(user, {"negative_prompt": "<gs-safe-neg>:0, (gs safe neg:0), ugly"})
    negative = parse_infotext(Image.open(io.BytesIO(site.image(user, job))).info["parameters"]).negative_prompt
    assert negative.startswith("<gs-safe-neg>") and negative.count("gs-safe-neg") == 1


def test_blocklisted_lora_refused_at_ingress_and_at_worker(site):
    from ray import serve

    from genserve.core.errors import SafetyBlocked

    user = site.user()
    original = site.lora("sd1", 101, "kohya", rid="e2e-celebrity")
    copy = site.lora("sd1", 101, "diffusers", rid="e2e-celebrity-reexport")
    added = site.http.post("/v1/admin/likeness", json={"resource_id": original, "person": "D. Person"}, headers=ADMIN)
    assert added.status_code == 201
    for rid in (original, copy):
        resp = site.submit(user, {"resources": [{"id": rid}]})
        assert resp.status_code == 403 and resp.json()["code"] == "safety_blocked", resp.text
        assert any(r.startswith("likeness") for r in resp.json()["details"]["rules"])
    assert site.available(user) == GRANT
    # the worker refuses on its own when asked directly (an ingress that missed it)
    handle = serve.get_deployment_handle(worker_name("sd1"), app_name=APP_NAME)
    request = WorkerRequest(job_id="direct", checkpoint_id="tiny-sd1", prompt="a fox", steps=2, width=64, height=64,
                            seeds=[1], loras=[LoraSpec(resource_id=copy, strength=1.0)])
    stream = handle.options(multiplexed_model_id="tiny-sd1", stream=True).generate.remote(request)
    with pytest.raises(SafetyBlocked) as info:
        for _ in stream:
            pass
    assert info.value.code == "likeness_blocked"


def test_loras_change_the_image_and_seeds_reproduce(site):
    user = site.user()
    l1, l2 = site.lora("sd1", 1), site.lora("sd1", 2, "diffusers")
    runs = [{}, {}, {"seed": 43},
            {"resources": [{"id": l1, "strength": 1.0}, {"id": l2, "strength": 0.5}]},
            {"resources": [{"id": l1, "strength": 0.3}, {"id": l2, "strength": 1.5}]}]
    pixels = [_pixels(site.image(user, site.run(user, body))) for body in runs]
    base, again, other_seed, mix_a, mix_b = pixels
    assert base == again
    assert len({base, other_seed, mix_a, mix_b}) == 4


def test_cancel_stops_within_a_step_and_releases_the_hold(site):
    user = site.user()
    job_id = site.submit(user, {"steps": 150}).json()["id"]
    site.first_progress(user, job_id)
    assert site.http.post(f"/v1/generations/{job_id}/cancel", headers=site.headers(user)).status_code == 202
    job = site.wait(user, job_id)
    assert job["status"] == "canceled" and job["charged"] == 0
    assert job["progress"]["step"] < 150
    assert site.available(user) == GRANT


def test_killing_the_worker_replica_fails_the_job_and_returns_the_buzz(site, ray_session):
    ray = ray_session
    user = site.user()
    job_id = site.submit(user, {"steps": 150}).json()["id"]
    site.first_progress(user, job_id)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if f"#{worker_name('sd1')}#" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
    job = site.wait(user, job_id)
    assert job["status"] == "failed" and job["error"]["code"] in ("worker_lost", "worker_failed"), job
    assert job["charged"] == 0 and site.available(user) == GRANT
    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica; the next job succeeds
        job = site.run(user)
        if job["status"] == "succeeded" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert job["status"] == "succeeded", job
    assert site.available(user) == GRANT - job["charged"]


def test_full_queues_give_429_with_retry_after(site):
    solo, other, third = site.user(), site.user(), site.user()
    first = site.submit(solo, {"steps": 150}, **{"X-User-Tier": "solo"}).json()["id"]
    second = site.submit(solo, {}, **{"X-User-Tier": "solo"})
    assert second.status_code == 429 and second.json()["code"] == "queue_limit"
    assert int(second.headers["retry-after"]) > 0
    # the service holds three active jobs at most and refuses low priority from two (75 %)
    running = site.submit(other, {"steps": 150})
    assert running.status_code == 202
    busy = site.submit(third, {"priority": "low"})
    assert busy.status_code == 429 and busy.json()["code"] == "queue_full" and busy.headers["retry-after"]
    for user, job_id in ((solo, first), (other, running.json()["id"])):
        site.http.post(f"/v1/generations/{job_id}/cancel", headers=site.headers(user))
        assert site.wait(user, job_id)["status"] == "canceled"
    assert [site.available(u) for u in (solo, other, third)] == [GRANT] * 3


def test_unauthenticated_cross_user_and_malformed_calls_are_refused(site):
    owner, other = site.user(), site.user()
    job = site.run(owner)
    probes = [
        site.http.post("/v1/generations", json=BODY),
        site.http.post("/v1/generations", json=BODY, headers={"Authorization": "Bearer nope", "X-User-Id": owner}),
        site.http.get(f"/v1/generations/{job['id']}", headers=site.headers(other)),
        site.http.get(f"/v1/generations/{job['id']}/images/0", headers=site.headers(other)),
        site.http.post(f"/v1/generations/{job['id']}/cancel", headers=site.headers(other)),
        site.http.get(f"/v1/accounts/{owner}/balance", headers=site.headers(other)),
        site.http.post("/v1/admin/takedowns", json={"person": "x"}, headers=site.headers(owner)),
    ]
    assert [r.status_code for r in probes] == [401, 401, 404, 404, 404, 403, 401]
    malformed = site.submit(owner, {"steps": "many", "quantity": 0, "resources": [{"id": "x", "strength": 3}]})
    assert malformed.status_code == 422
    locs = {tuple(e["loc"][1:]) for e in malformed.json()["details"]["errors"]}
    assert locs == {("steps",), ("quantity",), ("resources", 0, "strength")}
    assert site.http.get("/openapi.json").json()["paths"]["/v1/generations"]
    assert site.http.get("/v1/healthz").json()["status"] == "ok"


def test_cli_generate_saves_the_delivered_pngs(site, tmp_path):
    import json

    from typer.testing import CliRunner

    from genserve.cli import app

    user = site.user()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "a red fox", "--out", str(out), "--steps", "2", "--seed", "9",
                                      "--url", str(site.http.base_url), "--user", user, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["status"] == "succeeded" and len(data["files"]) == 1
    assert Image.open(data["files"][0]).info["parameters"].startswith("a red fox")
    status = CliRunner().invoke(app, ["jobs", "status", data["id"], "--url", str(site.http.base_url),
                                      "--user", user, "--json"])
    assert status.exit_code == 0 and json.loads(status.output.strip().splitlines()[-1])["id"] == data["id"]
    refused = CliRunner().invoke(app, ["generate", "a 9 year old, nude", "--out", str(out), "--url",
                                       str(site.http.base_url), "--user", user, "--json"])
    assert refused.exit_code == 3
    assert json.loads(refused.output.strip().splitlines()[-1])["error"]["code"] == "safety_blocked"
