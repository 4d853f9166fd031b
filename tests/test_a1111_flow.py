"""A1111-style requests through the whole in-process flow: LoRA tags, infotext round trip, hires bounds."""

from __future__ import annotations

import asyncio
import io
import os
import uuid

import pytest
from engine_loras import make_lora, write_lora
from generation_support import in_process_service
from PIL import Image

from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.core.config import load_settings
from genserve.core.db import Database
from genserve.core.errors import InvalidRequest, SafetyBlocked
from genserve.core.storage import object_store_from_settings
from genserve.generation.admission import Caller, hires_spec
from genserve.generation.protocol import GenerationRequest
from genserve.moderation import Moderation
from genserve.tinymodels import build_tiny_pipeline
from safety.image_scan import ImageScanner


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("a1111")
    data = root / "data"
    data.mkdir()
    os.symlink(tiny_models["sd1"].root.parent, data / "models")
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(data)},
                             overrides={"worker": {"resource_cache_dir": str(root / "cache")}})
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store, build_models=False)
    scanner = ImageScanner.from_config(settings.config_path(settings.safety.rules_dir))
    service = in_process_service(settings, db=db, store=store, scanner=scanner)
    ledger = Ledger(db, settings.billing)
    for seed in (1, 11):
        rid = f"tag-lora-{seed}"
        path = write_lora(root / f"{rid}.safetensors", make_lora(build_tiny_pipeline("sd1"), seed=seed, fmt="kohya"))
        service.registry.publish(path, id=rid, kind="lora", family="sd1", name=f"Style {seed}")
    yield service, ledger
    db.dispose()


def _caller(ledger) -> Caller:
    uid = f"u{uuid.uuid4().hex[:10]}"
    ledger.grant(user_account(uid), 1000, f"test-grant:{uid}")
    return Caller(user_id=uid, request_id=uuid.uuid4().hex)


def _req(**kw) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "a red fox in the snow", "checkpoint": "tiny-sd1",
                                             "steps": 3, "seed": 99, **kw})


def _png(service, caller, request) -> tuple[bytes, object]:
    async def go():
        view, _ = await service.submit(caller, request)
        return await service.wait(caller, view.id, 60)

    job = asyncio.run(go())
    assert job.status.value == "succeeded", job.error
    return service.image(caller, job.id, 0)[1], job


def _pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB").tobytes()


def test_a_lora_tag_is_the_same_as_listing_the_lora(env):
    service, ledger = env
    caller = _caller(ledger)
    listed, _ = _png(service, caller, _req(resources=[{"id": "tag-lora-1", "strength": 0.7}]))
    by_id, _ = _png(service, caller, _req(prompt="a red fox in the snow <lora:tag-lora-1:0.7>"))
    by_name, _ = _png(service, caller, _req(prompt="a red fox in the snow <lora:Style 1:0.7>"))
    plain, _ = _png(service, caller, _req())
    assert _pixels(listed) == _pixels(by_id) == _pixels(by_name) != _pixels(plain)
    assert service.quote(caller, _req(prompt="x <lora:tag-lora-1:0.7>")).total == \
        service.quote(caller, _req(prompt="x", resources=[{"id": "tag-lora-1", "strength": 0.7}])).total


def test_lora_tags_are_refused_with_stable_codes(env):
    service, ledger = env
    caller = _caller(ledger)
    for prompt, code in [("a fox <lora:nobody-has-this:1>", "lora_tag_unknown"),
                         ("a fox <lora:tag-lora-1:0.5:1>", "lora_tag_split_strength"),
                         ("a fox <hypernet:thing:1>", "extra_network_unsupported")]:
        with pytest.raises(InvalidRequest) as err:
            asyncio.run(service.submit(caller, _req(prompt=prompt)))
        assert err.value.code == code
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(service.submit(caller, _req(prompt="a <lora:tag-lora-1:1>", resources=[{"id": "tag-lora-1"}])))
    assert err.value.code == "lora_listed_twice"


def test_a_tagged_lora_passes_the_likeness_check(env):
    service, ledger = env
    caller = _caller(ledger)
    Moderation(service.registry, service.resource_cache, service.safety).add_likeness(
        "tag-lora-11", "A. Person", reason="takedown request")
    with pytest.raises(SafetyBlocked) as err:
        asyncio.run(service.submit(caller, _req(prompt="a fox <lora:tag-lora-11:0.8>")))
    assert any(r.startswith("likeness") for r in err.value.details["rules"])
    assert ledger.balance(user_account(caller.user_id)).available == 1000


