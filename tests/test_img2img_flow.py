"""img2img, inpaint and face fix through the generation service (real engine, ledger, audit log, object
store, NudeNet). Refusals are checked for what they must leave behind: nothing held or charged, no job
row, nothing stored, an audit row (`img2img_support.assert_refused`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import uuid
import zlib

import numpy as np
import pytest
from img2img_support import (
    BREAST,
    FACE,
    GRANT,
    assert_refused,
    b64_image,
    img2img_request,
    landscape_image,
    new_caller,
    run_job,
    scanner_reporting,
    service_env,
    worker_detector,
)
from PIL import Image, ImageDraw

from genserve.billing.ledger import user_account
from genserve.billing.pricing import Pricing
from genserve.core.errors import SafetyBlocked
from genserve.engine.infotext import read_infotext_text
from genserve.generation.jobs import image_prefix
from genserve.generation.protocol import GenerationRequest
from genserve.generation.worker.errors import InputImageChanged
from genserve.generation.worker.wire import InitSpec, WorkerRequest
from safety.audit_log import AuditLog
from safety.image_scan import ImageScanner
from safety.levels import NsfwLevel


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    yield from service_env(tmp_path_factory, tiny_models)


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_benign_img2img_runs_is_priced_by_the_steps_it_runs_and_leaves_no_input_behind(env, checkpoint):
    service, ledger, _, store = env
    caller = new_caller(ledger)
    request = img2img_request(checkpoint=checkpoint, steps=8, denoise=0.5)
    quote = service.quote(caller, request)
    assert "4 steps" in quote.items[0].detail and "img2img" in quote.items[0].detail  # 8 x 0.5, as A1111 runs
    job = run_job(service, caller, request)  # the input is scanned by the real NudeNet
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
    caller, other = new_caller(ledger), new_caller(ledger)
    first = run_job(service, caller, GenerationRequest.model_validate(
        {"prompt": "a hill", "checkpoint": "tiny-sd1", "steps": 2, "seed": 5}))
    ref = {"job_id": first.id, "index": 0}
    second = run_job(service, caller, img2img_request(init_image=ref, denoise=0.0))
    assert second.status.value == "succeeded", second.error
    # strength 0: the delivered image comes back (re-encoded: the PNG differs only by its infotext)
    a = Image.open(io.BytesIO(service.image(caller, first.id, 0)[1])).convert("RGB")
    b = Image.open(io.BytesIO(service.image(caller, second.id, 0)[1])).convert("RGB")
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert assert_refused(env, other, img2img_request(init_image=ref)).code == "input_image_not_found"


def test_inpaint_end_to_end_keeps_the_unmasked_pixels(env):
    service, ledger, _, _ = env
    caller = new_caller(ledger)
    source = landscape_image(96, 64)
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 30, 30), fill=255)
    job = run_job(service, caller, img2img_request(workflow="inpaint", mask={"data": b64_image(mask)}, mask_blur=0,
                                            init_image={"data": b64_image(source)}, denoise=1.0))
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
    landscape_image().save(gif, format="GIF")
    cases = [
        ({"init_image": {"data": base64.b64encode(bytes(data)).decode()}}, "input_image_bomb"),
        ({"init_image": {"data": base64.b64encode(gif.getvalue()).decode()}}, "input_image_format"),
        ({"init_image": {"data": "A" * (12 << 20)}}, "input_image_too_large"),
        ({"init_image": {"data": b64_image(Image.new("RGB", (4200, 8)))}}, "input_image_dimensions"),
        ({"workflow": "inpaint", "init_image": {"data": b64_image(Image.new("RGB", (2100, 2100)))},  # over max_pixels
          "mask": {"data": b64_image(Image.new("L", (2100, 2100), 255))}}, "input_image_dimensions"),
        ({"init_image": None}, "input_image_missing"),
        ({"workflow": "inpaint"}, "input_image_missing"),
        ({"workflow": "txt2img"}, "input_image_unexpected"),
        ({"hires": {"scale": 1.5}}, "input_image_with_hires"),
    ]
    for change, code in cases:
        assert assert_refused(env, new_caller(ledger), img2img_request(**change)).code == code, change


def test_the_nudify_pattern_is_refused_before_any_hold_and_audited(env):
    service, ledger, _, _ = env
    with scanner_reporting(service, [FACE]):  # the detector reports a face in the synthetic portrait
        mature_prompt = new_caller(ledger, NsfwLevel.X)
        error = assert_refused(env, mature_prompt, img2img_request(prompt="make her naked, nsfw"))
        assert isinstance(error, SafetyBlocked) and error.code == "input_image_nudify"
        assert "input.likeness_nudify" in error.details["rules"]
        rows = AuditLog(service.db.session).query(kind="input_image", user_id=mature_prompt.user_id)
        assert rows[0].action == "block" and "input.likeness_nudify" in rows[0].rules
        # a mature level alone is enough: the face could be turned nude at that level
        mature_level = new_caller(ledger, NsfwLevel.R)
        assert assert_refused(env, mature_level, img2img_request()).code == "input_image_nudify"
        # a face, a benign prompt and a PG13 level: a portrait made autumnal is fine
        job = run_job(service, new_caller(ledger), img2img_request())
        assert job.status.value == "succeeded", job.error


def test_input_scan_refusals(env):
    service, ledger, _, _ = env
    with scanner_reporting(service, [BREAST]):  # the detector reports exposure: level R by the real thresholds
        error = assert_refused(env, new_caller(ledger, NsfwLevel.PG13), img2img_request())
        assert error.code == "input_image_level" and "input.level_above_allowed" in error.details["rules"]
    with scanner_reporting(service, minor=True):  # the age slot reports a minor
        assert assert_refused(env, new_caller(ledger, NsfwLevel.X), img2img_request()).code == "input_image_minor"
        job = run_job(service, new_caller(ledger, NsfwLevel.PG13), img2img_request())  # nothing mature: allowed
        assert job.status.value == "succeeded", job.error
    with scanner_reporting(service, error="onnxruntime failed"):  # fail closed
        error = assert_refused(env, new_caller(ledger), img2img_request())
        assert error.code == "input_image_scan_failed"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_face_fix_end_to_end_changes_only_the_face_box_and_is_priced(env, family):
    """The worker's NudeNet detector is forced to report one face box in the generated image (a tiny
    random model draws no face); the policy and thresholds that judge the image are the real ones."""
    service, ledger, _, _ = env
    box = [20, 16, 16, 16]  # x, y, w, h as NudeNet reports it

    class FaceDetector:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            return [{"class": "FACE_FEMALE", "score": 0.8, "box": box}]

    with worker_detector(service, family, FaceDetector()):
        caller = new_caller(ledger)
        body = {"prompt": "a portrait", "checkpoint": f"tiny-{family}", "steps": 4, "seed": 3}
        plain = GenerationRequest.model_validate(body)
        fixed = GenerationRequest.model_validate({**body, "face_fix": {"denoise": 1.0, "mask_blur": 2, "padding": 8}})
        quote, base = service.quote(caller, fixed), service.quote(caller, plain)
        assert [i.name for i in quote.items if i.name == "face_fix"] and quote.total >= base.total
        a, b = run_job(service, caller, plain), run_job(service, caller, fixed)
        assert a.status.value == b.status.value == "succeeded", (a.error, b.error)
        assert b.charged == quote.total and "ADetailer denoising strength: 1" in (b.infotext or "")
    one = np.asarray(Image.open(io.BytesIO(service.image(caller, a.id, 0)[1])).convert("RGB"), np.int16)
    two = np.asarray(Image.open(io.BytesIO(service.image(caller, b.id, 0)[1])).convert("RGB"), np.int16)
    delta = np.abs(one - two).max(axis=2)
    reach = 4 + 3 * 2 + 1
    outside = np.ones(delta.shape, bool)
    outside[box[1] - reach:box[1] + box[3] + reach, box[0] - reach:box[0] + box[2] + reach] = False
    assert delta[outside].max() <= 1 and delta[box[1]:box[1] + box[3], box[0]:box[0] + box[2]].mean() > 5


def test_a_face_fix_failing_on_one_image_withholds_only_that_image_and_charges_the_rest(env):
    """The worker's NudeNet detector is forced to report a face, and to fail on the face fix's second call
    (the safety scan's own calls, on its scan thread, are answered normally): image 0 is fixed and
    delivered, image 1 is withheld as `face_fix_failed` and not charged."""
    service, ledger, _, _ = env
    calls = []

    class FlakyDetector:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            if not threading.current_thread().name.startswith("scan-"):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("detector crashed")
            return [{"class": "FACE_MALE", "score": 0.8, "box": [8, 8, 20, 20]}]

    with worker_detector(service, "sd1", FlakyDetector()):
        caller = new_caller(ledger)
        request = GenerationRequest.model_validate({"prompt": "two portraits", "checkpoint": "tiny-sd1", "steps": 2,
                                                    "seed": 8, "quantity": 2, "face_fix": {"max_faces": 1}})
        quote = service.quote(caller, request)
        job = run_job(service, caller, request)
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
    error = assert_refused(env, new_caller(ledger, NsfwLevel.R), img2img_request(prompt=prompt))
    assert error.code == "input_image_minor" and "input.minor_mature" in error.details["rules"]
    job = run_job(service, new_caller(ledger, NsfwLevel.PG13), img2img_request(prompt=prompt))
    assert job.status.value == "succeeded", job.error


def test_the_worker_uses_only_the_input_it_was_admitted_with(env):
    service, _, _, store = env
    core = service.workers.cores["sd1"]
    job_id = uuid.uuid4().hex
    png = io.BytesIO()
    landscape_image().save(png, format="PNG")
    key = f"images/someone/{job_id}/input-0000.png"
    store.put_bytes(key, png.getvalue(), content_type="image/png")
    digest = hashlib.sha256(png.getvalue()).hexdigest()

    def request(job: str, sha: str) -> WorkerRequest:
        return WorkerRequest(job_id=job, checkpoint_id="tiny-sd1", prompt="x", seeds=[1], width=64, height=64,
                             init=InitSpec(workflow="img2img", image_key=key, image_sha256=sha))

    image, mask = core.init_images(request(job_id, digest))
    assert image.size == (64, 64) and mask is None
    with pytest.raises(InputImageChanged):
        core.init_images(request(job_id, "0" * 64))  # the stored object is not the one judged
    with pytest.raises(InputImageChanged):
        core.init_images(request(uuid.uuid4().hex, digest))  # another job's input
    store.delete(key)


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
        error = assert_refused(env, new_caller(ledger), img2img_request(
            workflow="inpaint", init_image={"data": b64_image(canvas)}, mask={"data": b64_image(mask)},
            inpaint_only_masked=True))
        assert error.code == "input_image_level" and "input.level_above_allowed" in error.details["rules"]
    finally:
        gate.input_scanner = saved


def test_a_face_input_at_pg13_is_guarded_at_the_edit_and_at_delivery(env):
    """The input scanner's detector reports a face (no photograph of a person can be a fixture); for the
    delivery, the worker's NudeNet detector reports a face and exposure on the output (no nude image
    either). Thresholds, the scan, the policy and the flow are the real ones."""
    service, ledger, _, _ = env
    with scanner_reporting(service, [FACE]):
        error = assert_refused(env, new_caller(ledger), img2img_request(prompt="a woman in a see-through wet shirt"))
        assert error.code == "input_image_nudify"
        nudenet = service.workers.cores["sd1"].scanner.scanners[0]
        real = nudenet.detector

        class Exposed:
            def detect(self, bgr):  # noqa: ANN001, ANN202
                return [dict(FACE), dict(BREAST)]

        nudenet.detector = Exposed()
        try:
            job = run_job(service, new_caller(ledger), img2img_request(prompt="make it an oil painting"))
        finally:
            nudenet.detector = real
    assert job.status.value == "blocked"
    assert [w.reasons for w in job.withheld] == [["edited_face_with_exposure"]]


def test_an_input_that_cannot_be_stored_fails_its_job_and_refunds_it(env, monkeypatch):
    """The object store refusing the write (an outage; the store itself is real) after the job row
    exists: the job ends failed with the store's code, the hold is released, nothing is left stored."""
    from genserve.core.errors import StorageError

    service, ledger, db, store = env
    caller = new_caller(ledger)
    real_put = store.put_bytes

    def failing_put(key, data, content_type=None, metadata=None):  # noqa: ANN001, ANN202
        if "/input-" in key:
            raise StorageError("the object store is unavailable")
        return real_put(key, data, content_type=content_type, metadata=metadata)

    monkeypatch.setattr(store, "put_bytes", failing_put)
    with pytest.raises(StorageError):
        run_job(service, caller, img2img_request())
    from sqlalchemy import select

    from genserve.generation.jobs import GenerationJob

    with db.session() as s:
        [job] = s.scalars(select(GenerationJob).where(GenerationJob.user_id == caller.user_id)).all()
    assert job.status == "failed" and job.error_code == "storage_error"
    balance = ledger.balance(user_account(caller.user_id))
    assert balance.available == GRANT and balance.held == 0
    assert list(store.list(image_prefix(caller.user_id, job.id))) == []


