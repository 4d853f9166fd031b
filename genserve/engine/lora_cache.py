"""The LoRA adapters resident in one loaded pipeline: an LRU cache with explicit count and byte limits.

Adapters are read with `safetensors.torch.load_file` (never pickle) and loaded from the in-memory state
dict, kohya (`lora_unet_*`/`lora_te*_*`) and diffusers/PEFT key layouts alike. Before any weight
reaches the pipeline the file is checked against the likeness blocklist, and a resident adapter is
checked again once its last answer is older than `recheck_s`, so a LoRA blocklisted while resident
stops being used. Eviction deletes the adapter from the pipeline explicitly (`delete_adapters`) rather
than relying on garbage collection. Not thread-safe on its own: the caller holds the pipeline's
generation lock, since adapter state lives in the shared UNet and text encoders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft.tuners.lora.layer import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from genserve.core import metrics
from genserve.core.errors import InvalidRequest, SafetyBlocked, Unavailable
from genserve.engine.loading import MODEL_BUILD_LOCK
from safety.errors import SafetyError

logger = logging.getLogger(__name__)

# loggers whose per-load chatter ("No LoRA keys associated to CLIPTextModel", peft's "Already found a
# peft_config", transformers' LOAD REPORT) says nothing an operator can act on
_NOISY_LOGGERS = ("diffusers", "transformers", "peft")
_KEY_PATTERN = re.compile(r"(lora|\.alpha$|dora_scale|lora_magnitude_vector)")
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


class LikenessChecker(Protocol):
    """What the cache needs from the likeness blocklist (`safety.likeness.LikenessBlocklist`)."""

    def check(self, src: Path | bytes) -> Any | None: ...


class LikenessBlocked(SafetyBlocked):
    code = "likeness_blocked"


class LikenessCheckFailed(Unavailable):
    """The blocklist could not answer; the LoRA is refused (fail closed)."""

    code = "likeness_check_failed"


class LoraInvalid(InvalidRequest):
    code = "lora_invalid"


class LoraIncompatible(InvalidRequest):
    """The LoRA does not fit this checkpoint's architecture (another family, other module names)."""

    code = "lora_incompatible"


class LoraCacheFull(InvalidRequest):
    code = "lora_cache_limit"


class LoraTooLarge(LoraCacheFull):
    code = "lora_too_large"


@dataclass
class CachedAdapter:
    name: str
    sha256: str
    nbytes: int
    loaded_at: float
    checked_at: float
    load_ms: float


def adapter_name(sha256: str) -> str:
    """Adapters are named by content: the same file loads once whatever resource id points at it."""
    return f"lora_{sha256[:24]}"


