"""The generation worker: one Ray Serve deployment per model family, multiplexed by checkpoint id.

`WorkerCore` is the engine without Ray: it resolves resources by id from the registry, fetches their
files through the verified `ResourceCache`, loads a checkpoint with its mandatory safety embeddings
(checked after loading and on every health check), keeps LoRAs in a per-checkpoint adapter cache that
re-checks the likeness blocklist, generates, and scans every image (fail closed: an image whose scan
failed is not deliverable). Tests and benchmarks use it directly.

`FamilyWorker` wraps it for Serve: checkpoints are Serve-multiplexed models (LRU per replica), the
diffusers call runs in a thread while the replica's event loop streams progress, and a cancelled
Serve request sets the cancel event so the denoising loop stops within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from genserve.config import Settings
from genserve.db import Database
from genserve.engine.config import WorkerConfig
from genserve.engine.streaming import stream_from_thread
from genserve.errors import InvalidRequest, Unavailable
from genserve.resource_cache import ResourceCache
from genserve.resources import Resource, ResourceKind
from genserve.storage import ObjectStore, object_store_from_settings
from genserve.worker_types import (
    EncodedImage,
    ImageResult,
    ImageScan,
    ProgressEvent,
    WorkerRequest,
    WorkerResult,
)

if TYPE_CHECKING:
    from genserve.engine.generate import GeneratedImage

logger = logging.getLogger(__name__)


class ResourceRefused(InvalidRequest):
    """A resource id that names no usable resource of the right kind and family for this worker."""

    code = "resource_unusable"


class ResourceNotFound(ResourceRefused):
    code = "resource_not_found"


class ResourceDisabled(ResourceRefused):
    code = "resource_disabled"


class CheckpointConfigMissing(ResourceRefused):
    code = "checkpoint_config_missing"


class ReservedToken(ResourceRefused):
    """A user embedding whose token imitates a mandatory safety token."""

    code = "reserved_token"


class CheckpointMismatch(InvalidRequest):
    code = "checkpoint_mismatch"


class TooManySteps(InvalidRequest):
    code = "too_many_steps"


class TooManyImages(InvalidRequest):
    code = "too_many_images"


class ImageTooLarge(InvalidRequest):
    code = "image_too_large"


class CheckpointEvicted(Unavailable):
    code = "checkpoint_evicted"


class WorkerWedged(Unavailable):
    code = "worker_wedged"


class ScannerUnavailable(Unavailable):
    code = "scanner_unavailable"


class ConfigNotHot(InvalidRequest):
    code = "config_not_hot"


# ------------------------------------------------------------------------------------- loaded models


@dataclass
class _ResolvedLora:
    resource_id: str
    name: str
    sha256: str
    path: Path
    autov3: str
    strength: float


class LoadedCheckpoint:
    """A pipeline resident in a replica, with its safety embeddings, LoRA cache and generation lock.

    Serve's multiplexer calls `__del__` when it evicts the model (and Python may call it again at
    collection), while a request that already holds the object may still be generating; so `close`
    is idempotent and frees the GPU memory only once the last user has finished.
    """

    def __init__(self, checkpoint_id: str, resource: Resource, pipe: Any, safety: Any, loras: Any):
        self.checkpoint_id = checkpoint_id
        self.name = resource.name
        self.sha256 = resource.sha256
        self.pipe = pipe
        self.safety = safety
        self.loras = loras
        self.lock = threading.Lock()  # one generation at a time: adapters live in the shared modules
        self._state = threading.Lock()
        self._users = 0
        self._closing = False
        self._freed = False

    @property
    def model_hash(self) -> str:
        from genserve.engine.infotext import autov2

        return autov2(self.sha256)

    @property
    def freed(self) -> bool:
        return self._freed

    @property
    def closing(self) -> bool:
        return self._closing

    @contextlib.contextmanager
    def in_use(self) -> Iterator[LoadedCheckpoint]:
        with self._state:
            if self._closing:
                raise CheckpointEvicted(f"checkpoint {self.checkpoint_id} was unloaded; retry the request")
            self._users += 1
        try:
            yield self
        finally:
            with self._state:
                self._users -= 1
                free_now = self._closing and self._users == 0
            if free_now:
                self._free()

    def close(self) -> None:
        with self._state:
            if self._closing:
                return
            self._closing = True
            free_now = self._users == 0
        if free_now:
            self._free()

    def _free(self) -> None:
        with self._state:
            if self._freed:
                return
            self._freed = True
        with contextlib.suppress(Exception):
            self.loras.clear()
        pipe, self.pipe = self.pipe, None
        self.loras = None
        if pipe is not None:
            from genserve.engine.generate import drop_pipeline_views

            with contextlib.suppress(Exception):
                drop_pipeline_views(pipe)
            for name in list(pipe.components):
                with contextlib.suppress(Exception):
                    setattr(pipe, name, None)
            del pipe
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("unloaded checkpoint %s", self.checkpoint_id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also runs at interpreter shutdown
            self.close()


# ----------------------------------------------------------------------------------------- the core


class WorkerCore:
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
        from genserve.model_catalog import load_model_catalog

        self.family = family
        self.settings = settings
        self.config: WorkerConfig = settings.worker
        self.catalog = load_model_catalog(settings.config_path("models.yaml"))
        self.family_entry = self.catalog.family(family)
        self.db = db or Database.from_settings(settings)
        self.store = store or object_store_from_settings(settings)
        self.cache = ResourceCache(self.store, self.config.cache_dir(settings.models_dir),
                                   self.config.resource_cache_max_bytes)
        if blocklist is None:
            from safety.likeness import LikenessBlocklist

            blocklist = LikenessBlocklist(self.db.session)
        self.blocklist = blocklist
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
        # replica counters for operators (and tests): requests run, canceled, images made, steps run
        self.counters = {"requests": 0, "canceled": 0, "images": 0, "steps": 0}
        if self.device == "cpu" and self.config.cpu_threads:
            import torch

            torch.set_num_threads(self.config.cpu_threads)

    def _device(self) -> str:
        if self.config.device != "auto":
            return self.config.device
        from genserve.pipelines.loading import default_device

        return default_device()

    # ---- safety components ----------------------------------------------------------------------
    @property
    def scanner(self) -> Any | None:
        """The image scanner, built on first use; None (with `_scanner_error`) when it cannot be built."""
        if self._scanner is None and self._scanner_error is None:
            try:
                from safety.image_scan import ImageScanner

                safety = self.settings.safety
                self._scanner = ImageScanner.from_config(
                    self.settings.config_path(safety.rules_dir) / safety.image_scan_file,
                    threads=self.config.image_scan_threads,
                )
            except Exception as exc:  # noqa: BLE001 - no scanner: every image fails closed
                self._scanner_error = f"image scanner unavailable: {type(exc).__name__}: {exc}"
                logger.error("%s", self._scanner_error)
        return self._scanner

    def safety_embeddings(self) -> Any:
        from safety.embeddings import SafetyEmbeddings

        return SafetyEmbeddings.from_config(
            self.family, self.family_entry.safety_embeddings_config(), self.settings.models_dir
        )

    # ---- resources ------------------------------------------------------------------------------
    def resource(self, resource_id: str, kind: ResourceKind) -> Resource:
        with self.db.session() as s:
            row = s.get(Resource, resource_id)
        if row is None:
            raise ResourceNotFound(f"no resource {resource_id!r}", details={"resource_id": resource_id})
        if row.kind != kind or row.family.value != self.family:
            raise ResourceRefused(
                f"resource {resource_id} is a {row.family.value} {row.kind.value}, not a {self.family} {kind.value}",
                details={"resource_id": resource_id},
            )
        if not row.generation_enabled:
            raise ResourceDisabled(f"resource {resource_id} is disabled", details={"resource_id": resource_id})
        return row

    @staticmethod
    def _fmt(row: Resource) -> str:
        return "folder" if row.format == "diffusers" else "file"

    def _single_file_config(self, row: Resource) -> tuple[str, str] | Path:
        """The diffusers config folder of a single-file checkpoint: published (meta) or local (catalog)."""
        meta = (row.meta or {}).get("config")
        if isinstance(meta, dict) and meta.get("storage_key") and meta.get("sha256"):
            return (meta["storage_key"], meta["sha256"])
        entry = self.catalog.checkpoint(row.id)
        if entry is not None and entry.config:
            return self.settings.models_dir / entry.config
        raise CheckpointConfigMissing(f"single-file checkpoint {row.id} has no config folder")

    # ---- checkpoints ----------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_id: str) -> LoadedCheckpoint:
        """Load a checkpoint with its safety embeddings (verified) and an empty LoRA cache."""
        from genserve.engine.generate import prepare_pipeline
        from genserve.engine.lora_cache import LoraCache
        from genserve.pipelines.loading import load_pipeline

        row = self.resource(checkpoint_id, ResourceKind.checkpoint)
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, self._fmt(row)))
            config_dir = None
            if row.format != "diffusers":
                config = self._single_file_config(row)
                config_dir = config if isinstance(config, Path) else stack.enter_context(
                    self.cache.use(config[0], config[1], "folder"))
            pipe = load_pipeline(self.family, path, row.format, config_dir=config_dir, device=self.device)
        prepare_pipeline(pipe, self.config)
        safety = self.safety_embeddings()
        safety.load_into(pipe)  # raises EmbeddingUnavailable: a model without them is never served
        loras = LoraCache(pipe, self.blocklist, max_adapters=self.config.lora_cache.max_adapters,
                          max_bytes=self.config.lora_cache.max_bytes, recheck_s=self.config.blocklist_refresh_s)
        logger.info("loaded checkpoint %s (%s) on %s in %.0f ms", checkpoint_id, row.format, self.device,
                    (time.perf_counter() - started) * 1000)
        return LoadedCheckpoint(checkpoint_id, row, pipe, safety, loras)

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
        from genserve.engine.generate import hires_size
        from genserve.engine.schedulers import sampler_spec

        sampler_spec(request.sampler)
        cfg = self.config
        if request.steps > cfg.max_steps or (request.hires and (request.hires.steps or 0) > cfg.max_steps):
            raise TooManySteps(f"at most {cfg.max_steps} steps")
        if len(request.seeds) > cfg.max_images:
            raise TooManyImages(f"at most {cfg.max_images} images per request")
        width, height = request.width, request.height
        if request.hires:
            width, height = hires_size(width, height, request.hires.scale)
        if width * height > cfg.max_pixels:
            raise ImageTooLarge(f"{width}x{height} is over {cfg.max_pixels} pixels")

    def _fetch_loras(self, request: WorkerRequest, stack: contextlib.ExitStack) -> list[_ResolvedLora]:
        from genserve.engine.infotext import autov3
        from genserve.engine.lora_cache import LoraInvalid
        from safety.hashing import file_hashes

        out = []
        for spec in request.loras:
            row = self.resource(spec.resource_id, ResourceKind.lora)
            if row.format != "safetensors":
                raise LoraInvalid(f"LoRA {row.id} is not a safetensors file")
            path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, "file"))
            tensor_sha = row.tensor_sha256 or file_hashes(path).tensor_sha256
            out.append(_ResolvedLora(row.id, row.name, row.sha256, path, autov3(tensor_sha), spec.strength))
        return out

    def _fetch_embeddings(self, request: WorkerRequest, stack: contextlib.ExitStack,
                          reserved: Sequence[str]) -> list[tuple[Resource, Path, str]]:
        out = []
        for resource_id in request.embeddings:
            row = self.resource(resource_id, ResourceKind.embedding)
            token = str((row.meta or {}).get("token") or row.name)
            if any(r.lower() in token.lower() for r in reserved):
                raise ReservedToken(f"embedding {row.id} uses a reserved safety token",
                                      details={"resource_id": row.id})
            path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, "file"))
            out.append((row, path, token))
        return out

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
        from genserve.engine.generate import ModelInfo, generate
        from genserve.engine.textual_inversion import user_embeddings

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
            png = image.encode()
            if on_event is not None:
                on_event(EncodedImage(job_id=request.job_id, index=image.index, seed=image.seed, png=png))
            return (time.perf_counter() - t0) * 1000

        scans: dict[int, Future[tuple[ImageScan, float]]] = {}
        encodes: dict[int, Future[float]] = {}

        def finished(image: GeneratedImage) -> None:
            scans[image.index] = self._scanning.submit(self._timed_scan, image.image)
            encodes[image.index] = self._encoding.submit(encode, image)

        with loaded.in_use(), contextlib.ExitStack() as files:
            loras = self._fetch_loras(request, files)
            embeddings = self._fetch_embeddings(request, files, loaded.safety.reserved_tokens)
            timings["fetch_ms"] = (time.perf_counter() - started) * 1000
            t_wait = time.perf_counter()
            with loaded.lock, self._busy_marker():
                timings["queue_ms"] = (time.perf_counter() - t_wait) * 1000
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
                )
                with user_embeddings(loaded.pipe, self.family, [(path, token) for _, path, token in embeddings]):
                    outcome = generate(loaded.pipe, request, safety=loaded.safety, model=model,
                                       on_progress=progress, cancel=cancel, on_image=finished)
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
                                      scan=scan, deliverable=scan.ok))
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

    # ---- scanning -------------------------------------------------------------------------------
    def _timed_scan(self, image: Any) -> tuple[ImageScan, float]:
        started = time.perf_counter()
        return self.scan(image), (time.perf_counter() - started) * 1000

    def scan(self, image: Any) -> ImageScan:
        """The scanner's verdict on one image; any failure is recorded and makes it undeliverable."""
        scanner = self.scanner
        if scanner is None:
            return ImageScan(level=None, errors=[self._scanner_error or "image scanner unavailable"])
        try:
            result = scanner.scan(image)
        except Exception as exc:  # noqa: BLE001 - fail closed
            return ImageScan(level=None, errors=[f"{type(exc).__name__}: {exc}"])
        level = getattr(result, "level", None)
        errors = [str(e) for e in (getattr(result, "scanner_errors", None) or [])]
        return ImageScan(
            level=None if level is None else (level.name.lower() if isinstance(level, Enum) else str(level)),
            detections=[_as_dict(d) for d in (getattr(result, "detections", None) or [])],
            minor_signal=bool(getattr(result, "minor_signal", False)),
            errors=errors,
        )

    # ---- health and settings --------------------------------------------------------------------
    def check_health(self, models: Sequence[LoadedCheckpoint] | None = None) -> None:
        """Raise when a resident model lost its safety embeddings, the scanner is gone, or a generation
        has made no step progress for `wedge_timeout_s`. Never waits for a generation to end."""
        with self._heartbeat_lock:
            busy, idle_s = self._busy, time.monotonic() - self._last_progress
        if busy and idle_s > self.config.wedge_timeout_s:
            raise WorkerWedged(f"no generation progress for {idle_s:.0f} s while busy")
        if self.scanner is None:
            raise ScannerUnavailable(self._scanner_error or "image scanner unavailable")
        for loaded in self.loaded() if models is None else models:
            if loaded.freed or loaded.pipe is None:
                continue
            # checked between generations (not mid-way through a per-request embedding load); one
            # that is generating is left to the wedge check above: waiting for it would hold the
            # health check past its timeout on a long job, and Serve would kill the replica
            if not loaded.lock.acquire(blocking=False):
                continue
            try:
                if loaded.pipe is not None:
                    loaded.safety.check(loaded.pipe)
            finally:
                loaded.lock.release()

    def reconfigure(self, user_config: dict[str, Any], models: Sequence[LoadedCheckpoint] | None = None) -> None:
        """Hot settings: LoRA cache limits, blocklist re-check interval, xformers flag."""
        data = self.config.model_dump()
        for key, value in (user_config or {}).items():
            if key == "lora_cache" and isinstance(value, dict):
                data["lora_cache"] = {**data["lora_cache"], **value}
            elif key in ("blocklist_refresh_s", "enable_xformers", "wedge_timeout_s"):
                data[key] = value
            else:
                raise ConfigNotHot(f"{key!r} cannot be changed without a restart")
        self.config = WorkerConfig.model_validate(data)
        for loaded in self.loaded() if models is None else models:
            if loaded.freed:
                continue
            with loaded.lock:
                loaded.loras.set_limits(max_adapters=self.config.lora_cache.max_adapters,
                                        max_bytes=self.config.lora_cache.max_bytes,
                                        recheck_s=self.config.blocklist_refresh_s)
                if loaded.pipe is not None and loaded.pipe.device.type == "cuda":
                    if self.config.enable_xformers:
                        from genserve.engine.generate import prepare_pipeline

                        prepare_pipeline(loaded.pipe, self.config)
                    else:
                        loaded.pipe.disable_xformers_memory_efficient_attention()


