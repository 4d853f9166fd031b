"""The service as it is deployed: PostgreSQL and an S3-protocol server (moto), strong tokens, the full
HTTP app (generation, training and admin routes) in-process. Generation with an image fetched and a
presigned HTTP redirect, a cancel, a training run to its LoRA, a job left by a dead process taken by
the reaper; then the ledger and the audit log verify and every buzz is accounted for."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from generation_support import in_process_service
from test_training_api import ThreadLauncher
from training_support import register_base_models, toy_zip

from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.core.config import check_deployment, load_settings
from genserve.core.db import Database
from genserve.core.storage import object_store_from_settings
from genserve.generation.jobs import JobStatus, utcnow
from genserve.generation.protocol import GenerationRequest
from genserve.generation.reaper import Reaper
from genserve.ingress import create_api
from genserve.moderation import Moderation
from training.api import build_router as build_training_router
from training.deps import TrainingDeps
from training.service import TrainingService

pytestmark = pytest.mark.postgres

SERVICE_TOKEN = "svc-" + "7" * 40
ADMIN_TOKEN = "adm-" + "3" * 40
GRANT = 5000
TRAIN = {"epochs": 1, "repeats": 1, "batch_size": 2, "network_dim": 4, "network_alpha": 4,
         "gradient_checkpointing": False, "seed": 5}


@pytest.fixture
def deployed(tmp_path: Path, tiny_models, postgres_url: str, s3_server: str):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(tiny_models["sd1"].root.parent, data / "models")
    settings = load_settings(env={
        "GENSERVE_DATA_DIR": str(data), "GENSERVE_DATABASE_URL": postgres_url,
        "GENSERVE_STORAGE_BACKEND": "s3", "GENSERVE_S3_ENDPOINT_URL": s3_server,
        "GENSERVE_S3_BUCKET": f"gs-e2e-{uuid.uuid4().hex[:10]}", "GENSERVE_S3_ACCESS_KEY_ID": "test",
        "GENSERVE_S3_SECRET_ACCESS_KEY": "test", "GENSERVE_SERVICE_TOKEN": SERVICE_TOKEN,
        "GENSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }, overrides={"worker": {"resource_cache_dir": str(tmp_path / "cache")},
                  "training": {"progress_interval_s": 0}})
    check_deployment(settings)  # a deployment-shaped configuration with strong tokens starts
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    store.ensure_bucket()
    bootstrap(settings, db, store, build_models=False)
    service = in_process_service(settings, db=db, store=store)
    deps = TrainingDeps.from_settings(settings, db)
    register_base_models(deps, tiny_models)
    launcher = ThreadLauncher()
    launcher.deps = deps
    trainings = TrainingService(deps, launcher=launcher)
    app = create_api(service, Moderation(service.registry, service.resource_cache, service.safety),
                     routers=[functools.partial(build_training_router, trainings)], start_background=False)
    yield settings, service, trainings, app
    for job in launcher.threads.values():
        job.join(timeout=120)
    db.dispose()


def test_generation_training_cancel_and_reaper_on_postgres_and_s3(deployed, tmp_path: Path):
    settings, service, trainings, app = deployed
    assert service.db.engine.dialect.name == "postgresql" and type(service.store).__name__ == "S3ObjectStore"
    ledger = Ledger(service.db, settings.billing)
    user = f"e2e{uuid.uuid4().hex[:8]}"
    ledger.grant(user_account(user), GRANT, f"e2e-grant:{user}")
    h = {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-User-Id": user}
    body = {"prompt": "a red fox in the snow", "checkpoint": "tiny-sd1", "steps": 3, "seed": 7, "quantity": 2}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            assert (await client.get("/v1/healthz")).status_code == 200
            refused = await client.post("/v1/generations", json=body,
                                        headers={**h, "Authorization": "Bearer local-service-token"})
            assert refused.status_code == 401  # the local default token is not a token here
            done = (await client.post("/v1/generations?wait=true&timeout=120", json=body, headers=h)).json()
            assert done["status"] == "succeeded" and len(done["images"]) == 2, done
            png = await client.get(f"/v1/generations/{done['id']}/images/0", headers=h)
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            redirect = await client.get(f"/v1/generations/{done['id']}/images/1?redirect=true", headers=h)
            assert redirect.status_code == 307 and redirect.headers["location"].startswith("http")
            fetched = httpx.get(redirect.headers["location"])  # the presigned URL, straight from the S3 server
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")

            long = (await client.post("/v1/generations", json={**body, "steps": 50, "quantity": 4},
                                      headers=h)).json()
            canceled = await client.post(f"/v1/generations/{long['id']}/cancel", headers=h)
            assert canceled.status_code == 202
            for _ in range(600):
                view = (await client.get(f"/v1/generations/{long['id']}", headers=h)).json()
                if view["status"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.1)
            assert view["status"] == "canceled" and view["charged"] == 0, view

            zip_path = toy_zip(tmp_path / "toy.zip")
            with zip_path.open("rb") as f:
                started = await client.post("/v1/trainings", headers=h, files={"dataset": ("toy.zip", f, "application/zip")},
                                            data={"family": "sd1", "real_person": "false", "trigger_words": "tqz",
                                                  "params": json.dumps(TRAIN)})
            assert started.status_code == 202, started.text
            training = started.json()
            for _ in range(1200):
                training = (await client.get(f"/v1/trainings/{training['id']}", headers=h)).json()
                if training["status"] in ("succeeded", "failed", "canceled"):
                    break
                await asyncio.sleep(0.25)
            assert training["status"] == "succeeded", training
            lora = await client.get(f"/v1/trainings/{training['id']}/download", headers=h)
            assert lora.status_code == 200 and len(lora.content) > 100
            return done, view, training

    done, canceled, training = asyncio.run(scenario())

    # a job whose process died (never ran, heartbeat stale): the reaper fails it and releases its hold
    orphan, running = service._accept(_caller(user),
                                      GenerationRequest.model_validate({**body, "seed": 9}))
    assert ledger.balance(user_account(user)).held > 0
    report = Reaper(service.jobs, ledger, store=service.store, stale_after_s=0).reap_once(
        now=utcnow() + dt.timedelta(hours=1))
    assert orphan.id in report.jobs
    assert service.jobs.get(orphan.id).status is JobStatus.failed
    assert ledger.balance(user_account(user)).held == 0

    charged = done["charged"] + canceled["charged"] + training["charged"]
    assert done["charged"] > 0 and training["charged"] > 0
    balance = ledger.balance(user_account(user))
    assert (balance.posted, balance.available) == (GRANT - charged, GRANT - charged)
    assert ledger.verify().ok
    assert service.safety.audit.verify().ok
    # canceled and reaped jobs left no image behind; the delivered ones are in the bucket
    assert not list(service.store.list(f"images/{user}/{canceled['id']}/"))
    assert len(list(service.store.list(f"images/{user}/{done['id']}/"))) == 2


def _caller(user: str):  # noqa: ANN202
    from genserve.generation.admission import Caller
    from safety.levels import NsfwLevel

    return Caller(user_id=user, tier=None, max_nsfw_level=NsfwLevel.PG13, request_id=uuid.uuid4().hex)