@contextlib.contextmanager
def quiet_loaders() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _bake_header_alphas(state_dict: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """Apply a PEFT `lora_adapter_metadata` alpha by scaling `lora_B` by alpha/r in place.

    diffusers reads that header only when it opens the file itself; from a state dict it would run
    the adapter at scale 1.0 instead of alpha/r (the "strength 3-4x" complaint of header-only alphas).
    """
    raw = header.get(_ADAPTER_METADATA_KEY)
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise LoraInvalid(f"unreadable {_ADAPTER_METADATA_KEY} header: {exc}") from exc
    for key in [k for k in state_dict if ".lora_B." in k]:
        component, _, module = key.partition(".")
        alpha = meta.get(f"{component}.lora_alpha")
        for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
            if module.split(".lora_B.")[0].endswith(pattern):
                alpha = value
        if alpha is None:
            continue
        rank = state_dict[key].shape[1]
        state_dict[key] = state_dict[key] * (float(alpha) / rank)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a LoRA file; anything that is not a LoRA safetensors file is refused."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraInvalid(f"not a readable safetensors file: {exc}") from exc
    if not state_dict:
        raise LoraInvalid("the LoRA file holds no tensors")
    strays = [k for k in state_dict if not _KEY_PATTERN.search(k)]
    if strays:
        raise LoraInvalid(f"not a LoRA: {len(strays)} keys are no LoRA weights (e.g. {strays[0]!r})")
    _bake_header_alphas(state_dict, header)
    return state_dict, header


def _nbytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


class LoraCache:
    def __init__(
        self,
        pipe: Any,
        blocklist: LikenessChecker,
        *,
        max_adapters: int,
        max_bytes: int,
        recheck_s: float = 60.0,
    ):
        self.pipe = pipe
        self.blocklist = blocklist
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.recheck_s = recheck_s
        self._adapters: OrderedDict[str, CachedAdapter] = OrderedDict()  # sha256 -> adapter, LRU first
        self._active: tuple[tuple[str, float], ...] | None = None
        self._layers: list[LoraLayer] | None = None
        self.stats = {"hits": 0, "loads": 0, "evictions": 0, "switches": 0, "switch_ms_total": 0.0,
                      "load_ms_total": 0.0}

    # ---- state ----------------------------------------------------------------------------------
    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def total_bytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    def resident(self) -> list[str]:
        """sha256 of every resident adapter, least recently used first."""
        return list(self._adapters)

    def set_limits(self, *, max_adapters: int | None = None, max_bytes: int | None = None,
                   recheck_s: float | None = None) -> None:
        if max_adapters is not None:
            self.max_adapters = max_adapters
        if max_bytes is not None:
            self.max_bytes = max_bytes
        if recheck_s is not None:
            self.recheck_s = recheck_s
        self._make_room(0, protect=())

    # ---- blocklist ------------------------------------------------------------------------------
    def _check(self, sha256: str, path: Path) -> None:
        try:
            match = self.blocklist.check(path)
        except SafetyError as exc:
            if exc.code in ("not_safetensors", "lora_format_invalid", "lora_format_unsupported"):
                raise LoraInvalid(f"LoRA {sha256[:12]} is not a valid LoRA file: {exc.message}") from exc
            raise LikenessCheckFailed(f"likeness check failed for LoRA {sha256[:12]}: {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the check refuses the LoRA
            raise LikenessCheckFailed(
                f"likeness check failed for LoRA {sha256[:12]}: {type(exc).__name__}: {exc}"
            ) from exc
        if match is not None:
            details = match.to_dict() if hasattr(match, "to_dict") else {"match": str(match)}
            raise LikenessBlocked(
                "this LoRA reproduces a real person's likeness and cannot be used",
                details={"sha256": sha256, **details},
            )

    # ---- loading --------------------------------------------------------------------------------
    def ensure(self, sha256: str, path: Path, *, protect: Sequence[str] = ()) -> CachedAdapter:
        """The resident adapter for the file `path` (content `sha256`), loading it if needed.

        `protect` names adapters (sha256) that must stay resident, e.g. the other LoRAs of the same
        request. Raises LikenessBlocked / LikenessCheckFailed / LoraInvalid / LoraIncompatible.
        """
        now = time.monotonic()
        cached = self._adapters.get(sha256)
        if cached is not None:
            if now - cached.checked_at >= self.recheck_s:
                try:
                    self._check(sha256, path)
                except LikenessBlocked:
                    self.evict(sha256)
                    raise
                cached.checked_at = now
            self._adapters.move_to_end(sha256)
            self.stats["hits"] += 1
            metrics.inc("genserve_lora_cache_total", result="hit")
            return cached

        metrics.inc("genserve_lora_cache_total", result="miss")
        self._check(sha256, path)
        state_dict, _ = read_lora(path)
        nbytes = _nbytes(state_dict)
        if nbytes > self.max_bytes:
            raise LoraTooLarge(
                f"LoRA {sha256[:12]} holds {nbytes} bytes of weights, over this replica's {self.max_bytes}"
            )
        self._make_room(nbytes, protect=protect)
        name = adapter_name(sha256)
        started = time.perf_counter()
        try:
            with quiet_loaders():
                with MODEL_BUILD_LOCK:
                    self.pipe.load_lora_weights(state_dict, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/KeyError/RuntimeError alike
            self._delete_from_pipe(name)
            raise LoraIncompatible(
                f"LoRA {sha256[:12]} cannot be applied to this checkpoint: {type(exc).__name__}: {exc}"
            ) from exc
        if name not in self._pipe_adapters():
            raise LoraIncompatible(f"LoRA {sha256[:12]} has no weights for any module of this checkpoint")
        load_ms = (time.perf_counter() - started) * 1000
        adapter = CachedAdapter(name=name, sha256=sha256, nbytes=nbytes, loaded_at=time.time(), checked_at=now,
                                load_ms=load_ms)
        self._adapters[sha256] = adapter
        self._active, self._layers = None, None  # loading activates the new adapter in diffusers
        self.stats["loads"] += 1
        self.stats["load_ms_total"] += load_ms
        return adapter

    def _make_room(self, nbytes: int, *, protect: Sequence[str]) -> None:
        protected = set(protect)
        while self._adapters and (
            len(self._adapters) + (1 if nbytes else 0) > self.max_adapters
            or self.total_bytes + nbytes > self.max_bytes
        ):
            victim = next((sha for sha in self._adapters if sha not in protected), None)
            if victim is None:
                raise LoraCacheFull(
                    f"the request's LoRAs do not fit this replica's adapter cache "
                    f"({self.max_adapters} adapters, {self.max_bytes} bytes)"
                )
            self.evict(victim)

    # ---- eviction -------------------------------------------------------------------------------
    def _pipe_adapters(self) -> set[str]:
        try:
            listed = self.pipe.get_list_adapters()
        except Exception:  # noqa: BLE001 - a pipeline without the PEFT backend state has none
            return set()
        return {name for names in listed.values() for name in names}

    def _delete_from_pipe(self, name: str) -> None:
        """Idempotent: deleting an adapter the pipeline no longer has is a no-op."""
        if name in self._pipe_adapters():
            with quiet_loaders():
                self.pipe.delete_adapters(name)

    def evict(self, sha256: str) -> bool:
        adapter = self._adapters.pop(sha256, None)
        if adapter is None:
            return False
        self._delete_from_pipe(adapter.name)
        self._active, self._layers = None, None
        self.stats["evictions"] += 1
        return True

    def clear(self) -> None:
        for sha256 in list(self._adapters):
            self.evict(sha256)

    # ---- activation -----------------------------------------------------------------------------
    def _lora_layers(self) -> list[LoraLayer]:
        """Every LoRA layer of the pipeline, found once per change of the resident set: the walk over
        all modules of all components is most of what diffusers' `set_adapters` costs per call."""
        if self._layers is None:
            self._layers = [
                module
                for component in self.pipe.components.values() if isinstance(component, torch.nn.Module)
                for module in component.modules() if isinstance(module, LoraLayer)
            ]
        return self._layers

    def activate(self, adapters: Sequence[tuple[str, float]]) -> float:
        """Make exactly `adapters` ((adapter name, strength) pairs) active; none disables LoRA. Returns ms.

        The strength scales every layer of the adapter (UNet and text encoders alike, as A1111 applies
        it). A request with the same set and strengths as the previous one costs nothing.
        """
        wanted = tuple(adapters)
        if wanted == self._active:
            return 0.0
        started = time.perf_counter()
        names = [name for name, _ in wanted]
        for layer in self._lora_layers():
            if not wanted:
                if not layer.disable_adapters:
                    layer.enable_adapters(False)
                continue
            if layer.disable_adapters:  # only after a request without LoRAs
                layer.enable_adapters(True)
            layer.set_adapter(names, inference_mode=True)
            for name, strength in wanted:
                layer.set_scale(name, float(strength))
        elapsed = (time.perf_counter() - started) * 1000
        self._active = wanted
        self.stats["switches"] += 1
        self.stats["switch_ms_total"] += elapsed
        return elapsed