def _infotext_name(name: str) -> str:
    """A LoRA name as A1111 lists it in "Lora hashes" (no separators of that list)."""
    return "".join("_" if c in ',:"\n' else c for c in name)


def _as_dict(detection: Any) -> dict:
    if isinstance(detection, dict):
        return detection
    for attr in ("to_dict", "model_dump", "_asdict"):
        if hasattr(detection, attr):
            return dict(getattr(detection, attr)())
    if hasattr(detection, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(detection)
    return {"value": str(detection)}


# ----------------------------------------------------------------------------------- the deployment


@serve.deployment(
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)
class FamilyWorker:
    """Serve deployment for one family; deploy with `.options(name=f"worker-{family}")`.

    Call: `handle.options(multiplexed_model_id=checkpoint_id, stream=True).generate.remote(request)`
    yields `ProgressEvent`s and, as each image is encoded, its `EncodedImage`, then one `WorkerResult`. Refusals raise typed `GenserveError`s: among them
    `ResourceRefused` (resource_not_found / resource_unusable / resource_disabled), `LikenessBlocked`
    (likeness_blocked, a SafetyBlocked), `LikenessCheckFailed`, `LoraInvalid`, `LoraIncompatible`,
    `UnknownSampler`, `ResourceIntegrityError` and safety's `EmbeddingUnavailable`.
    """

    def __init__(self, family: str, settings: dict[str, Any]):
        from genserve.pipelines.loading import disable_progress_bars

        disable_progress_bars()
        self.core = WorkerCore(family, Settings.model_validate(settings))

        self._loaded: dict[str, LoadedCheckpoint] = {}

        async def load_checkpoint(checkpoint_id: str) -> LoadedCheckpoint:
            loaded = await asyncio.to_thread(self.core.load_checkpoint, checkpoint_id)
            self._loaded[checkpoint_id] = loaded
            return loaded

        # the limit comes from settings, so the multiplexed loader is wired per instance
        self.get_checkpoint = serve.multiplexed(
            max_num_models_per_replica=self.core.config.max_models_per_replica
        )(load_checkpoint)

    def _resident(self) -> list[LoadedCheckpoint]:
        """Checkpoints the multiplexer still holds (an evicted one was closed through `__del__`)."""
        for checkpoint_id, loaded in list(self._loaded.items()):
            if loaded.closing:
                self._loaded.pop(checkpoint_id, None)
        return list(self._loaded.values())

    async def generate(self, request: WorkerRequest) -> AsyncIterator[ProgressEvent | WorkerResult]:
        model_id = serve.get_multiplexed_model_id()
        if model_id and model_id != request.checkpoint_id:
            raise CheckpointMismatch(f"routed as {model_id} but asks for {request.checkpoint_id}")
        self.core.validate(request)
        loaded = await self.get_checkpoint(request.checkpoint_id)
        cancel = threading.Event()
        # a cancelled Serve request or a closed stream sets `cancel`: the denoising loop stops within a step
        async for item in stream_from_thread(
            lambda on_event: self.core.run(loaded, request, on_event, cancel), cancel
        ):
            yield item

    def check_health(self) -> None:
        self.core.check_health(self._resident())

    def stats(self) -> dict[str, Any]:
        """This replica's counters and resident checkpoints (for operators; Serve routes to any replica)."""
        return {**self.core.stats(), "checkpoints": [m.checkpoint_id for m in self._resident()]}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config, self._resident())

