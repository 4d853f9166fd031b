"""Shared set-up of the img2img / inpaint / face-fix service tests: the generation service in-process
(real engine, ledger, audit log, object store, NudeNet) and helpers that check a refusal left nothing.

Where a test needs the scanner to see a face, nudity or a minor in a synthetic input, it replaces only
the NudeNet detector's (or the age slot's) raw output, saying so; the policy that judges it is real.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import uuid
from contextlib import contextmanager

import pytest
from generation_support import in_process_service
from PIL import Image, ImageDraw
from sqlalchemy import select

from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.core.config import load_settings
from genserve.core.db import Database
from genserve.core.errors import GenserveError
from genserve.core.storage import object_store_from_settings
from genserve.generation.admission import Caller
from genserve.generation.jobs import GenerationJob
from genserve.generation.protocol import GenerationRequest
from safety.image_scan import ImageScanner, ScannerOutput
from safety.levels import NsfwLevel

GRANT = 1000


def service_env(tmp_path_factory, tiny_models):  # noqa: ANN001, ANN201
    """The body of each test module's `env` fixture: (service, ledger, db, store), torn down after."""
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


def new_caller(ledger: Ledger, level: NsfwLevel = NsfwLevel.PG13) -> Caller:
    uid = f"u{uuid.uuid4().hex[:10]}"
    ledger.grant(user_account(uid), GRANT, f"test-grant:{uid}")
    return Caller(user_id=uid, max_nsfw_level=level, request_id=uuid.uuid4().hex)


def landscape_image(width: int = 64, height: int = 64) -> Image.Image:
    """Sky, hills, a sun: no person in it."""
    image = Image.new("RGB", (width, height), (110, 160, 230))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, height), (0, height * 2 // 3), (width // 3, height // 2), (width, height * 3 // 4),
                  (width, height)], fill=(40, 120, 50))
    draw.ellipse((width * 2 // 3, 4, width * 2 // 3 + 12, 16), fill=(250, 220, 60))
    return image


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def img2img_request(**kw) -> GenerationRequest:
    body = {"prompt": "a landscape in autumn", "checkpoint": "tiny-sd1", "steps": 4, "seed": 99,
            "workflow": "img2img", "init_image": {"data": b64_image(landscape_image())}, "denoise": 0.5, **kw}
    return GenerationRequest.model_validate(body)


def run_job(service, caller, request):  # noqa: ANN001, ANN202
    async def go():  # noqa: ANN202
        view, _ = await service.submit(caller, request)
        return await service.wait(caller, view.id, 120)

    return asyncio.run(go())


def assert_refused(env, caller, request) -> GenserveError:  # noqa: ANN001
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
def scanner_reporting(service, detections=(), minor=False, error=None):  # noqa: ANN001
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


@contextmanager
def worker_detector(service, family, detector):  # noqa: ANN001
    """The `family` worker's image scanner with NudeNet's detector replaced by `detector` (a tiny random
    model draws no face or body for the real one to find); its thresholds and the policy are the real
    ones. The worker's face fix uses the same detector."""
    core = service.workers.cores[family]
    rules = service.settings.config_path(service.settings.safety.rules_dir)
    saved, core._scanner = core._scanner, ImageScanner.from_config(rules, detector=detector)
    try:
        yield
    finally:
        core._scanner = saved


FACE = {"class": "FACE_FEMALE", "score": 0.9, "box": [20, 10, 24, 24]}
BREAST = {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [20, 36, 20, 16]}