def test_a_delivered_png_regenerates_from_its_own_infotext(env):
    service, ledger = env
    caller = _caller(ledger)
    first, job = _png(service, caller, _req(
        prompt="a (red:1.3) fox BREAK in [the snow:a forest:2]", negative_prompt="blurry, [ugly]",
        sampler="DPM++ 2M", scheduler="Karras", clip_skip=2, cfg_scale=6.5,
        resources=[{"id": "tag-lora-1", "strength": 0.6}], hires={"scale": 1.5, "denoise": 0.5, "steps": 2}))
    infotext = Image.open(io.BytesIO(first)).info["parameters"]
    assert "Schedule type: Karras" in infotext and "<lora:tag-lora-1:0.6>" in infotext
    again, _ = _png(service, caller, GenerationRequest.model_validate({"infotext": infotext}))
    assert _pixels(again) == _pixels(first)
    assert len(set(_pixels(first))) > 16  # a real image, not a flat one


def test_hires_bounds_are_the_workers():
    req = _req(hires={"scale": 2.0})
    assert hires_spec(req, (64, 64), max_pixels=128 * 128).target_size(64, 64) == (128, 128)
    with pytest.raises(InvalidRequest) as err:
        hires_spec(req, (72, 64), max_pixels=128 * 128)
    assert err.value.code == "hires_too_large"
    with pytest.raises(InvalidRequest) as err:
        hires_spec(_req(), (256, 256), max_pixels=128 * 128)
    assert err.value.code == "size_too_large"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_readable_infotext(env, fmt):
    from genserve.engine.infotext import image_format, read_infotext_text

    service, ledger = env
    caller = _caller(ledger)
    data, job = _png(service, caller, _req(output_format=fmt, quality=80, sampler="Euler", scheduler="Karras"))
    assert image_format(data) == fmt and job.images[0].key.endswith("." + {"jpeg": "jpg", "webp": "webp"}[fmt])
    text = read_infotext_text(data)
    assert text == job.infotext and "Sampler: Euler, Schedule type: Karras" in text and "Seed: 99" in text
    again = GenerationRequest.model_validate({"infotext": text})
    assert (again.sampler.value, again.seed, again.steps) == ("Euler Karras", 99, 3)


