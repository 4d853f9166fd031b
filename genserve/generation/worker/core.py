"""`WorkerCore`: everything a generation replica does, callable without Ray (tests, benchmarks,
the in-process backend); `deployment.FamilyWorker` wraps it for Serve.

It asks the registry again whether each resource may be used (`ResourceRegistry.usable`, the
ingress's own question), fetches files through the verified `ResourceCache`, loads a checkpoint with
its mandatory safety embeddings (checked after loading and on every health check), keeps LoRAs in a
per-checkpoint adapter cache that re-checks the likeness blocklist, built by `SafetyGate` from the
same rule files as the ingress, generates, and scans every image (fail closed: an image whose scan
failed is not deliverable).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from genserve.core.config import Settings
from genserve.core.config.worker import WorkerConfig
from genserve.core.db import Database
from genserve.core.storage import ObjectStore, object_store_from_settings
from genserve.engine.generate import (
    GeneratedImage,
    ModelInfo,
    generate,
    prepare_pipeline,
)
from genserve.engine.geometry import Box, inpaint_work_box
from genserve.engine.infotext import autov2
from genserve.engine.loading import default_device, load_pipeline
from genserve.engine.lora_cache import LikenessBlocked, LoraCache
from genserve.engine.schedulers import sampler_spec
from genserve.engine.textual_inversion import user_embeddings
from genserve.engine.vae import vae_swapped
from genserve.generation.inputs import decode_image
from genserve.generation.worker.checkpoint import LoadedCheckpoint
from genserve.generation.worker.errors import (
    CheckpointMismatch,
    ImageTooLarge,
    InputImageChanged,
    TooManyImages,
    TooManySteps,
)
from genserve.generation.worker.files import WorkerFiles
from genserve.generation.worker.upkeep import WorkerUpkeep
from genserve.generation.worker.wire import (
    EncodedImage,
    ImageResult,
    ImageScan,
    ProgressEvent,
    WorkerRequest,
    WorkerResult,
)
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import load_model_catalog
from genserve.resources.models import Resource, ResourceKind
from genserve.resources.registry import ResourceRegistry, ResourceUnavailable
from safety.embeddings import SafetyEmbeddings
from safety.gate import SafetyGate
from safety.input_scan import scan_views
from safety.likeness import RequestCheck

logger = logging.getLogger(__name__)


class WorkerCore(WorkerUpkeep):
    """Everything a generation replica does, callable without Ray."""

    def __init__(
        self,
        family: str,
        settings: Settings,
        *,
        db: Database | None = None,
        store: ObjectStore | None = None,
        blocklist: Any | None = None,
        scanner: Any | None = None,
    ):

        self.family = family
        self.settings = settings
        self.config: WorkerConfig = settings.worker
        self.catalog = load_model_catalog(settings.config_path("models.yaml"))
        self.family_entry = self.catalog.family(family)
        self.db = db or Database.from_settings(settings)
        self.store = store or object_store_from_settings(settings)
        self.cache = ResourceCache(self.store, self.config.cache_dir(settings.models_dir),
                                   self.config.resource_cache_max_bytes)
        # the same rule files as the ingress: the likeness thresholds above all (defence in depth)
        self.safety = SafetyGate.build(settings.safety, settings.config_dir, self.db.session)
        self.blocklist = blocklist if blocklist is not None else self.safety.blocklist
        self.files = WorkerFiles(family, ResourceRegistry(self.db), self.cache, self.catalog, settings.models_dir,
                                 RequestCheck(self.blocklist))
        self._scanner = scanner
        self._scanner_error: str | None = None
        # each image is scanned and encoded on these while the pipeline goes on with the next image
        # or request: a 1024² PNG takes 0.1-0.2 s of CPU that would otherwise hold the GPU's lock
        self._scanning = ThreadPoolExecutor(1, thread_name_prefix="image-scan")
        self._encoding = ThreadPoolExecutor(1, thread_name_prefix="image-png")
        self.device = self._device()
        self._models: OrderedDict[str, LoadedCheckpoint] = OrderedDict()  # the Ray-less multiplexer
        self._models_lock = threading.Lock()
        self._busy = 0
        self._last_progress = time.monotonic()
        self._heartbeat_lock = threading.Lock()
        self._swept: dict[str, float] = {}  # checkpoint id -> when its adapters were last matched to the registry
        # replica counters for operators (and tests): requests run, canceled, images made, steps run
        self.counters = {"requests": 0, "canceled": 0, "images": 0, "steps": 0}
        if self.device == "cpu" and self.config.cpu_threads:

            torch.set_num_threads(self.config.cpu_threads)

    def _device(self) -> str:
        if self.config.device != "auto":
            return self.config.device

        return default_device()

    # ---- safety components ----------------------------------------------------------------------
    @property
    def scanner(self) -> Any | None:
        """The image scanner, built on first use; None (with `_scanner_error`) when it cannot be built."""
        if self._scanner is None and self._scanner_error is None:
            try:
                self._scanner = self.safety.image_scanner(threads=self.config.image_scan_threads)
            except Exception as exc:  # noqa: BLE001 - no scanner: every image fails closed
                self._scanner_error = f"image scanner unavailable: {type(exc).__name__}: {exc}"
                logger.error("%s", self._scanner_error)
        return self._scanner

    def safety_embeddings(self) -> SafetyEmbeddings:
        return self.safety.embeddings(self.family, self.family_entry.safety_embeddings_config(),
                                      self.settings.models_dir)

    # ---- resources ------------------------------------------------------------------------------
    def resource(self, resource_id: str, kind: ResourceKind) -> Resource:
        return self.files.resource(resource_id, kind)

    # ---- checkpoints ----------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_id: str) -> LoadedCheckpoint:
        """Load a checkpoint with its safety embeddings (verified) and an empty LoRA cache; a checkpoint on
        the likeness blocklist (by file or tensor hash) is never loaded."""
        row = self.resource(checkpoint_id, ResourceKind.checkpoint)
        match = self.blocklist.check_hashes(row.sha256, row.tensor_sha256)
        if match is not None:
            raise LikenessBlocked("this checkpoint reproduces a real person's likeness and cannot be used",
                                  details={"sha256": row.sha256, **match.to_dict()})
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            path, config_dir = self.files.checkpoint(row, stack)
            pipe = load_pipeline(self.family, path, row.format, config_dir=config_dir, device=self.device)
        prepare_pipeline(pipe, self.config)
        safety = self.safety_embeddings()
        safety.load_into(pipe)  # raises EmbeddingUnavailable: a model without them is never served
        loras = LoraCache(pipe, self.blocklist, max_adapters=self.config.lora_cache.max_adapters,
                          max_bytes=self.config.lora_cache.max_bytes, recheck_s=self.config.blocklist_refresh_s)
        logger.info("loaded checkpoint %s (%s) on %s in %.0f ms", checkpoint_id, row.format, self.device,
                    (time.perf_counter() - started) * 1000)
        return LoadedCheckpoint(checkpoint_id, row, pipe, safety, loras, max_vaes=self.config.vae_cache_size)

    def checkpoint(self, checkpoint_id: str) -> LoadedCheckpoint:
        """The Ray-less multiplexer: an LRU of `max_models_per_replica` loaded checkpoints."""
        with self._models_lock:
            loaded = self._models.get(checkpoint_id)
            if loaded is not None:
                self._models.move_to_end(checkpoint_id)
                return loaded
            while len(self._models) >= self.config.max_models_per_replica:
                _, evicted = self._models.popitem(last=False)
                evicted.close()
            loaded = self.load_checkpoint(checkpoint_id)
            self._models[checkpoint_id] = loaded
            return loaded

    def loaded(self) -> list[LoadedCheckpoint]:
        with self._models_lock:
            return list(self._models.values())

    def close(self) -> None:
        with self._models_lock:
            models, self._models = list(self._models.values()), OrderedDict()
        for loaded in models:
            loaded.close()
        self._scanning.shutdown(wait=False, cancel_futures=True)
        self._encoding.shutdown(wait=False, cancel_futures=True)

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, request: WorkerRequest) -> None:
        """The worker's own limits, whatever the caller checked (cheap, before any loading)."""
        sampler_spec(request.sampler)
        cfg = self.config
        if request.steps > cfg.max_steps or (request.hires and (request.hires.steps or 0) > cfg.max_steps):
            raise TooManySteps(f"at most {cfg.max_steps} steps")
        if len(request.seeds) > cfg.max_images:
            raise TooManyImages(f"at most {cfg.max_images} images per request")
        width, height = request.width, request.height
        if request.hires:
            width, height = request.hires.target_size(width, height)
        if width * height > cfg.max_pixels:
            raise ImageTooLarge(f"{width}x{height} is over {cfg.max_pixels} pixels")

    def stats(self) -> dict[str, int]:
        with self._heartbeat_lock:
            return dict(self.counters)

    def _heartbeat(self) -> None:
        with self._heartbeat_lock:
            self._last_progress = time.monotonic()
            self.counters["steps"] += 1

    @contextlib.contextmanager
    def _busy_marker(self) -> Iterator[None]:
        with self._heartbeat_lock:
            self._busy += 1
            self._last_progress = time.monotonic()
        try:
            yield
        finally:
            with self._heartbeat_lock:
                self._busy -= 1

    def run(
        self,
        loaded: LoadedCheckpoint,
        request: WorkerRequest,
        on_event: Callable[[ProgressEvent | EncodedImage], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> WorkerResult:
        """Generate `request` on `loaded`. A set `cancel` stops within one step; finished images are kept.

        `on_event` gets each step's `ProgressEvent` and each finished image's `EncodedImage`; the
        returned result holds the images' verdicts, once their scans are done."""
        if request.checkpoint_id != loaded.checkpoint_id:
            raise CheckpointMismatch(f"request for {request.checkpoint_id} sent to {loaded.checkpoint_id}")
        self.validate(request)
        cancel = cancel or threading.Event()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        count = len(request.seeds)

        def progress(index: int, step: int, total: int) -> None:
            self._heartbeat()
            if on_event is not None:
                on_event(ProgressEvent(job_id=request.job_id, image_index=index, image_count=count,
                                       step=step, total_steps=total))

        def encode(image: GeneratedImage) -> float:
            t0 = time.perf_counter()
            png = image.encode(request.output_format, request.quality)
            if on_event is not None:
                on_event(EncodedImage(job_id=request.job_id, index=image.index, seed=image.seed, data=png,
                                      format=request.output_format))
            return (time.perf_counter() - t0) * 1000

        scans: dict[int, Future[tuple[ImageScan, float]]] = {}
        encodes: dict[int, Future[float]] = {}

        def finished(image: GeneratedImage) -> None:
            scans[image.index] = self._scanning.submit(self._timed_scan, image.image, regions)
            encodes[image.index] = self._encoding.submit(encode, image)

        init = self.init_images(request)
        regions = output_regions(request, init)
        with loaded.in_use(), contextlib.ExitStack() as files:
            try:
                loras = self.files.loras(request, files)
            except ResourceUnavailable as exc:
                if exc.code == "resource_disabled":
                    self._drop_disabled(loaded, exc.details.get("id"))
                raise
            embeddings = self.files.embeddings(request, files, loaded.safety.reserved_tokens)
            vae = self.files.vae(request, files)
            timings["fetch_ms"] = (time.perf_counter() - started) * 1000
            # built outside the generation lock: a VAE only joins the pipeline for the job, below
            t_vae = time.perf_counter()
            vae_module = loaded.vaes.get(vae.sha256, vae.path) if vae is not None else None
            timings["vae_load_ms"] = (time.perf_counter() - t_vae) * 1000
            t_wait = time.perf_counter()
            with loaded.lock.prioritized(request.priority), self._busy_marker():
                timings["queue_ms"] = (time.perf_counter() - t_wait) * 1000
                self._sweep_disabled(loaded)
                t_lora = time.perf_counter()
                protect = [lora.sha256 for lora in loras]
                adapters = [(loaded.loras.ensure(lora.sha256, lora.path, protect=protect).name, lora.strength)
                            for lora in loras]
                timings["lora_load_ms"] = (time.perf_counter() - t_lora) * 1000
                timings["lora_activate_ms"] = loaded.loras.activate(adapters)
                model = ModelInfo(
                    name=loaded.name, model_hash=loaded.model_hash,
                    lora_hashes={_infotext_name(lora.name): lora.autov3 for lora in loras},
                    ti_hashes={token: row.sha256[:12] for row, _, token in embeddings},
                    vae_name=vae.name if vae else None, vae_hash=autov2(vae.sha256) if vae else None,
                )
                with vae_swapped(loaded.pipe, vae_module, loaded.vaes.own), \
                        user_embeddings(loaded.pipe, self.family, [(path, token) for _, path, token in embeddings]):
                    outcome = generate(loaded.pipe, request, safety=loaded.safety, model=model,
                                       on_progress=progress, cancel=cancel, on_image=finished,
                                       batch_size=self.config.batch_size.get(self.family, 1), init=init,
                                       face_detector=self._face_detector() if request.face_fix else None)
        timings.update(outcome.timings_ms)
        with self._heartbeat_lock:
            self.counters["requests"] += 1
            self.counters["canceled"] += int(outcome.canceled)
            self.counters["images"] += len(outcome.images)
        t_wait = time.perf_counter()
        images = []
        timings["scan_ms"] = timings["encode_ms"] = 0.0
        for img in outcome.images:
            timings["encode_ms"] += encodes[img.index].result()
            scan, scan_ms = scans[img.index].result()
            timings["scan_ms"] += scan_ms
            images.append(ImageResult(index=img.index, seed=img.seed, width=img.image.width, height=img.image.height,
                                      scan=scan, deliverable=scan.ok, face_passes=img.face_passes))
        for index, (seed, reason) in outcome.failed.items():  # never encoded or stored: withheld, not charged
            images.append(ImageResult(index=index, seed=seed, width=request.width, height=request.height,
                                      scan=ImageScan.unfinished(reason), deliverable=False, failure="face_fix_failed"))
        # what the scans and PNGs (side by side) added to the request after its last image was decoded
        timings["scan_wait_ms"] = (time.perf_counter() - t_wait) * 1000
        timings["total_ms"] = (time.perf_counter() - started) * 1000
        return WorkerResult(
            job_id=request.job_id, checkpoint_id=request.checkpoint_id, images=images,
            canceled=outcome.canceled, final_prompt=outcome.final_prompt,
            final_negative_prompt=outcome.final_negative_prompt, model_hash=loaded.model_hash,
            lora_hashes={lora.resource_id: lora.autov3 for lora in loras}, timings_ms=timings,
        )

    def generate(self, request: WorkerRequest, on_event: Callable[[ProgressEvent | EncodedImage], None] | None = None,
                 cancel: threading.Event | None = None) -> WorkerResult:
        """Ray-less entry point: pick (load) the checkpoint, then `run`."""
        self.validate(request)
        return self.run(self.checkpoint(request.checkpoint_id), request, on_event, cancel)

    def _face_detector(self) -> Any | None:
        """The face fix's detector: the image scanner's NudeNet model, already loaded for the scan."""
        scanner = self.scanner
        return getattr(scanner, "faces", None)

    def init_images(self, request: WorkerRequest) -> tuple[Image.Image, Image.Image | None] | None:
        """The input image (and mask) from the store, each checked against the digest the ingress judged
        it by, and decoded under the same bounds."""
        spec = request.init
        if spec is None:
            return None
        limits = self.settings.generation.input_images
        decoded = []
        for key, digest, mask in ((spec.image_key, spec.image_sha256, False), (spec.mask_key, spec.mask_sha256, True)):
            if key is None:
                decoded.append(None)
                continue
            if f"/{request.job_id}/" not in key:  # a request reads its own job's inputs, nothing else
                raise InputImageChanged(f"{key} is not an input of job {request.job_id}")
            data = self.store.get_bytes(key)
            if hashlib.sha256(data).hexdigest() != digest:
                raise InputImageChanged(f"{key} is not the input the request was admitted with")
            decoded.append(decode_image(data, limits, field="mask" if mask else "init_image", mask=mask).image)
        return decoded[0], decoded[1]

    # ---- disabled resources ---------------------------------------------------------------------


    # ---- scanning -------------------------------------------------------------------------------
    def _timed_scan(self, image: Any, regions: list[Box] | None = None) -> tuple[ImageScan, float]:
        started = time.perf_counter()
        return self.scan(image, regions), (time.perf_counter() - started) * 1000

    def scan(self, image: Image.Image, regions: list[Box] | None = None) -> ImageScan:
        """The scanner's verdict on one image (and on each of `regions` of it at their own scale, merged);
        any failure is recorded and makes it undeliverable."""
        scanner = self.scanner
        if scanner is None:
            return ImageScan.unfinished(self._scanner_error or "image scanner unavailable")
        try:
            if regions:
                return ImageScan.of(scan_views(scanner, image, regions, tile=False, rotations=False))
            return ImageScan.of(scanner.scan(image))
        except Exception as exc:  # noqa: BLE001 - fail closed
            return ImageScan.unfinished(f"{type(exc).__name__}: {exc}")

    # ---- health and settings --------------------------------------------------------------------



def output_regions(request: WorkerRequest, init: tuple[Image.Image, Image.Image | None] | None) -> list[Box]:
    """The box of an only-masked inpaint's output the engine repainted (pasted back shrunk into an image
    of the input's size): scanned at its own scale too, like the input's."""
    spec = request.init
    if spec is None or init is None or init[1] is None or spec.workflow != "inpaint" or not spec.only_masked:
        return []
    return [inpaint_work_box(init[1], mask_blur=spec.mask_blur, padding=spec.padding, width=request.width,
                             height=request.height)]


def _infotext_name(name: str) -> str:
    """A LoRA name as A1111 lists it in "Lora hashes" (no separators of that list)."""
    return "".join("_" if c in ',:"\n' else c for c in name)
