"""The generation worker: WorkerCore against a registry and object store, and the Serve deployment."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from engine_loras import make_lora, write_lora
from engine_support import differ, one_torch_thread
from safetensors.torch import save_file

from genserve.core.errors import GenserveError
from genserve.engine.infotext import parse_hash_list, read_png_infotext
from genserve.generation.worker.wire import EncodedImage, LoraSpec, ProgressEvent, WorkerRequest, WorkerResult


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """Settings on a fresh data dir, a migrated SQLite registry, a local object store holding the tiny
    SD1 checkpoint (published content-addressed), the safety embeddings under the models dir."""
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings
    from genserve.resources.registry import ResourceRegistry

    root = tmp_path_factory.mktemp("worker")
    # one by one: most tests here follow a request image by image (progress, a scan overlapping the next
    # image, a cancel between images); `test_quantity_runs_in_batches_of_the_configured_size` batches
    settings = load_settings(env={"GENSERVE_DATA_DIR": str(root / "data")},
                             overrides={"worker": {"cpu_threads": 1, "batch_size": {"sd1": 1}}})
    shutil.copytree(tiny_models["sd1"].embeddings["general"].parent, settings.models_dir / "embeddings")
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    store.ensure_bucket()
    registry = ResourceRegistry(db, store)
    registry.publish(tiny_models["sd1"].diffusers_dir, id="tiny-sd1", kind="checkpoint", family="sd1")
    yield {"settings": settings, "db": db, "store": store, "registry": registry, "root": root}
    db.dispose()


@pytest.fixture(scope="module")
def core(env):
    from genserve.generation.worker.core import WorkerCore

    with one_torch_thread():
        core = WorkerCore("sd1", env["settings"], db=env["db"], store=env["store"])
        yield core
        core.close()


@pytest.fixture(scope="module")
def lora(env, core):
    """A kohya LoRA for the tiny SD1 checkpoint, registered as `lora-a`."""
    pipe = core.checkpoint("tiny-sd1").pipe
    path = write_lora(env["root"] / "lora-a.safetensors", make_lora(pipe, seed=21))
    env["registry"].publish(path, id="lora-a", kind="lora", family="sd1", name="Style A")
    return path


def _request(**kw) -> WorkerRequest:
    base = dict(job_id="job-1", checkpoint_id="tiny-sd1", prompt="a cat", negative_prompt="blurry",
                sampler="Euler a", steps=2, width=64, height=64, seeds=[5, 6])
    return WorkerRequest(**{**base, **kw})


def _pngs(events: list) -> dict[int, bytes]:
    return {e.index: e.png for e in events if isinstance(e, EncodedImage)}


def _generate(core, request: WorkerRequest) -> tuple[WorkerResult, dict[int, bytes]]:
    """A Ray-less generation and the PNGs it streamed (the result holds only their verdicts)."""
    events: list = []
    return core.generate(request, events.append), _pngs(events)


def test_generates_with_lora_progress_hashes_and_scans(core, lora):
    from safety.hashing import file_hashes

    events: list[ProgressEvent | EncodedImage] = []
    with one_torch_thread():
        result = core.generate(_request(loras=[LoraSpec(resource_id="lora-a", strength=0.8)]), events.append)
        plain, plain_pngs = _generate(core, _request())
    assert [(e.image_index, e.step, e.total_steps, e.image_count) for e in events if isinstance(e, ProgressEvent)] == [
        (0, 1, 2, 2), (0, 2, 2, 2), (1, 1, 2, 2), (1, 2, 2, 2)]
    # each image's PNG streams out once it is encoded (beside the next image's steps), in order
    assert [e.index for e in events if isinstance(e, EncodedImage)] == [0, 1]
    assert events.index(next(e for e in events if isinstance(e, EncodedImage))) > 1, "image 0 is encoded after its steps"
    pngs = _pngs(events)
    assert all(e.job_id == "job-1" for e in events) and [e.seed for e in events if isinstance(e, EncodedImage)] == [5, 6]
    assert not result.canceled and [i.seed for i in result.images] == [5, 6]
    assert result.final_negative_prompt.startswith("<gs-safe-neg>")
    autov3 = file_hashes(lora).tensor_sha256[:12]
    assert result.lora_hashes == {"lora-a": autov3}
    assert result.model_hash == core.resource("tiny-sd1", "checkpoint").sha256[:10]
    info = read_png_infotext(pngs[0])
    assert parse_hash_list(info.params["Lora hashes"]) == {"Style A": autov3}
    assert info.params["Model hash"] == result.model_hash and info.params["Model"] == "tiny-sd1"
    for image in result.images:  # the real NudeNet scan finds nothing in noise
        assert image.deliverable and image.scan.level == "pg" and image.scan.errors == []
    assert {"fetch_ms", "lora_load_ms", "denoise_ms", "scan_ms", "total_ms"} <= set(result.timings_ms)
    import io

    from PIL import Image

    with_lora = Image.open(io.BytesIO(pngs[0]))
    without = Image.open(io.BytesIO(plain_pngs[0]))
    assert differ(with_lora, without) > 0.5


def test_each_image_is_scanned_while_the_next_one_is_generated(core):
    import threading
    import time

    log: list[tuple[str, int]] = []

    class Recording:
        """Stands in for the scanner only to record when scans run; the real one runs in the test above."""

        def __init__(self, real):
            self.real = real

        def scan(self, image):
            log.append(("scan-start", threading.get_ident()))
            time.sleep(0.05)
            return self.real.scan(image)

    def progress(event: ProgressEvent | EncodedImage) -> None:
        if isinstance(event, ProgressEvent):
            log.append((f"step-{event.image_index}-{event.step}", threading.get_ident()))

    real, core._scanner = core.scanner, Recording(core.scanner)
    try:
        with one_torch_thread():
            result = core.generate(_request(), progress)
    finally:
        core._scanner = real
    names = [name for name, _ in log]
    assert names.index("scan-start") < names.index("step-1-2")  # image 0's scan ran during image 1
    assert {tid for name, tid in log if name == "scan-start"}.isdisjoint({tid for name, tid in log if name != "scan-start"})
    assert [i.scan.level for i in result.images] == ["pg", "pg"] and result.timings_ms["scan_ms"] >= 100


def test_failed_scan_makes_the_image_undeliverable(core):
    class Broken:
        def scan(self, image):
            raise RuntimeError("model file missing")

    real, core._scanner = core.scanner, Broken()
    try:
        with one_torch_thread():
            result = core.generate(_request(seeds=[1]))
    finally:
        core._scanner = real
    image = result.images[0]
    assert not image.deliverable and image.scan.level is None
    assert "model file missing" in image.scan.errors[0]


def test_resources_are_checked_by_the_worker(env, core, lora):
    from genserve.resources.models import Resource
    from genserve.resources.registry import ResourceRefused

    with pytest.raises(ResourceRefused) as err:
        core.generate(_request(loras=[LoraSpec(resource_id="nope")]))
    assert err.value.code == "resource_not_found"
    env["registry"].register(id="xl-lora", kind="lora", family="sdxl", storage_key="x/y", sha256="0" * 64)
    with pytest.raises(ResourceRefused) as err:
        core.generate(_request(loras=[LoraSpec(resource_id="xl-lora")]))
    assert err.value.code == "resource_unusable"
    with pytest.raises(ResourceRefused):
        core.generate(_request(checkpoint_id="lora-a"))
    with env["db"].transaction() as s:
        s.get(Resource, "lora-a").generation_enabled = False
    try:
        with pytest.raises(ResourceRefused) as err:
            core.generate(_request(loras=[LoraSpec(resource_id="lora-a")]))
        assert err.value.code == "resource_disabled"
    finally:
        with env["db"].transaction() as s:
            s.get(Resource, "lora-a").generation_enabled = True


def test_blocklisted_lora_is_refused_by_the_worker(env, core, tiny_models):
    from genserve.engine.lora_cache import LikenessBlocked

    pipe = core.checkpoint("tiny-sd1").pipe
    path = write_lora(env["root"] / "person.safetensors", make_lora(pipe, seed=99))
    env["registry"].publish(path, id="lora-person", kind="lora", family="sd1")
    core.blocklist.add(path, person="Some Person", reason="likeness")
    steps_before = core.stats()["steps"]
    with pytest.raises(LikenessBlocked) as err:
        core.generate(_request(loras=[LoraSpec(resource_id="lora-person")]))
    assert err.value.code == "likeness_blocked"
    assert core.stats()["steps"] == steps_before  # refused before any denoising


def test_user_embedding_applies_to_one_request_only(env, core):
    loaded = core.checkpoint("tiny-sd1")
    width = loaded.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    import torch

    path = env["root"] / "style.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(3)) * 0.5}, str(path))
    env["registry"].publish(path, id="ti-style", kind="embedding", family="sd1", meta={"token": "<my-style>"})
    with one_torch_thread():
        _, styled = _generate(core, _request(prompt="a <my-style> cat", seeds=[4], embeddings=["ti-style"]))
        _, plain = _generate(core, _request(prompt="a <my-style> cat", seeds=[4]))
    import io

    from PIL import Image

    a, b = (Image.open(io.BytesIO(pngs[0])) for pngs in (styled, plain))
    assert differ(a, b) > 0.5
    assert "<my-style>" not in loaded.pipe.tokenizer.get_vocab()
    core.check_health()  # the safety embeddings' rows survived the load and unload


def test_a_requests_vae_is_checked_cached_and_for_that_job_only(env, core, lora):
    from genserve.resources.models import Resource
    from genserve.resources.registry import ResourceRefused
    from genserve.tinymodels import write_tiny_vae

    loaded = core.checkpoint("tiny-sd1")
    path = write_tiny_vae(env["root"] / "worker-vae.safetensors", seed=4)
    row = env["registry"].publish(path, id="vae-a", kind="vae", family="sd1", name="vae_a")
    with one_torch_thread():
        _, own = _generate(core, _request(seeds=[4]))
        _, chosen = _generate(core, _request(seeds=[4], vae="vae-a"))
        _, again = _generate(core, _request(seeds=[4]))
    assert row.sha256 in loaded.vaes and loaded.pipe.vae is loaded.vaes.own
    assert read_png_infotext(chosen[0]).params["VAE hash"] == row.sha256[:10]
    a, b, c = (read_png_infotext(pngs[0]) for pngs in (own, chosen, again))
    assert "VAE" not in a.params and a == c
    import io

    from PIL import Image

    own_img, chosen_img, again_img = (Image.open(io.BytesIO(pngs[0])) for pngs in (own, chosen, again))
    assert own_img.tobytes() == again_img.tobytes() != chosen_img.tobytes()
    # the worker asks the registry again: a LoRA named as a VAE, or a VAE disabled since admission
    with pytest.raises(ResourceRefused) as err:
        core.generate(_request(vae="lora-a"))
    assert err.value.code == "resource_unusable"
    with env["db"].transaction() as s:
        s.get(Resource, "vae-a").generation_enabled = False
    with pytest.raises(ResourceRefused) as err:
        core.generate(_request(vae="vae-a"))
    assert err.value.code == "resource_disabled"


def test_check_health_fails_when_the_safety_embedding_is_removed(core):
    from safety.errors import EmbeddingUnavailable

    loaded = core.load_checkpoint("tiny-sd1")  # a second copy, outside the core's multiplexer
    core.check_health([loaded])
    loaded.pipe.unload_textual_inversion()
    with pytest.raises(EmbeddingUnavailable):
        core.check_health([loaded])
    loaded.close()
    assert loaded.freed


def test_check_health_does_not_wait_for_a_generation(core):
    from safety.errors import EmbeddingUnavailable

    loaded = core.load_checkpoint("tiny-sd1")
    loaded.pipe.unload_textual_inversion()
    with loaded.lock:  # as a generation holds it; the health check must answer meanwhile
        answered = threading.Event()
        checker = threading.Thread(target=lambda: (core.check_health([loaded]), answered.set()))
        checker.start()
        assert answered.wait(5)
    with pytest.raises(EmbeddingUnavailable):  # once it is free, the model is checked again
        core.check_health([loaded])
    loaded.close()


def test_wedged_generation_fails_health(env):
    from genserve.generation.worker.core import WorkerCore

    core = WorkerCore("sd1", env["settings"].model_copy(update={"worker": env["settings"].worker.model_copy(
        update={"wedge_timeout_s": 0.05})}), db=env["db"], store=env["store"])
    with core._busy_marker():
        time.sleep(0.1)
        with pytest.raises(GenserveError) as err:
            core.check_health()
    assert err.value.code == "worker_wedged"
    core.check_health()


def test_evicted_checkpoint_is_freed_after_its_last_request(core):
    from types import SimpleNamespace

    from genserve.generation.worker.checkpoint import LoadedCheckpoint
    from genserve.generation.worker.errors import CheckpointEvicted

    class Loras:
        cleared = 0

        def clear(self):
            self.cleared += 1

    loras = Loras()
    pipe = SimpleNamespace(components={"unet": object()}, unet=object())
    row = SimpleNamespace(name="m", sha256="0" * 64)
    loaded = LoadedCheckpoint("tiny-sd1", row, pipe, safety=None, loras=loras)
    with loaded.in_use():
        loaded.close()
        loaded.close()  # Serve calls __del__ explicitly and Python again at collection
        assert not loaded.freed and loaded.pipe is pipe
        with pytest.raises(CheckpointEvicted):
            with loaded.in_use():
                pass
    assert loaded.freed and loaded.pipe is None and pipe.unet is None and loras.cleared == 1
    loaded.__del__()
    assert loras.cleared == 1


def test_quantity_runs_in_batches_of_the_configured_size(env, core):
    """Seeds 1, 2, 3 at batch size 2: two pipeline calls (progress under images 0 and 2), every image
    streamed and scanned, each the one-by-one image (up to 1/255 per channel: batched float kernels)."""
    import io

    import numpy as np
    from PIL import Image

    from genserve.generation.worker.core import WorkerCore

    settings = env["settings"]
    batched = WorkerCore("sd1", settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"batch_size": {"sd1": 2}})}), db=env["db"], store=env["store"], scanner=core.scanner)
    request = _request(seeds=[1, 2, 3], steps=2)
    try:
        with one_torch_thread():
            events: list = []
            result = batched.generate(request, events.append)
            _, alone = _generate(core, request)
    finally:
        batched.close()
    assert result.timings_ms["batch_size"] == 2 and [i.index for i in result.images] == [0, 1, 2]
    progress = [(e.image_index, e.step) for e in events if isinstance(e, ProgressEvent)]
    assert progress == [(0, 1), (0, 2), (2, 1), (2, 2)]
    pngs = _pngs(events)
    for index in range(3):
        a, b = (np.asarray(Image.open(io.BytesIO(p[index])), dtype=int) for p in (pngs, alone))
        assert np.abs(a - b).max() <= 1
        assert read_png_infotext(pngs[index]).params["Seed"] == str(request.seeds[index])


def test_worker_limits_and_unknown_sampler(env, core):
    from genserve.engine.schedulers import UnknownSampler
    from genserve.generation.worker.core import WorkerCore

    with pytest.raises(UnknownSampler):
        core.generate(_request(sampler="Euler z"))
    settings = env["settings"]
    strict = WorkerCore("sd1", settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"max_images": 1, "max_steps": 3, "max_pixels": 96 * 96})}), db=env["db"], store=env["store"])
    for request, code in ((_request(seeds=[1, 2]), "too_many_images"), (_request(seeds=[1], steps=4), "too_many_steps"),
                          (_request(seeds=[1], width=128, height=128), "image_too_large")):
        with pytest.raises(GenserveError) as err:
            strict.validate(request)
        assert err.value.code == code
    strict.validate(_request(seeds=[1]))


# --------------------------------------------------------------------------------------- Ray Serve


@pytest.fixture(scope="module")
def serve_worker(env, ray_session, lora):
    from ray import serve

    from genserve.core.config import settings_dump
    from genserve.generation.worker.deployment import FamilyWorker

    app = FamilyWorker.options(name="worker-sd1", max_ongoing_requests=4).bind("sd1", settings_dump(env["settings"]))
    handle = serve.run(app, name="worker-test", route_prefix=None)
    yield handle
    serve.delete("worker-test")


@pytest.mark.ray
def test_serve_streams_progress_and_pngs_then_the_result(serve_worker):
    stream = serve_worker.options(multiplexed_model_id="tiny-sd1", stream=True).generate.remote(
        _request(loras=[LoraSpec(resource_id="lora-a", strength=0.5)]))
    items = list(stream)
    assert sorted(type(i).__name__ for i in items[:-1]) == ["EncodedImage"] * 2 + ["ProgressEvent"] * 4
    assert [read_png_infotext(i.png).params["Seed"] for i in items if isinstance(i, EncodedImage)] == ["5", "6"]
    result = items[-1]
    assert isinstance(result, WorkerResult) and [i.index for i in result.images] == [0, 1]
    assert all(i.deliverable for i in result.images) and "lora-a" in result.lora_hashes
    stats = serve_worker.stats.remote().result()
    assert stats["checkpoints"] == ["tiny-sd1"] and stats["requests"] >= 1
    serve_worker.check_health.remote().result()


@pytest.mark.ray
def test_serve_refusal_is_typed(serve_worker):
    stream = serve_worker.options(multiplexed_model_id="tiny-sd1", stream=True).generate.remote(
        _request(loras=[LoraSpec(resource_id="missing")]))
    with pytest.raises(GenserveError) as err:
        list(stream)
    assert err.value.code == "resource_not_found"


@pytest.mark.ray
def test_serve_cancellation_stops_the_denoising_loop(serve_worker):
    from ray.serve.exceptions import RequestCancelledError

    before = serve_worker.stats.remote().result()
    stream = serve_worker.options(multiplexed_model_id="tiny-sd1", stream=True).generate.remote(
        _request(steps=40, seeds=[1, 2, 3]))
    first = next(stream)
    assert isinstance(first, ProgressEvent)
    stream.cancel()
    with pytest.raises((RequestCancelledError, Exception)):
        list(stream)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = serve_worker.stats.remote().result()
        if stats["canceled"] > before["canceled"]:
            break
        time.sleep(0.2)
    assert stats["canceled"] == before["canceled"] + 1
    assert stats["steps"] - before["steps"] < 120  # it stopped long before the 3 x 40 steps
    # the replica serves the next request normally
    result = list(serve_worker.options(multiplexed_model_id="tiny-sd1", stream=True).generate.remote(
        _request(seeds=[9])))[-1]
    assert isinstance(result, WorkerResult) and len(result.images) == 1


def test_the_pipeline_is_free_while_an_image_is_encoded(core, monkeypatch):
    """PNGs are encoded off the generation thread: the checkpoint's lock (on a GPU host, the GPU) is
    free for the next image or request meanwhile."""
    import genserve.engine.generate as engine

    encoding, release = threading.Event(), threading.Event()
    real = engine.encode_image

    def held_encode(image, info, *args):
        encoding.set()
        assert release.wait(60)
        return real(image, info, *args)

    monkeypatch.setattr(engine, "encode_image", held_encode)
    loaded = core.checkpoint("tiny-sd1")
    results = []
    worker = threading.Thread(target=lambda: results.append(_generate(core, _request(seeds=[1]))))
    with one_torch_thread():
        worker.start()
        try:
            assert encoding.wait(60), "no PNG was encoded"
            assert loaded.lock.acquire(timeout=10), "the PNG encode held the pipeline's lock"
            loaded.lock.release()
        finally:
            release.set()
            worker.join(60)
    result, pngs = results[0]
    assert [i.index for i in result.images] == [0] and read_png_infotext(pngs[0]).params["Seed"] == "1"


def test_cancel_event_from_another_thread(core):
    cancel = threading.Event()
    events = []

    def progress(event):
        if isinstance(event, ProgressEvent):
            events.append(event)
        if len(events) == 4:  # image 1, step 1
            cancel.set()

    with one_torch_thread():
        result = core.generate(_request(steps=3, seeds=[1, 2, 3]), progress, cancel)
    assert result.canceled and [i.index for i in result.images] == [0] and len(events) == 4


def test_reconfigure_changes_hot_settings_only(core):
    from genserve.generation.worker.errors import ConfigNotHot

    loaded = core.checkpoint("tiny-sd1")
    saved = core.config
    try:
        core.reconfigure({"lora_cache": {"max_adapters": 1}, "blocklist_refresh_s": 5})
        assert loaded.loras.max_adapters == 1 and loaded.loras.recheck_s == 5.0
        assert loaded.loras.max_bytes == saved.lora_cache.max_bytes and len(loaded.loras) <= 1
        with pytest.raises(ConfigNotHot):
            core.reconfigure({"device": "cuda"})
    finally:
        core.reconfigure({"lora_cache": saved.lora_cache.model_dump(), "blocklist_refresh_s": saved.blocklist_refresh_s})


def test_scanner_threads_come_from_scan_threads(env):
    from genserve.generation.worker.core import WorkerCore

    settings = env["settings"]
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"scan_threads": 2})})
    core = WorkerCore("sd1", settings, db=env["db"], store=env["store"])
    try:
        detector = core.scanner.scanners[0].detector
        assert detector.session.get_session_options().intra_op_num_threads == 2
    finally:
        core.close()
