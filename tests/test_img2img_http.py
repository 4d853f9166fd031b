"""img2img, inpaint and face fix over HTTP (JSON and multipart), the CLI, and the admin route that adds
known-abusive image hashes."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json

import httpx
import pytest
from img2img_support import (
    GRANT,
    assert_refused,
    b64_image,
    img2img_request,
    landscape_image,
    new_caller,
    run_job,
    service_env,
)
from loopback import loopback_server
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from genserve.billing.ledger import user_account
from genserve.cli import app as cli_app
from genserve.generation.uploads_api import build_upload_router
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.moderation_api import build_moderation_router
from safety.audit_log import AuditLog


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    yield from service_env(tmp_path_factory, tiny_models)


@pytest.fixture()
def http_server(env):
    """The ingress over the module's service on a loopback port (no lifespan: its exit would close the
    module-wide service for the tests after)."""
    service = env[0]
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    with loopback_server(create_api(service, moderation, start_background=False)) as url:
        yield url


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_http_and_cli_run_img2img_and_inpaint(env, http_server, tmp_path, monkeypatch, checkpoint):
    service, ledger, _, _ = env
    caller = new_caller(ledger)
    big = Image.effect_noise((1024, 1024), 80).convert("RGB")  # ~3 MB as PNG: past the plain 1 MiB body limit
    body = img2img_request(init_image={"data": b64_image(big)}, checkpoint=checkpoint).model_dump(
        mode="json", exclude_none=True)
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": caller.user_id}
    response = httpx.post(f"{http_server}/v1/generations?wait=true&timeout=120", json=body, headers=headers,
                          timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    gif = io.BytesIO()
    landscape_image().save(gif, format="GIF")
    body["init_image"] = {"data": base64.b64encode(gif.getvalue()).decode()}
    refused = httpx.post(f"{http_server}/v1/generations", json=body, headers=headers, timeout=60)
    assert refused.status_code == 422 and refused.json()["code"] == "input_image_format"

    monkeypatch.setenv("GENSERVE_DATA_DIR", str(service.settings.data_dir))
    source, mask = tmp_path / "in.jpg", tmp_path / "mask.png"
    landscape_image(96, 64).save(source, format="JPEG")
    cut = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(cut).rectangle((50, 20, 70, 40), fill=255)
    cut.save(mask)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli_app, ["generate", "a landscape in autumn", "--out", str(out), "--steps", "4",
                                          "--checkpoint", checkpoint,
                                          "--init-image", str(source), "--mask", str(mask), "--denoise", "0.8",
                                          "--face-fix",
                                          "--user", caller.user_id, "--url", http_server, "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["status"] == "succeeded" and "Mask blur: 4" in job["infotext"]
    assert "ADetailer model" in job["infotext"]  # asked for; the real NudeNet found no face to fix
    assert len(list(out.glob("*.png"))) == 1


def test_a_hash_blocklisted_input_is_refused_even_resized_and_reencoded(env):
    service, ledger, _, _ = env
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    limits = service.settings.generation.input_images
    app = create_api(service, moderation, start_background=False,
                     routers=[functools.partial(build_moderation_router, moderation, limits)])
    known = landscape_image(96, 96)
    ImageDraw.Draw(known).rectangle((10, 50, 40, 90), fill=(200, 30, 90))

    async def add(body: dict, token: str = "local-admin-token") -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/admin/image-hashes", json=body, headers={"Authorization": f"Bearer {token}"})

    assert asyncio.run(add({"phash": "0" * 16}, token="local-service-token")).status_code in (401, 403)

    refused = asyncio.run(add({"image": b64_image(known)}))
    assert refused.status_code == 201, refused.text
    phash = refused.json()["phash"]
    assert asyncio.run(add({"phash": phash})).json() == {"entry_id": refused.json()["entry_id"], "phash": phash,
                                                        "added": False}
    assert asyncio.run(add({"phash": phash, "image": b64_image(known)})).json()["code"] == "image_hash_source"
    copy = known.resize((64, 64))  # what a re-upload goes through: resized and re-encoded
    caller = new_caller(ledger)
    error = assert_refused(env, caller, img2img_request(init_image={"data": b64_image(copy, "JPEG")}))
    assert error.code == "input_image_hash_blocked" and "input.hash_blocklisted" in error.details["rules"]
    row = AuditLog(service.db.session).query(kind="input_image", user_id=caller.user_id)[0]
    assert row.action == "block" and row.details["hash_match"]["phash"] == phash
    # another image is not caught by it
    assert run_job(service, new_caller(ledger), img2img_request()).status.value == "succeeded"


def test_multipart_upload_runs_img2img_and_bounds_each_part(env):
    service, ledger, _, _ = env
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    app = create_api(service, moderation, start_background=False,
                     routers=[functools.partial(build_upload_router, service)])
    caller = new_caller(ledger)
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": caller.user_id}
    body = {"prompt": "a landscape in autumn", "checkpoint": "tiny-sd1", "steps": 4, "seed": 1,
            "workflow": "img2img", "denoise": 0.5}
    png = io.BytesIO()
    landscape_image().save(png, format="PNG")

    async def post(files: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            return await client.post("/v1/generations/multipart?wait=true&timeout=120", headers=headers,
                                     data={"request": json.dumps(body)}, files=files)

    ok = asyncio.run(post({"init_image": ("in.png", png.getvalue(), "image/png")}))
    assert ok.status_code == 200 and ok.json()["status"] == "succeeded", ok.text
    assert "Denoising strength: 0.5" in ok.json()["infotext"]
    too_big = asyncio.run(post({"init_image": ("in.png", b"\x89PNG" + b"0" * (9 << 20), "image/png")}))
    assert too_big.status_code == 413 and too_big.json()["code"] == "input_image_too_large"
    assert ledger.balance(user_account(caller.user_id)).available == GRANT - ok.json()["charged"]