def test_http_samplers_list_and_a1111_body_with_a_jpeg(env):
    import httpx

    from genserve.ingress import create_api

    service, ledger = env
    caller = _caller(ledger)
    app = create_api(service, Moderation(service.registry, service.resource_cache, service.safety),
                     start_background=False)
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": caller.user_id}
    body = {"prompt": "a (red:1.1) fox <lora:tag-lora-1:0.5>", "checkpoint": "tiny-sd1", "steps": 2, "seed": -1,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "output_format": "jpeg"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            samplers = await client.get("/v1/samplers", headers=headers)
            job = await client.post("/v1/generations?wait=true", json=body, headers=headers)
            image = await client.get(f"/v1/generations/{job.json()['id']}/images/0", headers=headers)
            return samplers, job, image

    samplers, job, image = asyncio.run(go())
    assert samplers.status_code == 200 and "DPM++ 3M SDE Karras" in {r["name"] for r in samplers.json()}
    assert job.status_code in (200, 201, 202) and job.json()["status"] == "succeeded", job.text
    assert image.headers["content-type"] == "image/jpeg"
    assert "Schedule type: Karras" in job.json()["infotext"] and "<lora:tag-lora-1:0.5>" in job.json()["infotext"]


def test_draft_mode_runs_the_familys_fast_path_at_its_own_price(env):
    from genserve.resources.catalog import DraftEntry

    service, ledger = env
    caller = _caller(ledger)
    catalog = service.admission.catalog
    with pytest.raises(InvalidRequest) as err:
        service.quote(caller, _req(draft=True))
    assert err.value.code == "draft_unavailable"
    sd1 = catalog.families["sd1"].model_copy(update={"draft": DraftEntry(lora="tag-lora-1", steps=2, cfg_scale=1.0)})
    service.admission.catalog = catalog.model_copy(update={"families": {**catalog.families, "sd1": sd1}})
    try:
        full = service.quote(caller, _req(steps=30))
        draft_quote = service.quote(caller, _req(steps=30, draft=True))
        full_item, draft_item = (next(i.detail for i in q.items if i.name == "image") for q in (full, draft_quote))
        assert "30 steps" in full_item and "2 steps" in draft_item  # priced at the draft's steps
        assert draft_quote.total <= full.total
        assert not any(i.name == "extra_resources" for i in draft_quote.items)
        data, job = _png(service, caller, _req(steps=30, draft=True))
        info = Image.open(io.BytesIO(data)).info["parameters"]
        assert "Steps: 2," in info and "Sampler: LCM" in info and "CFG scale: 1," in info
        assert "<lora:tag-lora-1:1>" in info
    finally:
        service.admission.catalog = catalog


def test_a_checkpoint_is_found_by_its_name_as_infotext_names_it(env, tiny_models):
    service, ledger = env
    caller = _caller(ledger)
    service.registry.publish(tiny_models["sd1"].diffusers_dir, id="named-ckpt", kind="checkpoint", family="sd1",
                             name="My Model v1")
    quote = service.quote(caller, GenerationRequest.model_validate(
        {"infotext": "a fox\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: My Model v1"}))
    assert quote.total >= 1
    with pytest.raises(Exception) as err:
        service.quote(caller, _req(checkpoint="No Such Model"))
    assert err.value.code == "resource_not_found"


@pytest.fixture(scope="module")
def vaes(env, tmp_path_factory):
    """A registered SD1 VAE (A1111's LDM layout, other weights than the tiny checkpoint's own) and an SDXL one."""
    from genserve.tinymodels import write_tiny_vae

    service, _ = env
    root = tmp_path_factory.mktemp("vaes")
    service.registry.publish(write_tiny_vae(root / "sd1-vae.safetensors", seed=5), id="tiny-vae-sd1", kind="vae",
                             family="sd1", name="tiny_vae_ft")
    service.registry.publish(write_tiny_vae(root / "xl-vae.safetensors", seed=6, layout="diffusers"),
                             id="tiny-vae-sdxl", kind="vae", family="sdxl")
    return service.registry.get("tiny-vae-sd1")


def test_a_registered_vae_decodes_the_job_and_the_next_job_gets_the_checkpoints_own(env, vaes):
    service, ledger = env
    caller = _caller(ledger)
    hires = {"scale": 1.5, "denoise": 0.5, "steps": 2}
    own, own_job = _png(service, caller, _req(hires=hires))
    chosen, job = _png(service, caller, _req(hires=hires, vae="tiny-vae-sd1"))
    after, _ = _png(service, caller, _req(hires=hires))
    assert _pixels(chosen) != _pixels(own) == _pixels(after)
    assert "VAE" not in own_job.infotext
    assert f"Model: tiny-sd1, VAE hash: {vaes.sha256[:10]}, VAE: tiny_vae_ft," in job.infotext
    # the infotext names the VAE as A1111 does, and brings it back (A1111 writes the file's name)
    again, _ = _png(service, caller, GenerationRequest.model_validate({"infotext": job.infotext}))
    assert _pixels(again) == _pixels(chosen)
    by_file_name = GenerationRequest.model_validate({"infotext": job.infotext.replace(
        "VAE: tiny_vae_ft", "VAE: tiny_vae_ft.safetensors")})
    assert service.quote(caller, by_file_name).total == service.quote(caller, _req(hires=hires)).total  # no charge
    # beside an infotext, `"vae": null` asks for the checkpoint's own (fields next to it win)
    assert GenerationRequest.model_validate({"infotext": job.infotext, "vae": None}).vae is None
    assert "tiny-vae-sd1" in [r["id"] for r in service.jobs.get(job.id).request["resources"]]


@pytest.mark.parametrize("vae, code", [("no-such-vae", "vae_not_found"), ("tag-lora-1", "not_a_vae"),
                                       ("tiny-vae-sdxl", "family_mismatch")])
def test_a_vae_that_cannot_be_used_is_refused_before_anything_is_charged(env, vaes, vae, code):
    from genserve.core.errors import GenserveError

    service, ledger = env
    caller = _caller(ledger)
    with pytest.raises(GenserveError) as err:
        asyncio.run(service.submit(caller, _req(vae=vae)))
    assert err.value.code == code
    balance = ledger.balance(user_account(caller.user_id))
    assert (balance.available, balance.held) == (1000, 0)
