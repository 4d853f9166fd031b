"""The files one generation needs, fetched for the worker: each resource asked again of the registry
(`usable`, the ingress's question; its answer may be stale by now), then taken from the verified
`ResourceCache` for as long as the caller's `ExitStack` holds it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path

from genserve.engine.infotext import autov3
from genserve.engine.lora_cache import LikenessBlocked, LoraInvalid
from genserve.engine.vae import VaeInvalid
from genserve.generation.worker.checkpoint import ResolvedLora, ResolvedVae
from genserve.generation.worker.wire import WorkerRequest
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import ModelCatalog
from genserve.resources.models import Resource, ResourceKind
from genserve.resources.registry import CheckpointConfigMissing, ReservedToken, ResourceRegistry
from safety.embeddings import uses_reserved_token
from safety.hashing import file_hashes
from safety.likeness import RequestCheck, RequestFile


class WorkerFiles:
    def __init__(self, family: str, registry: ResourceRegistry, cache: ResourceCache, catalog: ModelCatalog,
                 models_dir: Path, likeness: RequestCheck):
        self.family = family
        self.likeness = likeness
        self.registry = registry
        self.cache = cache
        self.catalog = catalog
        self.models_dir = models_dir

    def resource(self, resource_id: str, kind: ResourceKind) -> Resource:
        return self.registry.usable(resource_id, kind, self.family)

    def checkpoint(self, row: Resource, stack: contextlib.ExitStack) -> tuple[Path, Path | None]:
        """A checkpoint's file or folder, and for a single file its diffusers config folder."""
        path = stack.enter_context(self.cache.use(row.storage_key, row.sha256,
                                                  "folder" if row.format == "diffusers" else "file"))
        if row.format == "diffusers":
            return path, None
        config = self._single_file_config(row)
        return path, (config if isinstance(config, Path) else stack.enter_context(
            self.cache.use(config[0], config[1], "folder")))

    def _single_file_config(self, row: Resource) -> tuple[str, str] | Path:
        """The diffusers config folder of a single-file checkpoint: published (meta) or local (catalog)."""
        meta = (row.meta or {}).get("config")
        if isinstance(meta, dict) and meta.get("storage_key") and meta.get("sha256"):
            return (meta["storage_key"], meta["sha256"])
        entry = self.catalog.checkpoint(row.id)
        if entry is not None and entry.config:
            return self.models_dir / entry.config
        raise CheckpointConfigMissing(f"single-file checkpoint {row.id} has no config folder")

    def loras(self, request: WorkerRequest, stack: contextlib.ExitStack) -> list[ResolvedLora]:
        out = []
        for spec in request.loras:
            row = self.resource(spec.resource_id, ResourceKind.lora)
            if row.format != "safetensors":
                raise LoraInvalid(f"LoRA {row.id} is not a safetensors file")
            path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, "file"))
            tensor_sha = row.tensor_sha256 or file_hashes(path).tensor_sha256
            out.append(ResolvedLora(row.id, row.name, row.sha256, path, autov3(tensor_sha), spec.strength))
        self._check_together(out)
        return out

    def embeddings(self, request: WorkerRequest, stack: contextlib.ExitStack,
                          reserved: Sequence[str]) -> list[tuple[Resource, Path, str]]:
        out = []
        for resource_id in request.embeddings:
            row = self.resource(resource_id, ResourceKind.embedding)
            token = str((row.meta or {}).get("token") or row.name)
            if uses_reserved_token(token, reserved):
                raise ReservedToken(f"embedding {row.id} uses a reserved safety token",
                                      details={"resource_id": row.id})
            path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, "file"))
            out.append((row, path, token))
        return out

    def vae(self, request: WorkerRequest, stack: contextlib.ExitStack) -> ResolvedVae | None:
        """The request's VAE file (None: the checkpoint's own), a safetensors file from the verified cache."""
        if request.vae is None:
            return None
        row = self.resource(request.vae, ResourceKind.vae)
        if row.format != "safetensors":
            raise VaeInvalid(f"VAE {row.id} is not a safetensors file")
        path = stack.enter_context(self.cache.use(row.storage_key, row.sha256, "file"))
        return ResolvedVae(row.id, row.name, row.sha256, path)

    def _check_together(self, loras: Sequence[ResolvedLora]) -> None:
        """The request's LoRAs as they are about to be combined, against the blocklist (defence in depth:
        each file also passes alone through the adapter cache; a split pair is caught only together)."""
        match = self.likeness.check([RequestFile(lora.sha256, functools.partial(contextlib.nullcontext, lora.path),
                                                 self.family, lora.strength) for lora in loras])
        if match is not None:
            raise LikenessBlocked("these LoRAs reproduce a real person's likeness and cannot be used",
                                  details={"rules": [match.rule_id], **match.to_dict()})
