"""The training HTTP API behind the ingress's token checks, and `genserve train` against it.

A real HTTP server (uvicorn on loopback) serves the router; attempts run in a thread of this
process instead of as Ray Jobs (`ThreadLauncher`; the Ray path has test_training_ray.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from loopback import loopback_server
from safetensors.torch import load_file
from training_support import (
    available,
    build_router_with_ingress_auth,
    fund,
    register_base_models,
    toy_zip,
    training_settings,
)
from typer.testing import CliRunner

from genserve.cli import app as cli_app
from genserve.core.db import Database
from genserve.core.errors import GenserveError
from genserve.ingress import JsonErrors, map_error
from training.client import TrainingClient
from training.deps import TrainingDeps
from training.ray_jobs import JobState
from training.run import JobRunner
from training.service import TrainingService

PARAMS = {"epochs": 1, "repeats": 1, "batch_size": 2, "network_dim": 4, "network_alpha": 4,
          "gradient_checkpointing": False, "seed": 5}


class ThreadLauncher:
    """Runs each attempt in a thread of this process."""

    def __init__(self):
        self.deps: TrainingDeps | None = None
        self.threads: dict[str, threading.Thread] = {}

    @staticmethod
    def submission_id(training_id: str, attempt: int) -> str:
        return f"thread-{training_id}-{attempt}"

    def submit(self, training_id: str, attempt: int) -> None:
        sid = self.submission_id(training_id, attempt)
        thread = threading.Thread(target=JobRunner(self.deps, training_id, sid).run, daemon=True)
        self.threads[sid] = thread
        thread.start()

    def state(self, sid: str) -> JobState:
        thread = self.threads.get(sid)
        if thread is None:
            return JobState.missing
        return JobState.running if thread.is_alive() else JobState.succeeded

    def stop(self, sid: str) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, tiny_models):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = training_settings(tmp_path)
    db = Database.from_settings(settings)
    db.migrate()
    deps = TrainingDeps.from_settings(settings, db)
    register_base_models(deps, tiny_models)
    fund(deps, "alice", 500)
    launcher = ThreadLauncher()
    launcher.deps = deps
    service = TrainingService(deps, launcher=launcher)
    app = FastAPI()
    for exc_type in (GenserveError, RequestValidationError):  # as the ingress maps them
        app.add_exception_handler(exc_type, lambda _req, exc: map_error(exc))
    app.include_router(build_router_with_ingress_auth(service))
    with loopback_server(app, lifespan="auto") as url:
        yield url, service
    for job in launcher.threads.values():
        job.join(timeout=60)
    db.dispose()
    torch.set_num_threads(threads)


def cli(url: str, *args: str):  # noqa: ANN201
    return CliRunner().invoke(cli_app, [*args, "--url", url, "--json"], catch_exceptions=False)


def test_http_api_and_cli(server, tmp_path: Path) -> None:
    url, service = server
    settings = service.deps.settings
    token = settings.auth.service_token.get_secret_value()
    admin_token = settings.auth.admin_token.get_secret_value()
    good = toy_zip(tmp_path / "good.zip")

    with pytest.raises(GenserveError) as err:
        with TrainingClient(url, "wrong-token", "alice") as bad:
            bad.submit(good, family="sd1", real_person=False)
    assert (err.value.http_status, err.value.code) == (401, "token_invalid")

    with TrainingClient(url, token, "alice") as alice:
        with pytest.raises(GenserveError) as err:
            alice.submit(good, family="sd1", real_person=False, params={"epochs": 0})
        assert (err.value.http_status, err.value.code) == (422, "invalid_training_params")

        flagged = alice.submit(toy_zip(tmp_path / "flagged.zip", captions={0: "a young girl"}), family="sd1",
                               real_person=False, params=PARAMS)
        assert flagged["status"] == "review" and flagged["safety"]["rules"] == ["dataset.minor_signal"]
        with TrainingClient(url, token) as not_admin, pytest.raises(GenserveError) as err:
            not_admin.deny(flagged["id"])
        assert err.value.http_status == 401
        with TrainingClient(url, admin_token) as admin:
            denied = admin.deny(flagged["id"], reason="minors")
        assert (denied["status"], denied["charged"]) == ("denied", 0)
        assert available(service.deps, "alice") == 500

    # the CLI: submit and wait with the progress bar, then status and download
    result = cli(url, "train", "submit", str(good), "--family", "sd1", "--user", "alice", "--trigger", "tqz",
                 "--epochs", "1", "--repeats", "1", "--batch-size", "2", "--dim", "4", "--alpha", "4",
                 "--seed", "5", "--param", "gradient_checkpointing=false", "--wait", "--poll", "0.2")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout.strip().splitlines()[-1])
    assert view["status"] == "succeeded" and view["progress"]["step"] == view["progress"]["total_steps"] == 2
    assert view["charged"] == view["quote_total"] == 1 + 10  # 2 steps (0.4 buzz, rounded up) + 1 saved epoch
    assert view["params"]["network_dim"] == 4 and view["trigger_words"] == ["tqz"]

    assert view["samples"] == [{"epoch": 1, "index": 0, "level": "PG", "delivered": True}]
    png = httpx.get(f"{url}/v1/trainings/{view['id']}/samples/1/0",
                    headers={"Authorization": f"Bearer {token}", "X-User-Id": "alice"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    status = cli(url, "train", "status", view["id"], "--user", "alice")
    assert status.exit_code == 0 and json.loads(status.stdout)["resource_id"] == view["resource_id"]
    out = tmp_path / "lora.safetensors"
    assert cli(url, "train", "download", view["id"], "--user", "alice", "--out", str(out)).exit_code == 0
    assert any(k.endswith(".alpha") for k in load_file(str(out)))
    assert cli(url, "train", "download", view["id"], "--user", "mallory", "--out", str(out)).exit_code == 1

    blocked = cli(url, "train", "submit", str(toy_zip(tmp_path / "b.zip", captions={0: "nude young girl"})),
                  "--family", "sd1", "--user", "alice")
    assert blocked.exit_code == 3  # a safety refusal
    assert json.loads(blocked.stdout)["error"]["code"] == "dataset_blocked"
    assert available(service.deps, "alice") == 500 - view["charged"]


def test_cli_submits_a_kohya_config_and_downloads_each_epoch(server, tmp_path: Path) -> None:
    url, service = server
    (tmp_path / "prompts.txt").write_text("# previews\ntqz, a photo --n blurry --s 3 --d 1\n")
    (tmp_path / "kohya.toml").write_text(
        '[training_arguments]\nmax_train_epochs = 2\ntrain_batch_size = 2\noutput_dir = "./out"\nseed = 5\n'
        'sample_prompts = "prompts.txt"\nsave_every_n_epochs = 1\ngradient_checkpointing = false\n'
        '[additional_network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 4\nnetwork_alpha = 4\n'
        '[optimizer_arguments]\noptimizer_type = "AdaFactor"\nlearning_rate = 1e-3\nlr_scheduler = "linear"\n')
    (tmp_path / "dataset.toml").write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 1\n")
    result = cli(url, "train", "submit", str(toy_zip(tmp_path / "k.zip")), "--family", "sd1", "--user", "alice",
                 "--config", str(tmp_path / "kohya.toml"), "--dataset-config", str(tmp_path / "dataset.toml"),
                 "--wait", "--poll", "0.2")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout.strip().splitlines()[-1])
    assert view["status"] == "succeeded", view
    p = view["params"]
    assert (p["epochs"], p["optimizer"], p["lr_scheduler"], p["unet_lr"], p["network_dim"]) == \
        (2, "adafactor", "linear", 1e-3, 4)
    assert p["sample_prompts"] == ["tqz, a photo --n blurry --s 3 --d 1"]
    assert view["config"]["ignored"]["output_dir"] and "network_module" in view["config"]["ignored"]
    listed = cli(url, "train", "epochs", view["id"], "--user", "alice")
    assert [e["epoch"] for e in json.loads(listed.stdout)] == [1, 2]
    out = tmp_path / "e1.safetensors"
    assert cli(url, "train", "download", view["id"], "--user", "alice", "--epoch", "1", "--out", str(out)).exit_code == 0
    assert any(k.endswith(".alpha") for k in load_file(str(out)))
    missing = cli(url, "train", "download", view["id"], "--user", "alice", "--epoch", "9", "--out", str(out))
    assert missing.exit_code != 0 and json.loads(missing.stdout)["error"]["code"] == "epoch_not_found"
    bad = cli(url, "train", "submit", str(toy_zip(tmp_path / "k2.zip")), "--family", "sd1", "--user", "alice",
              "--param", "network_weights=old.safetensors", "--param", "bucket_reso_steps=64")
    assert bad.exit_code != 0
    error = json.loads(bad.stdout)["error"]
    assert error["code"] == "unsupported_training_options" and error["details"]["options"] == ["network_weights"]


def test_upload_limit_holds_while_the_body_streams(tmp_path: Path) -> None:
    """Past the limit the upload is refused (413) at once from Content-Length, or at the first bytes
    past it when the length is not known: the body is never read to the end nor spooled."""
    import asyncio

    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = training_settings(tmp_path)
    db = Database.from_settings(settings)
    db.migrate()
    deps = TrainingDeps.from_settings(settings, db)
    deps.limits = deps.limits.model_copy(update={"intake": deps.limits.intake.model_copy(
        update={"max_upload_bytes": 256 << 10})})
    service = TrainingService(deps, launcher=ThreadLauncher())
    app = FastAPI()
    for exc_type in (GenserveError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, lambda _req, exc: map_error(exc))
    app.include_router(build_router_with_ingress_auth(service))
    app.add_middleware(JsonErrors)
    headers = {"Authorization": f"Bearer {settings.auth.service_token.get_secret_value()}", "X-User-Id": "alice",
               "Content-Type": "multipart/form-data; boundary=b"}
    chunk = 64 << 10
    pulled: list[int] = []

    async def body():
        yield b'--b\r\nContent-Disposition: form-data; name="dataset"; filename="d.zip"\r\n\r\n'
        for i in range(256):  # 16 MiB, far past the limit
            pulled.append(i)
            yield b"\0" * chunk

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            streamed = await client.post("/v1/trainings", content=body(), headers=headers)
            declared = await client.post("/v1/trainings", content=b"x" * (1 << 20), headers=headers)
            return streamed, declared

    streamed, declared = asyncio.run(go())
    try:
        assert (streamed.status_code, streamed.json()["code"]) == (413, "payload_too_large")
        assert len(pulled) <= (256 << 10) // chunk + 2, f"{len(pulled)} chunks read"
        assert (declared.status_code, declared.json()["code"]) == (413, "payload_too_large")
        assert not list((deps.work_dir / "uploads").glob("*")) if (deps.work_dir / "uploads").exists() else True
    finally:
        db.dispose()