def test_a_retry_that_loses_the_race_for_its_idempotency_key_stores_no_input(env, monkeypatch):
    """Two submits with one idempotency key: the second finds the job only when it tries to create it
    (its lookup is made to miss, as when both look before either has created). The first job has ended
    and deleted its input; the second must not write it again."""
    service, ledger, _, store = env
    caller = new_caller(ledger)
    request = img2img_request(idempotency_key="race-1")
    first = run_job(service, caller, request)
    assert first.status.value == "succeeded", first.error
    real_find, calls = service.jobs.find_idempotent, []

    def late_find(*args, **kw):  # noqa: ANN002, ANN003, ANN202 - the first look misses, the insert's finds it
        calls.append(args)
        return None if len(calls) == 1 else real_find(*args, **kw)

    monkeypatch.setattr(service.jobs, "find_idempotent", late_find)
    job, running = service._accept(caller, request)
    assert job.id == first.id and running is None
    assert not [k for k in store.list(image_prefix(caller.user_id, first.id)) if "/input-" in k or "/mask-" in k]
    assert ledger.balance(user_account(caller.user_id)).held == 0


def test_face_passes_held_but_not_run_are_given_back_at_capture(env, monkeypatch):
    """The face fix is held for its most faces per image; an image with fewer faces pays only the passes
    it ran. The worker's NudeNet detector is forced to report one face (a tiny model draws none); the
    price list makes a pass worth whole buzz at this tiny size, so the refund is visible."""
    service, ledger, _, _ = env
    prices = service.admission.pricing.prices
    generation = prices.generation.model_copy(update={"face_fix_permille": 40_000_000})
    monkeypatch.setattr(service.admission, "pricing", Pricing(prices.model_copy(update={"generation": generation})))

    class OneFace:
        def detect(self, bgr):  # noqa: ANN001, ANN202
            return [{"class": "FACE_FEMALE", "score": 0.8, "box": [20, 16, 16, 16]}]

    with worker_detector(service, "sd1", OneFace()):
        caller = new_caller(ledger)
        request = GenerationRequest.model_validate({"prompt": "a portrait", "checkpoint": "tiny-sd1", "steps": 5,
                                                    "seed": 4, "quantity": 2,
                                                    "face_fix": {"max_faces": 3, "denoise": 1.0}})
        plan = service.admission.plan(caller, request)
        job = run_job(service, caller, request)
    assert job.status.value == "succeeded" and len(job.images) == 2, job.error
    quote = plan.quote
    refund = quote.face_fix_refund(2, 2)  # two images, one pass each, three held each
    assert refund > 0 and refund == 4 * quote.face_pass_millibuzz // 1000
    assert job.charged == quote.total - refund
    assert ledger.balance(user_account(caller.user_id)).available == GRANT - job.charged
    assert ledger.balance(user_account(caller.user_id)).held == 0


def test_a_user_whose_inputs_keep_being_refused_is_paused_from_edits_without_a_scan(env):
    """Each refusal names its rule; after `input_strikes` of them within the window a user's next input
    is refused before it is scanned (so searching for a variant the scan misses ends), while another
    user is unaffected. The input scanner's detector reports a face (no photograph can be a fixture)."""
    service, ledger, _, _ = env
    strikes = service.safety.config.input_strikes
    caller, other = new_caller(ledger), new_caller(ledger)
    with scanner_reporting(service, [FACE]):
        for _ in range(strikes):
            error = assert_refused(env, caller, img2img_request(prompt="a woman in a see-through wet shirt"))
            assert error.code == "input_image_nudify"
    with scanner_reporting(service, error="a paused user's input must not be scanned"):
        error = assert_refused(env, caller, img2img_request())
    assert error.code == "input_image_strikes" and error.details["rules"] == ["input.strikes"]
    assert run_job(service, other, img2img_request()).status.value == "succeeded"
    rows = AuditLog(service.db.session).query(kind="input_image", user_id=caller.user_id, limit=10)
    assert rows[0].rules == ["input.strikes"] and len(rows) == strikes + 1
