"""The generation flow without Ray: the real engine in-process, real SQLite ledger, audit log and object store.

Each test uses its own user (a fresh account and grant), so one service serves the whole module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import time
import uuid
from dataclasses import dataclass, field

import pytest
from engine_loras import make_lora, write_lora
from generation_support import in_process_service
from PIL import Image

from genserve.billing.ledger import Ledger, user_account
from genserve.bootstrap import bootstrap
from genserve.core.config import load_settings
from genserve.core.db import Database
from genserve.core.errors import (
    Conflict,
    Forbidden,
    InsufficientFunds,
    InvalidRequest,
    QueueFull,
    SafetyBlocked,
)
from genserve.core.storage import object_store_from_settings
from genserve.engine.infotext import parse_infotext
from genserve.generation.admission import Caller
from genserve.generation.jobs import (
    GenerationJob,
    JobNotFound,
    JobStatus,
    JobStore,
    image_prefix,
    new_job_id,
)
from genserve.generation.protocol import (
    GenerationRequest,
    Limits,
    NsfwLevel,
    TierLimits,
)
from genserve.generation.reaper import Reaper
from genserve.generation.service import GenerationService
from genserve.moderation import Moderation
from genserve.tinymodels import build_tiny_pipeline
from safety.audit_log import AuditLog
from safety.image_scan import ImageScanner, ScanResult
from safety.levels import NsfwLevel as ScanLevel

STEPS = 4
GRANT = 1000


@dataclass
class Env:
    service: GenerationService
    settings: object
    db: Database
    ledger: Ledger
    lora_dir: object
    users: list[str] = field(default_factory=list)

    def user(self, grant: int = GRANT, tier: str | None = None, level: NsfwLevel = NsfwLevel.PG13) -> Caller:
        uid = f"u{uuid.uuid4().hex[:10]}"
        if grant:
            self.ledger.grant(user_account(uid), grant, f"test-grant:{uid}")
        return Caller(user_id=uid, tier=tier, max_nsfw_level=level, request_id=uuid.uuid4().hex)

    def available(self, caller: Caller) -> int:
        return self.ledger.balance(user_account(caller.user_id)).available


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("service")
    data = root / "data"
    data.mkdir()
    os.symlink(tiny_models["sd1"].root.parent, data / "models")
    settings = load_settings(
        env={"GENSERVE_DATA_DIR": str(data)},
        overrides={"worker": {"resource_cache_dir": str(root / "cache")}},
    )
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store, build_models=False)
    scanner = ImageScanner.from_config(settings.config_path(settings.safety.rules_dir))  # real NudeNet
    service = in_process_service(settings, db=db, store=store, scanner=scanner)
    yield Env(service, settings, db, Ledger(db, settings.billing), root / "loras")
    db.dispose()


def _moderation(env) -> Moderation:  # noqa: ANN001
    return Moderation(env.service.registry, env.service.resource_cache, env.service.safety)


def _request(**kw) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "a red fox in the snow", "checkpoint": "tiny-sd1",
                                             "steps": STEPS, "seed": 1234, **kw})


async def _finish(service: GenerationService, caller: Caller, request: GenerationRequest, timeout: float = 60.0):
    view, _ = await service.submit(caller, request)
    return await service.wait(caller, view.id, timeout)


def _run(coro):
    return asyncio.run(coro)


def _lora(env: Env, family: str, seed: int, fmt: str = "kohya", rid: str | None = None) -> str:
    rid = rid or f"lora-{family}-{seed}-{fmt}"
    path = write_lora(env.lora_dir / f"{rid}.safetensors", make_lora(build_tiny_pipeline(family), seed=seed, fmt=fmt))
    env.service.registry.publish(path, id=rid, kind="lora", family=family)
    return rid


def test_generation_delivers_png_with_infotext_and_charges_exactly_the_delivered_images(env):
    caller = env.user()
    request = _request(quantity=2, negative_prompt="blurry")
    quote = env.service.quote(caller, request)
    job = _run(_finish(env.service, caller, request))
    assert job.status.value == "succeeded", job.error
    assert [i.seed for i in job.images] == [1234, 1235] == job.seeds
    assert job.charged == quote.total == 2 * quote.per_image > 0
    assert env.available(caller) == GRANT - quote.total
    assert env.ledger.balance(user_account(caller.user_id)).held == 0
    key = job.images[0].key
    assert key == f"images/{caller.user_id}/{job.id}/0-{job.images[0].sha256[:16]}.png"
    png = env.service.image(caller, job.id, 0)[1]
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (64, 64)
        info = parse_infotext(img.info["parameters"])
    assert info.prompt == "a red fox in the snow"
    assert "<gs-safe-neg>" in info.negative_prompt and "blurry" in info.negative_prompt
    assert info.params["Seed"] == "1234" and info.params["Steps"] == str(STEPS)
    assert job.infotext == img.info["parameters"]
    assert env.ledger.verify().ok


def test_progress_events_are_logged_in_order(env):
    caller = env.user()
    job = _run(_finish(env.service, caller, _request()))

    async def collect():
        return [e async for e in env.service.events(caller, job.id)]

    events = _run(collect())
    statuses = [e.data["status"] for e in events if e.kind == "status"]
    steps = [e.data["step"] for e in events if e.kind == "progress"]
    assert statuses == ["queued", "running", "succeeded"]
    assert steps == sorted(steps) and steps[-1] == STEPS
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_waiting_on_a_local_job_reads_it_only_when_it_ends(env, monkeypatch):
    caller = env.user()
    reads = []
    get = env.service.jobs.get
    monkeypatch.setattr(env.service.jobs, "get", lambda *a, **kw: reads.append(a[0]) or get(*a, **kw))
    job = _run(_finish(env.service, caller, _request()))
    progress = [e for e in env.service.jobs.events_after(job.id) if e.kind == "progress"]
    assert job.status.value == "succeeded" and len(progress) == STEPS
    assert reads == [job.id]  # once, when it ended: not before, not once per step


def test_waiting_on_another_users_local_job_is_not_found_at_once(env):
    owner, other = env.user(tier="gold"), env.user()

    async def wait_as_other():
        view, _ = await env.service.submit(owner, _request(steps=60))
        with pytest.raises(JobNotFound):
            await env.service.wait(other, view.id, 60)
        running = not env.service.jobs.get(view.id).status.terminal  # refused before the job ended
        await env.service.cancel(owner, view.id)
        await env.service.wait(owner, view.id, 30)
        return running

    assert _run(wait_as_other())


def test_waiting_on_a_job_run_elsewhere_polls_it_to_its_end(env):
    caller = env.user()
    other = GenerationService(env.settings, env.db, env.service.store, env.service.workers)

    async def run_here_wait_there():
        view, _ = await env.service.submit(caller, _request())
        return await other.wait(caller, view.id, 60)

    assert _run(run_here_wait_there()).status.value == "succeeded"


def test_blocked_prompt_costs_nothing_creates_no_job_and_is_audited(env):
    caller = env.user()
    with pytest.raises(SafetyBlocked) as info:
        _run(env.service.submit(caller, _request(prompt="a photo of a 12 year old, nude")))
    assert info.value.details["rules"], "a refusal names its rule ids"
    assert env.available(caller) == GRANT
    assert JobStore(env.db).count_active(caller.user_id) == 0
    rows = AuditLog(env.db.session).query(kind="precheck", action="block")
    assert any(r.user_id == caller.user_id and r.rules == info.value.details["rules"] for r in rows)


def test_short_of_buzz_is_402_and_leaves_nothing(env):
    caller = env.user(grant=0)
    with pytest.raises(InsufficientFunds) as info:
        _run(env.service.submit(caller, _request()))
    assert info.value.http_status == 402 and info.value.code == "insufficient_funds"
    assert JobStore(env.db).count_active(caller.user_id) == 0


def test_idempotency_key_returns_the_same_job_and_charges_once(env):
    caller = env.user()
    request = _request(idempotency_key="order-7")

    async def scenario():
        first, created = await env.service.submit(caller, request)
        again, created_again = await env.service.submit(caller, request)
        assert created and not created_again and again.id == first.id
        return await env.service.wait(caller, first.id, 60)

    done = _run(scenario())
    assert done.status.value == "succeeded"
    assert env.available(caller) == GRANT - done.charged
    with pytest.raises(Conflict) as info:
        _run(env.service.submit(caller, _request(idempotency_key="order-7", steps=5)))
    assert info.value.code == "idempotency_key_reused"


def test_same_seed_reproduces_the_image_and_another_seed_does_not(env):
    """Image 0 of a quantity-2 job runs in a batch of two (the worker's default batch size), the single
    job at batch 1: the same image, though batched float kernels may move a pixel by one level of 255
    (tests/test_engine_generate.py). The same single request again is bit for bit the same."""
    import numpy as np

    caller = env.user()
    batch = _run(_finish(env.service, caller, _request(seed=7, quantity=2)))  # images from seeds 7 and 8
    single = _run(_finish(env.service, caller, _request(seed=7)))
    again = _run(_finish(env.service, caller, _request(seed=7)))
    assert batch.seeds == [7, 8] and single.seeds == [7]

    def pixels(job, index):
        return np.asarray(Image.open(io.BytesIO(env.service.image(caller, job.id, index)[1])), dtype=int)

    assert np.abs(pixels(batch, 0) - pixels(single, 0)).max() <= 1
    assert np.array_equal(pixels(single, 0), pixels(again, 0))
    assert np.abs(pixels(batch, 1) - pixels(single, 0)).mean() > 1.0


def test_two_loras_at_different_strengths_change_the_image(env):
    caller = env.user()
    l1, l2 = _lora(env, "sd1", 1), _lora(env, "sd1", 2, fmt="diffusers")
    runs = {
        "base": _request(),
        "a": _request(resources=[{"id": l1, "strength": 1.0}, {"id": l2, "strength": 0.5}]),
        "b": _request(resources=[{"id": l1, "strength": 0.3}, {"id": l2, "strength": 1.5}]),
    }
    pixels = {}
    for name, request in runs.items():
        job = _run(_finish(env.service, caller, request))
        assert job.status.value == "succeeded", job.error
        pixels[name] = Image.open(io.BytesIO(env.service.image(caller, job.id, 0)[1])).tobytes()
    assert len(set(pixels.values())) == 3
    extra_quote = env.service.quote(caller, runs["a"]).total
    assert extra_quote >= env.service.quote(caller, runs["base"]).total


def test_blocklisted_lora_and_its_reexported_copy_are_refused_before_any_charge(env):
    caller = env.user()
    original = _lora(env, "sd1", 11, fmt="kohya", rid="celebrity-kohya")
    copy = _lora(env, "sd1", 11, fmt="diffusers", rid="celebrity-copy")  # same weights, other layout and file
    assert env.service.registry.get(original).sha256 != env.service.registry.get(copy).sha256
    _moderation(env).add_likeness(original, "A. Person", reason="takedown request")
    for rid in (original, copy):
        with pytest.raises(SafetyBlocked) as info:
            _run(env.service.submit(caller, _request(resources=[{"id": rid}])))
        assert any(r.startswith("likeness") for r in info.value.details["rules"])
    assert env.available(caller) == GRANT


def test_worker_refuses_a_blocklisted_lora_the_ingress_missed(env, monkeypatch):
    """Defence in depth: with the ingress check bypassed, the worker still refuses; nothing is charged."""
    caller = env.user()
    rid = _lora(env, "sd1", 21, rid="missed-by-ingress")
    _moderation(env).add_likeness(rid, "B. Person")
    monkeypatch.setattr(env.service.admission, "_likeness", lambda resources: [])
    job = _run(_finish(env.service, caller, _request(resources=[{"id": rid}])))
    assert job.status.value == "blocked" and job.error.code == "likeness_blocked" and job.charged == 0
    assert env.available(caller) == GRANT
    assert AuditLog(env.db.session).query(kind="worker_refusal", job_id=job.id)


def test_a_user_embedding_cannot_take_a_safety_token(env, tmp_path):
    import torch
    from safetensors.torch import save_file

    caller = env.user()
    path = tmp_path / "fake-safe.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(path))
    env.service.registry.publish(path, id="fake-safe-neg", kind="embedding", family="sd1", name="<gs-safe-neg>",
                                 meta={"token": "<gs-safe-neg>"})
    with pytest.raises(InvalidRequest) as info:
        _run(env.service.submit(caller, _request(resources=[{"id": "fake-safe-neg"}])))
    assert info.value.code == "reserved_token"
    # typing the token into the negative prompt does not displace the injected embedding either
    job = _run(_finish(env.service, caller, _request(negative_prompt="<gs-safe-neg>, ugly")))
    assert job.status.value == "succeeded"
    final = env.service.jobs.get(job.id).result["final_negative_prompt"]
    assert final.startswith("<gs-safe-neg>")
    assert env.available(caller) == GRANT - job.charged


def test_cancel_stops_within_a_step_and_releases_the_hold(env):
    caller = env.user(tier="gold")

    async def scenario():
        view, _ = await env.service.submit(caller, _request(steps=60))
        async for event in env.service.events(caller, view.id):
            if event.kind == "progress":
                break
        await env.service.cancel(caller, view.id)
        return await env.service.wait(caller, view.id, 30)

    job = _run(scenario())
    assert job.status.value == "canceled" and job.charged == 0
    assert job.progress.step < 60
    assert env.available(caller) == GRANT
    assert env.ledger.balance(user_account(caller.user_id)).held == 0


class _DyingStream:
    """A worker stream whose replica dies after the first item `last` accepts (the first step by
    default; the Ray version kills a real replica)."""

    def __init__(self, inner, last=lambda item: True):
        self.inner, self.last = inner, last

    def cancel(self):
        self.inner.cancel()

    async def __aiter__(self):
        async for item in self.inner:
            yield item
            if self.last(item):
                raise ConnectionError("replica died")


def test_worker_death_fails_the_job_and_returns_the_buzz(env, monkeypatch):
    caller = env.user()
    real = env.service.workers.generate
    monkeypatch.setattr(env.service.workers, "generate", lambda family, req: _DyingStream(real(family, req)))
    job = _run(_finish(env.service, caller, _request(steps=20)))
    assert job.status.value == "failed" and job.error.code == "worker_failed" and job.charged == 0
    assert env.available(caller) == GRANT
    monkeypatch.undo()
    assert _run(_finish(env.service, caller, _request())).status.value == "succeeded"


def test_a_worker_dying_after_an_image_was_stored_leaves_no_image_behind(env, monkeypatch):
    from genserve.generation.worker.wire import EncodedImage

    caller = env.user()
    real = env.service.workers.generate
    monkeypatch.setattr(env.service.workers, "generate",
                        lambda family, req: _DyingStream(real(family, req), last=lambda i: isinstance(i, EncodedImage)))
    job = _run(_finish(env.service, caller, _request(quantity=2)))
    assert job.status.value == "failed" and job.charged == 0 and env.available(caller) == GRANT
    assert list(env.service.store.list(image_prefix(caller.user_id, job.id))) == []


class _Recorded:
    """The real object store, noting each image put as it lands."""

    def __init__(self, store):
        self.store, self.puts = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_bytes(self, key, data, **kw):
        info = self.store.put_bytes(key, data, **kw)
        self.puts.append(key)
        return info


class _RatesSecondImageX:
    """Stands in for NudeNet on a nude image, which cannot exist here: the second image of a job
    scans as X. Each scan first waits (up to 10 s) until that image is in the object store."""

    def __init__(self, store: _Recorded):
        self.store, self.scans = store, 0

    def scan(self, image):
        self.scans += 1
        deadline = time.monotonic() + 10
        while len(self.store.puts) < self.scans and time.monotonic() < deadline:
            time.sleep(0.005)
        self.stored_before_verdict = len(self.store.puts) >= self.scans
        return ScanResult(ScanLevel.X if self.scans % 2 == 0 else ScanLevel.PG)


@pytest.fixture(scope="module")
def x_rating(env):
    store = _Recorded(env.service.store)
    scanner = _RatesSecondImageX(store)
    service = in_process_service(env.settings, db=env.db, store=store, scanner=scanner)
    return service, store, scanner


def test_each_image_is_stored_while_it_is_scanned_and_a_withheld_one_is_deleted(env, x_rating):
    service, store, scanner = x_rating
    caller = env.user()
    request = _request(quantity=2)
    job = _run(_finish(service, caller, request))
    assert scanner.stored_before_verdict, "the scan waited 10 s for a put that comes only after it"
    assert job.status.value == "succeeded" and [i.index for i in job.images] == [0]
    assert [(w.index, w.nsfw_level) for w in job.withheld] == [(1, "x")] and job.withheld[0].reasons
    per_image = service.quote(caller, request).per_image
    assert job.charged == per_image and env.available(caller) == GRANT - per_image
    assert len(store.puts) == 2, "the withheld image was stored too, while it was scanned"
    assert list(store.list(image_prefix(caller.user_id, job.id))) == [job.images[0].key]
    assert service.image(caller, job.id, 0)[1] == store.get_bytes(job.images[0].key)


def test_a_job_whose_images_are_all_withheld_is_blocked_charges_nothing_and_stores_nothing(env, x_rating):
    service, store, scanner = x_rating
    caller = env.user()
    scanner.scans = 1  # the next scan is a job's "second" image: X
    before = len(store.puts)
    job = _run(_finish(service, caller, _request()))
    assert job.status.value == "blocked" and job.error.code == "all_images_withheld" and job.charged == 0
    assert env.available(caller) == GRANT and len(store.puts) == before + 1
    assert list(store.list(image_prefix(caller.user_id, job.id))) == []


def test_timeout_fails_the_job_and_releases_the_hold(env, monkeypatch):
    caller = env.user(tier="gold")
    monkeypatch.setattr(env.service.admission, "config", env.service.admission.config.model_copy(update={"job_timeout_s": 0.3}))
    job = _run(_finish(env.service, caller, _request(steps=60)))
    assert job.status.value == "failed" and job.error.code == "timeout"
    assert env.available(caller) == GRANT


def test_reaper_fails_orphaned_jobs_and_releases_their_holds(env):
    caller = env.user()
    store, ledger = JobStore(env.db), env.ledger
    ids = []
    for owner in ("elsewhere/1/x", f"{os.uname().nodename}/999999999/y"):
        job_id = new_job_id()
        hold = ledger.hold(user_account(caller.user_id), 10, f"gen:{job_id}:hold", destination="revenue:generation")
        store.create(GenerationJob(id=job_id, user_id=caller.user_id, family="sd1", checkpoint_id="tiny-sd1",
                                   priority="normal", quantity=1, request_hash="0" * 64, request={"seeds": [1]},
                                   quote={"total": 10}, quote_total=10, hold_id=hold.id, owner=owner))
        ids.append(job_id)
    assert env.available(caller) == GRANT - 20
    # what a runner that died mid-job may leave: an image stored while it was being scanned
    left = env.service.store
    left.put_bytes(f"{image_prefix(caller.user_id, ids[1])}0-0123456789abcdef.png", b"png", content_type="image/png")
    reaper = Reaper(store, ledger, stale_after_s=60, store=left)
    # the dead local process is reaped at once; the remote owner only once its heartbeat is stale
    assert reaper.reap_once().jobs == [ids[1]]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=61)
    assert reaper.reap_once(now=later).jobs == [ids[0]]
    for job_id in ids:
        job = store.get(job_id)
        assert job.status is JobStatus.failed and job.error_code == "owner_lost"
    assert env.available(caller) == GRANT
    assert list(left.list(image_prefix(caller.user_id, ids[1]))) == []


def test_queue_limits_and_priorities(env, monkeypatch):
    caller = env.user(tier="free")
    service = env.service
    monkeypatch.setattr(service, "limits", Limits(tiers={"free": TierLimits(quantity=4, queue=1, steps=50, resources=9)},
                                                  max_active_jobs=4, retry_after_s=3))

    async def scenario():
        first, _ = await service.submit(caller, _request(steps=40))
        with pytest.raises(QueueFull) as per_user:
            await service.submit(caller, _request())
        await service.cancel(caller, first.id)
        await service.wait(caller, first.id, 30)
        return per_user.value

    err = _run(scenario())
    assert err.code == "queue_limit" and err.http_status == 429 and err.retry_after_s == 3
    monkeypatch.setattr(service.jobs, "active_counts", lambda user_id: (0, 3))
    with pytest.raises(QueueFull) as full:  # 3 of 4 active: normal (90%) still fits, low (75%) does not
        _run(service.submit(caller, _request(priority="low")))
    assert full.value.code == "queue_full"
    assert env.available(caller) == GRANT


def test_tier_and_size_refusals_name_the_limit(env):
    caller = env.user(tier="free")
    cases = [
        (_request(quantity=5), InvalidRequest, "tier_limit_exceeded"),
        (_request(width=72, height=72), InvalidRequest, "size_not_allowed"),
        (_request(priority="high"), Forbidden, "priority_not_allowed"),
        (_request(checkpoint="no-such-model"), InvalidRequest, "resource_not_found"),
    ]
    for request, error, code in cases:
        with pytest.raises(Exception) as info:
            env.service.quote(caller, request)
        assert info.value.code == code, (code, info.value)
        if error is not InvalidRequest:
            assert isinstance(info.value, error)


def test_sdxl_and_hires_fix(env):
    caller = env.user()
    job = _run(_finish(env.service, caller, _request(checkpoint="tiny-sdxl", hires={"scale": 2.0, "steps": 2})))
    assert job.status.value == "succeeded", job.error
    with Image.open(io.BytesIO(env.service.image(caller, job.id, 0)[1])) as img:
        assert img.size == (128, 128)
    assert job.charged == env.service.quote(caller, _request(checkpoint="tiny-sdxl",
                                                             hires={"scale": 2.0, "steps": 2})).total


def test_bootstrap_is_idempotent(env):
    store = env.service.store
    before = env.ledger.balance(user_account(env.settings.generation.demo_user)).available
    report = bootstrap(env.settings, env.db, store, build_models=False)
    assert set(report.checkpoints) == {"tiny-sd1", "tiny-sd1-single", "tiny-sdxl", "tiny-sdxl-single"}
    assert report.demo_balance == before == env.settings.generation.demo_balance
    single = env.service.registry.get("tiny-sd1-single")
    assert single.format == "safetensors" and store.exists(f"{single.meta['config']['storage_key']}/manifest.json")


def test_reconfigure_applies_hot_limits_and_rereads_the_file(env, monkeypatch):
    service = env.service
    monkeypatch.setattr(service, "limits", service.limits)  # restored after the test
    service.reconfigure({"limits": {"default_tier": "vip", "tiers": {"vip": {"quantity": 1, "queue": 1, "steps": 5,
                                                                            "resources": 0}}}})
    with pytest.raises(InvalidRequest) as info:
        service.quote(env.user(), _request(steps=6))
    assert info.value.code == "tier_limit_exceeded"
    service.reconfigure({"revision": 2})
    assert service.limits.default_tier == "free" and service.limits.tier("gold").quantity == 12


def test_reconfigure_rolls_out_a_new_prompt_rule_list(env, monkeypatch, tmp_path):
    """A rule file changed on disk takes effect on the next reconfigure, with no restart."""
    import shutil

    import yaml

    service = env.service
    rules = tmp_path / "safety"
    shutil.copytree(env.settings.config_path(env.settings.safety.rules_dir), rules)
    monkeypatch.setattr(service, "settings", env.settings.model_copy(update={"config_dir": tmp_path}))
    monkeypatch.setattr(service, "safety", service.safety)  # the gate's auditor is restored after the test
    monkeypatch.setattr(service.safety, "auditor", service.safety.auditor)
    monkeypatch.setattr(service.safety, "policy", service.safety.policy)
    monkeypatch.setattr(service.safety, "rules_dir", rules)  # the gate reads its rules from the copy
    monkeypatch.setattr(service, "limits", service.limits)
    request = _request(prompt="a glorbix on a hill")
    service.quote(env.user(), request)  # allowed under the shipped rules

    doc = yaml.safe_load((rules / "prompt_audit.yaml").read_text())
    doc["term_groups"][0]["terms"].append("glorbix")
    (rules / "prompt_audit.yaml").write_text(yaml.safe_dump(doc))
    service.reconfigure({"revision": 3})
    with pytest.raises(SafetyBlocked) as info:
        service.quote(env.user(), request)
    assert "blocked.prohibited" in info.value.details["rules"]

    (rules / "prompt_audit.yaml").write_text("term_groups: [{id: broken}]\n")
    with pytest.raises(Exception):  # noqa: B017 - any refusal; the running rules must stay in force
        service.reconfigure({"revision": 4})
    with pytest.raises(SafetyBlocked):
        service.quote(env.user(), request)


# ------------------------------------------------------------------------------ safety v2 policy


def test_a_review_verdict_is_refused_before_anything_is_held(env):
    """A prompt the audit sends to review is not run: refused with its own code, nothing charged."""
    caller = env.user(level=NsfwLevel.X)
    with pytest.raises(SafetyBlocked) as info:
        _run(env.service.submit(caller, _request(prompt="petite woman in a school uniform, nude")))
    assert info.value.code in ("safety_review", "safety_blocked")
    assert info.value.details["rules"]
    assert env.available(caller) == GRANT
    row = AuditLog(env.db.session).query(kind="precheck", request_id=caller.request_id)[0]
    assert row.action in ("review", "block")


@pytest.mark.parametrize(("level", "protected"), [(NsfwLevel.PG13, False), (NsfwLevel.R, True), (NsfwLevel.X, True)])
def test_minor_protection_embedding_follows_the_level_a_request_may_see(env, level, protected):
    """A plain prompt whose user may see R or X gets the minor-protection embedding too (asserted on the
    negative prompt the worker received), not only a prompt the audit reads as mature."""
    caller = env.user(level=level)
    job = _run(_finish(env.service, caller, _request(prompt="a lighthouse at dusk")))
    final = env.service.jobs.get(job.id).result["final_negative_prompt"]
    assert final.startswith("<gs-safe-neg>")
    assert ("<gs-safe-minor>" in final) is protected


def test_takedown_names_reach_a_second_service_on_its_next_heartbeat(env):
    """Two ingress replicas on one database: a name approved through one blocks on the other within one
    heartbeat (5 s by default, under the 10 s the site promises)."""
    other = GenerationService(env.settings, env.db, env.service.store, env.service.workers)
    person = f"Zorvana Quillfeather {uuid.uuid4().hex[:4]}"
    caller = env.user(level=NsfwLevel.X)
    request = _request(prompt=f"{person}, nude")
    env.service.quote(caller, _request(prompt=f"{person}, portrait"))  # unknown name: allowed
    takedown = _moderation(env).request_takedown(person, contact="lawyer@example.com")
    _moderation(env).approve_takedown(takedown.id, "mod-1")
    other._heartbeat()
    with pytest.raises(SafetyBlocked) as info:
        other.quote(caller, request)
    assert any(rule.startswith("person") or "person" in rule for rule in info.value.details["rules"])
    assert env.settings.generation.heartbeat_interval_s <= 10


def test_a_blocklisted_checkpoint_cannot_be_used(env, tmp_path):
    """A checkpoint put on the likeness blocklist is refused at admission and by the worker itself."""
    import torch
    from safetensors.torch import load_file, save_file

    from genserve.resources.models import ResourceKind

    single = env.service.registry.get("tiny-sd1-single")
    with env.service.resource_cache.use(single.storage_key, single.sha256, "file") as path:
        tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 1e-3)  # other hashes than the shared one
    copy = tmp_path / "lookalike.safetensors"
    save_file(tensors, str(copy))
    rid = f"ckpt-{uuid.uuid4().hex[:6]}"
    env.service.registry.publish(copy, id=rid, kind="checkpoint", family="sd1", meta=dict(single.meta or {}))
    caller = env.user()
    env.service.quote(caller, _request(checkpoint=rid))  # usable before
    _moderation(env).add_likeness(rid, "C. Person", reason="a checkpoint fine-tuned on one person")
    with pytest.raises(SafetyBlocked) as info:
        env.service.quote(caller, _request(checkpoint=rid))
    assert any(rule.startswith("likeness.") for rule in info.value.details["rules"])
    core = env.service.workers.cores["sd1"]
    with pytest.raises(SafetyBlocked) as refused:
        core.load_checkpoint(rid)
    assert refused.value.code == "likeness_blocked"
    assert core.resource(rid, ResourceKind.checkpoint).id == rid  # still registered: refused, not deleted


def test_a_blocked_lora_split_across_two_files_is_caught_as_a_pair(env):
    """(blocked + U) at +1 and U at -1 load as exactly the blocked LoRA; each file passes alone, the pair is
    refused at admission (combined update) and again by the worker before it combines the adapters."""
    import torch

    from genserve.generation.worker.wire import LoraSpec, WorkerRequest

    pipe = build_tiny_pipeline("sd1")
    blocked = make_lora(pipe, seed=71, text_encoder=False)
    other = make_lora(pipe, seed=72, text_encoder=False, scale=1.5)  # 9x the blocked LoRA's energy
    carrier = {}
    for key in (k for k in blocked if k.endswith(".lora_down.weight")):
        base = key.removesuffix(".lora_down.weight")
        carrier[f"{base}.lora_down.weight"] = torch.cat([blocked[key], other[key]])
        carrier[f"{base}.lora_up.weight"] = torch.cat([blocked[f"{base}.lora_up.weight"], other[f"{base}.lora_up.weight"]], 1)
        carrier[f"{base}.alpha"] = torch.tensor(8.0)  # rank 8 at alpha 8: the same scale 1 as both parts
    tag = uuid.uuid4().hex[:6]
    ids = {}
    for name, sd in (("blocked", blocked), ("carrier", carrier), ("other", other)):
        path = write_lora(env.lora_dir / f"split-{name}-{tag}.safetensors", sd)
        ids[name] = f"split-{name}-{tag}"
        env.service.registry.publish(path, id=ids[name], kind="lora", family="sd1")
    _moderation(env).add_likeness(ids["blocked"], "D. Person")
    caller = env.user()
    env.service.quote(caller, _request(resources=[{"id": ids["carrier"]}]))  # alone: usable
    env.service.quote(caller, _request(resources=[{"id": ids["other"], "strength": -1.0}]))
    pair = [{"id": ids["carrier"], "strength": 1.0}, {"id": ids["other"], "strength": -1.0}]
    with pytest.raises(SafetyBlocked) as info:
        env.service.quote(caller, _request(resources=pair))
    assert "likeness.combined" in info.value.details["rules"]
    assert env.available(caller) == GRANT

    core = env.service.workers.cores["sd1"]
    request = WorkerRequest(job_id="split-pair", checkpoint_id="tiny-sd1", prompt="a portrait", steps=2, width=64,
                            height=64, seeds=[1], loras=[LoraSpec(resource_id=ids["carrier"], strength=1.0),
                                                         LoraSpec(resource_id=ids["other"], strength=-1.0)])
    with pytest.raises(SafetyBlocked) as refused:
        core.generate(request)
    assert refused.value.code == "likeness_blocked" and "likeness.combined" in refused.value.details["rules"]


MATURE_PROMPTS = {
    "en": "nude woman on a bed, erotic photo", "de": "nackte Frau auf dem Bett, erotisches Foto",
    "es": "mujer desnuda en la cama, foto erótica", "fr": "femme nue sur le lit, photo érotique",
    "it": "donna nuda sul letto, foto erotica", "pt": "mulher nua na cama, foto erótica",
    "ru": "обнажённая женщина на кровати, эротическое фото", "ja": "ベッドの上の裸の女性、エロ写真",
    "zh": "床上的裸体女人，色情照片", "ko": "침대 위의 나체 여성, 에로 사진",
}


@pytest.mark.parametrize("lang", sorted(MATURE_PROMPTS))
def test_a_mature_prompt_in_any_language_gets_the_minor_protection_embedding(env, lang):
    """Asserted on the negative prompt the worker received; the caller's level (PG13) alone would not add it."""
    caller = env.user(level=NsfwLevel.PG13)
    job = _run(_finish(env.service, caller, _request(prompt=MATURE_PROMPTS[lang], steps=2)))
    final = env.service.jobs.get(job.id).result["final_negative_prompt"]
    assert final.startswith("<gs-safe-neg> <gs-safe-minor>"), (lang, final)
