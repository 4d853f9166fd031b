"""img2img and inpaint through the generation service (real engine, ledger, audit log, object store, NudeNet).

Refusals are checked for what they must leave behind: nothing held or charged, no job row, nothing
stored, an audit row. Where a test needs the scanner to see a face, nudity or a minor in a synthetic
input, it replaces only the NudeNet detector's (or the age slot's) raw output, saying so; the policy
that judges that output is the real one.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import os
import threading
import time
import uuid
import zlib
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from generation_support import in_process_service
from PIL import Image, ImageDraw
from sqlalchemy import select
from typer.testing import CliRunner

from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.cli import app as cli_app
from genserve.core.config import load_settings
from genserve.core.db import Database
from genserve.core.errors import GenserveError, SafetyBlocked
from genserve.core.storage import object_store_from_settings
from genserve.engine.infotext import read_infotext_text
from genserve.generation.admission import Caller
from genserve.generation.jobs import GenerationJob, image_prefix
from genserve.generation.protocol import GenerationRequest
from genserve.generation.uploads_api import build_upload_router
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.moderation_api import build_moderation_router
from safety.audit_log import AuditLog
from safety.image_scan import ImageScanner, ScannerOutput
from safety.levels import NsfwLevel

GRANT = 1000


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("img2img")
    data = root / "data"
    data.mkdir()
    os.symlink(tiny_models["sd1"].root.parent, data / "models")
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(data)},
                             overrides={"worker": {"resource_cache_dir": str(root / "cache")}})
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store, build_models=False)
    scanner = ImageScanner.from_config(settings.config_path(settings.safety.rules_dir))  # real NudeNet
    service = in_process_service(settings, db=db, store=store, scanner=scanner)
    yield service, Ledger(db, settings.billing), db, store
    db.dispose()


def _caller(ledger: Ledger, level: NsfwLevel = NsfwLevel.PG13) -> Caller:
    uid = f"u{uuid.uuid4().hex[:10]}"
    ledger.grant(user_account(uid), GRANT, f"test-grant:{uid}")
    return Caller(user_id=uid, max_nsfw_level=level, request_id=uuid.uuid4().hex)


def _landscape(width: int = 64, height: int = 64) -> Image.Image:
    """Sky, hills, a sun: no person in it."""
    image = Image.new("RGB", (width, height), (110, 160, 230))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, height), (0, height * 2 // 3), (width // 3, height // 2), (width, height * 3 // 4),
                  (width, height)], fill=(40, 120, 50))
    draw.ellipse((width * 2 // 3, 4, width * 2 // 3 + 12, 16), fill=(250, 220, 60))
    return image


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def _request(**kw) -> GenerationRequest:
    body = {"prompt": "a landscape in autumn", "checkpoint": "tiny-sd1", "steps": 4, "seed": 99,
            "workflow": "img2img", "init_image": {"data": _b64(_landscape())}, "denoise": 0.5, **kw}
    return GenerationRequest.model_validate(body)


def _finish(service, caller, request):  # noqa: ANN001, ANN202
    async def go():  # noqa: ANN202
        view, _ = await service.submit(caller, request)
        return await service.wait(caller, view.id, 120)

    return asyncio.run(go())


def _refused(env, caller, request) -> GenserveError:  # noqa: ANN001
    """The refusal, checked to have left nothing: no hold, no charge, no job row, nothing stored."""
    service, ledger, db, store = env
    with pytest.raises(GenserveError) as info:
        asyncio.run(service.submit(caller, request))
    balance = ledger.balance(user_account(caller.user_id))
    assert balance.available == GRANT and balance.held == 0
    with db.session() as s:
        assert s.scalars(select(GenerationJob).where(GenerationJob.user_id == caller.user_id)).all() == []
    assert list(store.list(f"images/{caller.user_id}/")) == []
    return info.value


@contextmanager
def _input_scanner(service, detections=(), minor=False, error=None):  # noqa: ANN001
    """The input scanner with NudeNet's detector replaced by one that reports `detections` (the raw
    output the real model would give for such an image) and, with `minor`, an age slot reporting a
    minor. The thresholds and the policy are the real ones."""

    class Detector:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            if error:
                raise RuntimeError(error)
            return [dict(d) for d in detections]

    class AgeSlot:
        name = "age"

        def scan(self, image):  # noqa: ANN001, ANN202
            return ScannerOutput(NsfwLevel.PG, (), minor)

    gate = service.safety
    saved = gate.input_scanner
    rules = service.settings.config_path(service.settings.safety.rules_dir)
    gate.input_scanner = ImageScanner.from_config(rules, detector=Detector(), extra=[AgeSlot()])
    try:
        yield
    finally:
        gate.input_scanner = saved


FACE = {"class": "FACE_FEMALE", "score": 0.9, "box": [20, 10, 24, 24]}
BREAST = {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [20, 36, 20, 16]}


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_benign_img2img_runs_is_priced_by_the_steps_it_runs_and_leaves_no_input_behind(env, checkpoint):
    service, ledger, _, store = env
    caller = _caller(ledger)
    request = _request(checkpoint=checkpoint, steps=8, denoise=0.5)
    quote = service.quote(caller, request)
    assert "4 steps" in quote.items[0].detail and "img2img" in quote.items[0].detail  # 8 x 0.5, as A1111 runs
    job = _finish(service, caller, request)  # the input is scanned by the real NudeNet
    assert job.status.value == "succeeded", job.error
    assert job.charged == quote.total
    assert ledger.balance(user_account(caller.user_id)).available == GRANT - quote.total
    info = job.infotext or ""
    assert "Denoising strength: 0.5" in info and "Steps: 8" in info
    assert not [k for k in store.list(image_prefix(caller.user_id, job.id)) if "/input-" in k]
    audit = AuditLog(service.db.session).query(kind="input_image", user_id=caller.user_id)
    assert [r.action for r in audit] == ["allow", "allow"]  # the quote's check and the submit's


def test_a_delivered_image_is_an_input_for_its_owner_only(env):
    service, ledger, _, _ = env
    caller, other = _caller(ledger), _caller(ledger)
    first = _finish(service, caller, GenerationRequest.model_validate(
        {"prompt": "a hill", "checkpoint": "tiny-sd1", "steps": 2, "seed": 5}))
    ref = {"job_id": first.id, "index": 0}
    second = _finish(service, caller, _request(init_image=ref, denoise=0.0))
    assert second.status.value == "succeeded", second.error
    # strength 0: the delivered image comes back (re-encoded: the PNG differs only by its infotext)
    a = Image.open(io.BytesIO(service.image(caller, first.id, 0)[1])).convert("RGB")
    b = Image.open(io.BytesIO(service.image(caller, second.id, 0)[1])).convert("RGB")
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert _refused(env, other, _request(init_image=ref)).code == "input_image_not_found"


def test_inpaint_end_to_end_keeps_the_unmasked_pixels(env):
    service, ledger, _, _ = env
    caller = _caller(ledger)
    source = _landscape(96, 64)
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 30, 30), fill=255)
    job = _finish(service, caller, _request(workflow="inpaint", mask={"data": _b64(mask)}, mask_blur=0,
                                            init_image={"data": _b64(source)}, denoise=1.0))
    assert job.status.value == "succeeded", job.error
    out = Image.open(io.BytesIO(service.image(caller, job.id, 0)[1])).convert("RGB")
    assert out.size == source.size
    keep = np.asarray(mask) == 0
    delta = np.abs(np.asarray(out, np.int16) - np.asarray(source, np.int16)).max(axis=2)
    assert delta[keep].max() == 0 and delta[~keep].mean() > 5
    assert "Inpaint area: Only masked" in (read_infotext_text(service.image(caller, job.id, 0)[1]) or "")


def test_hostile_inputs_are_refused_with_their_codes_and_cost_nothing(env):
    _, ledger, _, _ = env
    bomb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bomb, format="PNG")
    data = bytearray(bomb.getvalue())
    data[16:24] = (60000).to_bytes(4, "big") * 2  # the header now declares 60000 x 60000
    data[29:33] = (zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
    gif = io.BytesIO()
    _landscape().save(gif, format="GIF")
    cases = [
        ({"init_image": {"data": base64.b64encode(bytes(data)).decode()}}, "input_image_bomb"),
        ({"init_image": {"data": base64.b64encode(gif.getvalue()).decode()}}, "input_image_format"),
        ({"init_image": {"data": "A" * (12 << 20)}}, "input_image_too_large"),
        ({"init_image": {"data": _b64(Image.new("RGB", (4200, 8)))}}, "input_image_dimensions"),
        ({"workflow": "inpaint", "init_image": {"data": _b64(Image.new("RGB", (2100, 2100)))},  # over max_pixels
          "mask": {"data": _b64(Image.new("L", (2100, 2100), 255))}}, "input_image_dimensions"),
        ({"init_image": None}, "input_image_missing"),
        ({"workflow": "inpaint"}, "input_image_missing"),
        ({"workflow": "txt2img"}, "input_image_unexpected"),
        ({"hires": {"scale": 1.5}}, "input_image_with_hires"),
    ]
    for change, code in cases:
        assert _refused(env, _caller(ledger), _request(**change)).code == code, change


def test_the_nudify_pattern_is_refused_before_any_hold_and_audited(env):
    service, ledger, _, _ = env
    with _input_scanner(service, [FACE]):  # the detector reports a face in the synthetic portrait
        mature_prompt = _caller(ledger, NsfwLevel.X)
        error = _refused(env, mature_prompt, _request(prompt="make her naked, nsfw"))
        assert isinstance(error, SafetyBlocked) and error.code == "input_image_nudify"
        assert "input.likeness_nudify" in error.details["rules"]
        rows = AuditLog(service.db.session).query(kind="input_image", user_id=mature_prompt.user_id)
        assert rows[0].action == "block" and "input.likeness_nudify" in rows[0].rules
        # a mature level alone is enough: the face could be turned nude at that level
        mature_level = _caller(ledger, NsfwLevel.R)
        assert _refused(env, mature_level, _request()).code == "input_image_nudify"
        # a face, a benign prompt and a PG13 level: a portrait made autumnal is fine
        job = _finish(service, _caller(ledger), _request())
        assert job.status.value == "succeeded", job.error


def test_input_scan_refusals(env):
    service, ledger, _, _ = env
    with _input_scanner(service, [BREAST]):  # the detector reports exposure: level R by the real thresholds
        error = _refused(env, _caller(ledger, NsfwLevel.PG13), _request())
        assert error.code == "input_image_level" and "input.level_above_allowed" in error.details["rules"]
    with _input_scanner(service, minor=True):  # the age slot reports a minor
        assert _refused(env, _caller(ledger, NsfwLevel.X), _request()).code == "input_image_minor"
        job = _finish(service, _caller(ledger, NsfwLevel.PG13), _request())  # nothing mature: allowed
        assert job.status.value == "succeeded", job.error
    with _input_scanner(service, error="onnxruntime failed"):  # fail closed
        error = _refused(env, _caller(ledger), _request())
        assert error.code == "input_image_scan_failed"


@pytest.fixture()
def http_server(env):
    """The ingress over the module's service on a loopback port (no lifespan: its exit would close the
    module-wide service for the tests after)."""
    service = env[0]
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    app = create_api(service, moderation, start_background=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def test_http_and_cli_run_img2img_and_inpaint(env, http_server, tmp_path, monkeypatch):
    service, ledger, _, _ = env
    caller = _caller(ledger)
    big = Image.effect_noise((1024, 1024), 80).convert("RGB")  # ~3 MB as PNG: past the plain 1 MiB body limit
    body = _request(init_image={"data": _b64(big)}).model_dump(mode="json", exclude_none=True)
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": caller.user_id}
    response = httpx.post(f"{http_server}/v1/generations?wait=true&timeout=120", json=body, headers=headers,
                          timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    gif = io.BytesIO()
    _landscape().save(gif, format="GIF")
    body["init_image"] = {"data": base64.b64encode(gif.getvalue()).decode()}
    refused = httpx.post(f"{http_server}/v1/generations", json=body, headers=headers, timeout=60)
    assert refused.status_code == 422 and refused.json()["code"] == "input_image_format"

    monkeypatch.setenv("GENSERVE_DATA_DIR", str(service.settings.data_dir))
    source, mask = tmp_path / "in.jpg", tmp_path / "mask.png"
    _landscape(96, 64).save(source, format="JPEG")
    cut = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(cut).rectangle((50, 20, 70, 40), fill=255)
    cut.save(mask)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli_app, ["generate", "a landscape in autumn", "--out", str(out), "--steps", "4",
                                          "--init-image", str(source), "--mask", str(mask), "--denoise", "0.8",
                                          "--face-fix",
                                          "--user", caller.user_id, "--url", http_server, "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["status"] == "succeeded" and "Mask blur: 4" in job["infotext"]
    assert "ADetailer model" in job["infotext"]  # asked for; the real NudeNet found no face to fix
    assert len(list(out.glob("*.png"))) == 1


def test_face_fix_end_to_end_changes_only_the_face_box_and_is_priced(env):
    """The worker's NudeNet detector is forced to report one face box in the generated image (a tiny
    random model draws no face); the policy and thresholds that judge the image are the real ones."""
    service, ledger, _, _ = env
    core = service.workers.cores["sd1"]
    box = [20, 16, 16, 16]  # x, y, w, h as NudeNet reports it

    class FaceDetector:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            return [{"class": "FACE_FEMALE", "score": 0.8, "box": box}]

    rules = service.settings.config_path(service.settings.safety.rules_dir)
    saved, core._scanner = core._scanner, ImageScanner.from_config(rules, detector=FaceDetector())
    try:
        caller = _caller(ledger)
        body = {"prompt": "a portrait", "checkpoint": "tiny-sd1", "steps": 4, "seed": 3}
        plain = GenerationRequest.model_validate(body)
        fixed = GenerationRequest.model_validate({**body, "face_fix": {"denoise": 1.0, "mask_blur": 2, "padding": 8}})
        quote, base = service.quote(caller, fixed), service.quote(caller, plain)
        assert [i.name for i in quote.items if i.name == "face_fix"] and quote.total >= base.total
        a, b = _finish(service, caller, plain), _finish(service, caller, fixed)
        assert a.status.value == b.status.value == "succeeded", (a.error, b.error)
        assert b.charged == quote.total and "ADetailer denoising strength: 1" in (b.infotext or "")
    finally:
        core._scanner = saved
    one = np.asarray(Image.open(io.BytesIO(service.image(caller, a.id, 0)[1])).convert("RGB"), np.int16)
    two = np.asarray(Image.open(io.BytesIO(service.image(caller, b.id, 0)[1])).convert("RGB"), np.int16)
    delta = np.abs(one - two).max(axis=2)
    reach = 4 + 3 * 2 + 1
    outside = np.ones(delta.shape, bool)
    outside[box[1] - reach:box[1] + box[3] + reach, box[0] - reach:box[0] + box[2] + reach] = False
    assert delta[outside].max() <= 1 and delta[box[1]:box[1] + box[3], box[0]:box[0] + box[2]].mean() > 5


def test_a_hash_blocklisted_input_is_refused_even_resized_and_reencoded(env):
    service, ledger, _, _ = env
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    limits = service.settings.generation.input_images
    app = create_api(service, moderation, start_background=False,
                     routers=[functools.partial(build_moderation_router, moderation, limits)])
    known = _landscape(96, 96)
    ImageDraw.Draw(known).rectangle((10, 50, 40, 90), fill=(200, 30, 90))

    async def add(body: dict, token: str = "local-admin-token") -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/admin/image-hashes", json=body, headers={"Authorization": f"Bearer {token}"})

    assert asyncio.run(add({"phash": "0" * 16}, token="local-service-token")).status_code in (401, 403)

    refused = asyncio.run(add({"image": _b64(known)}))
    assert refused.status_code == 201, refused.text
    phash = refused.json()["phash"]
    assert asyncio.run(add({"phash": phash})).json() == {"entry_id": refused.json()["entry_id"], "phash": phash,
                                                        "added": False}
    assert asyncio.run(add({"phash": phash, "image": _b64(known)})).json()["code"] == "image_hash_source"
    copy = known.resize((64, 64))  # what a re-upload goes through: resized and re-encoded
    caller = _caller(ledger)
    error = _refused(env, caller, _request(init_image={"data": _b64(copy, "JPEG")}))
    assert error.code == "input_image_hash_blocked" and "input.hash_blocklisted" in error.details["rules"]
    row = AuditLog(service.db.session).query(kind="input_image", user_id=caller.user_id)[0]
    assert row.action == "block" and row.details["hash_match"]["phash"] == phash
    # another image is not caught by it
    assert _finish(service, _caller(ledger), _request()).status.value == "succeeded"


def test_a_face_fix_failing_on_one_image_withholds_only_that_image_and_charges_the_rest(env):
    """The worker's NudeNet detector is forced to report a face, and to fail on the face fix's second call
    (the safety scan's own calls, on its scan thread, are answered normally): image 0 is fixed and
    delivered, image 1 is withheld as `face_fix_failed` and not charged."""
    service, ledger, _, _ = env
    core = service.workers.cores["sd1"]
    calls = []

    class FlakyDetector:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            if not threading.current_thread().name.startswith("scan-"):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("detector crashed")
            return [{"class": "FACE_MALE", "score": 0.8, "box": [8, 8, 20, 20]}]

    rules = service.settings.config_path(service.settings.safety.rules_dir)
    saved, core._scanner = core._scanner, ImageScanner.from_config(rules, detector=FlakyDetector())
    try:
        caller = _caller(ledger)
        request = GenerationRequest.model_validate({"prompt": "two portraits", "checkpoint": "tiny-sd1", "steps": 2,
                                                    "seed": 8, "quantity": 2, "face_fix": {"max_faces": 1}})
        quote = service.quote(caller, request)
        job = _finish(service, caller, request)
    finally:
        core._scanner = saved
    assert job.status.value == "succeeded", job.error
    assert [i.index for i in job.images] == [0]
    assert [(w.index, w.reasons) for w in job.withheld] == [(1, ["face_fix_failed"])]
    assert job.charged == quote.per_image
    assert ledger.balance(user_account(caller.user_id)).available == GRANT - quote.per_image
    rows = AuditLog(service.db.session).query(kind="postcheck", job_id=job.id)
    assert sorted((r.details["index"], r.action) for r in rows) == [(0, "allow"), (1, "block")]


def test_a_minor_in_the_prompt_with_a_mature_level_refuses_an_input_image(env):
    service, ledger, _, _ = env
    prompt = "a child playing in the park"
    error = _refused(env, _caller(ledger, NsfwLevel.R), _request(prompt=prompt))
    assert error.code == "input_image_minor" and "input.minor_mature" in error.details["rules"]
    job = _finish(service, _caller(ledger, NsfwLevel.PG13), _request(prompt=prompt))
    assert job.status.value == "succeeded", job.error


def test_multipart_upload_runs_img2img_and_bounds_each_part(env):
    service, ledger, _, _ = env
    moderation = Moderation(service.registry, service.resource_cache, service.safety)
    app = create_api(service, moderation, start_background=False,
                     routers=[functools.partial(build_upload_router, service)])
    caller = _caller(ledger)
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": caller.user_id}
    body = {"prompt": "a landscape in autumn", "checkpoint": "tiny-sd1", "steps": 4, "seed": 1,
            "workflow": "img2img", "denoise": 0.5}
    png = io.BytesIO()
    _landscape().save(png, format="PNG")

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


def test_an_only_masked_inpaint_of_a_small_photo_on_a_big_canvas_is_scanned_where_it_is_worked(env):
    """NudeNet's detector is replaced by one that reports exposure for a marked patch only when the patch
    is 24 px or more at its 320 px input, as the real model needs some size (no nude photograph can be a
    fixture); the scan, the engine's crop geometry and the policy are the real ones."""
    from test_input_guard import MARK, ScaleAwareDetector

    service, ledger, _, _ = env
    canvas = Image.new("RGB", (2048, 2048), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, 255, 255), fill=(200, 160, 140))  # a 256 px "photo" in the corner
    draw.rectangle((80, 120, 159, 199), fill=MARK)  # 80 px: 12 px once the canvas is shrunk to 320
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 100, 255, 255), fill=255)
    gate = service.safety
    saved = gate.input_scanner
    rules = service.settings.config_path(service.settings.safety.rules_dir)
    gate.input_scanner = ImageScanner.from_config(rules, detector=ScaleAwareDetector())
    try:
        assert gate.input_scanner.scan(canvas).level is NsfwLevel.PG  # what one whole-image scan saw
        error = _refused(env, _caller(ledger), _request(
            workflow="inpaint", init_image={"data": _b64(canvas)}, mask={"data": _b64(mask)},
            inpaint_only_masked=True))
        assert error.code == "input_image_level" and "input.level_above_allowed" in error.details["rules"]
    finally:
        gate.input_scanner = saved


def test_a_face_input_at_pg13_is_guarded_at_the_edit_and_at_delivery(env):
    """The input scanner's detector reports a face (no photograph of a person can be a fixture); for the
    delivery, the worker's NudeNet detector reports a face and exposure on the output (no nude image
    either). Thresholds, the scan, the policy and the flow are the real ones."""
    service, ledger, _, _ = env
    with _input_scanner(service, [FACE]):
        error = _refused(env, _caller(ledger), _request(prompt="a woman in a see-through wet shirt"))
        assert error.code == "input_image_nudify"
        nudenet = service.workers.cores["sd1"].scanner.scanners[0]
        real = nudenet.detector

        class Exposed:
            def detect(self, bgr):  # noqa: ANN001, ANN202
                return [dict(FACE), dict(BREAST)]

        nudenet.detector = Exposed()
        try:
            job = _finish(service, _caller(ledger), _request(prompt="make it an oil painting"))
        finally:
            nudenet.detector = real
    assert job.status.value == "blocked"
    assert [w.reasons for w in job.withheld] == [["edited_face_with_exposure"]]
