"""Registering user resources: an uploaded (or already staged) safetensors file is checked, classified,
hashed and run past the likeness blocklist before a single byte is stored; then published
content-addressed and registered under its owner.

    staged file ─▶ inspect (header truth, kind, family, hashes) ─▶ likeness check (audited)
        ─▶ embedding token / checkpoint config ─▶ publish ─▶ register (audited)

A refusal stores nothing and charges nothing; a likeness block is written to the audit log with
the rule that matched. Disabling (a moderator) turns a resource off for every replica at once: the
ingress and the workers ask `ResourceRegistry.usable` on every request, and a worker evicts the
adapter of a resource it finds disabled. Downloads (`download`) hand a file to whoever may see the
resource, past its early-access window, streamed and checked against its registered hash.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from genserve.core.errors import (
    Conflict,
    Forbidden,
    GenserveError,
    InvalidRequest,
    NotFound,
    SafetyBlocked,
    Unavailable,
)
from genserve.core.storage import ObjectStore
from genserve.engine.lycoris import LycorisInvalid, lycoris_to_lora
from genserve.resources.air import AirInvalid, parse_air
from genserve.resources.cache import ResourceCache, publish_file, publish_folder
from genserve.resources.catalog import ModelCatalog
from genserve.resources.download import ResourceDownload, open_download
from genserve.resources.inspect import Inspection, inspect_or_refuse
from genserve.resources.models import Resource, ResourceKind, Visibility
from genserve.resources.registry import (
    FLAGS,
    RESOURCE_PREFIX,
    CheckpointConfigMissing,
    ReservedToken,
    ResourceRegistry,
    ResourceUnavailable,
)
from safety.embeddings import uses_reserved_token
from safety.errors import SafetyError
from safety.gate import SafetyGate
from safety.hashing import load_tensors

logger = logging.getLogger(__name__)

CONFIG_PREFIX = f"{RESOURCE_PREFIX}/config"
STAGING_PREFIX = "uploads"  # `uploads/<user>/...`: where a user's client may stage a file for registering
MAX_UPLOAD_BYTES = {ResourceKind.checkpoint: 16 << 30, ResourceKind.lora: 2 << 30, ResourceKind.embedding: 16 << 20,
                    ResourceKind.vae: 1 << 30}
_COPY_CHUNK = 1 << 20


class UploadTooLarge(InvalidRequest):
    code = "upload_too_large"
    http_status = 413


class UploadBlocked(SafetyBlocked):
    """The file reproduces a blocklisted likeness; nothing was stored."""

    code = "likeness_blocked"


class UploadCheckFailed(Unavailable):
    """The blocklist could not answer; the upload is refused (fail closed)."""

    code = "likeness_check_failed"


class StagedKeyForbidden(Forbidden):
    code = "staged_key_forbidden"


class DownloadBlocked(SafetyBlocked):
    """The file is on the likeness blocklist: handed to nobody but its owner."""

    code = "likeness_blocked"


class DownloadsUnavailable(Unavailable):
    """No early-access check was given: downloads refuse rather than skip it (fail closed)."""

    code = "downloads_unavailable"


@dataclass(frozen=True)
class UploadSpec:
    """What the owner declares with a file: everything optional but the owner."""

    owner: str
    name: str | None = None
    kind: ResourceKind | None = None
    family: str | None = None
    visibility: Visibility = Visibility.private
    minor: bool = False
    poi: bool = False
    nsfw: bool = False
    sfw_only: bool = False
    air: str | None = None
    trigger_words: Sequence[str] = ()
    token: str | None = None  # an embedding's prompt token (default: its name)
    filename: str | None = None


@dataclass(frozen=True)
class Registered:
    resource: Resource
    created: bool  # False: the owner had registered this very file already
    inspection: Inspection


class ResourceService:
    def __init__(self, registry: ResourceRegistry, store: ObjectStore, safety: SafetyGate, catalog: ModelCatalog,
                 models_dir: Path, staging_dir: Path, *, resource_cache: ResourceCache | None = None,
                 max_bytes: dict[ResourceKind, int] | None = None,
                 access_check: Callable[[str, str], None] | None = None):
        self.registry = registry
        self.store = store
        self.safety = safety
        self.catalog = catalog
        self.models_dir = Path(models_dir)
        self.staging_dir = Path(staging_dir)
        self.resource_cache = resource_cache
        self.max_bytes = {**MAX_UPLOAD_BYTES, **(max_bytes or {})}
        # (resource id, user id) -> None or the refusal: the economy's early-access rule for downloads
        # (`Economy.check_download`), handed in so resources never import the economy above them
        self.access_check = access_check
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_parts(cls, settings: Any, registry: ResourceRegistry, store: ObjectStore, safety: SafetyGate, *,
                   resource_cache: ResourceCache | None = None,
                   access_check: Callable[[str, str], None] | None = None) -> ResourceService:
        """The service over the generation service's own registry, store and gate (`settings`: Settings)."""
        from genserve.resources.catalog import load_model_catalog

        return cls(registry, store, safety, load_model_catalog(settings.models_file), settings.models_dir,
                   settings.data_dir / "staging", resource_cache=resource_cache, access_check=access_check)

    # -- staging ----------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return max(self.max_bytes.values())

    @contextlib.contextmanager
    def staged(self, stream: BinaryIO) -> Iterator[Path]:
        """`stream` copied to a private temporary file (refused past the largest limit), removed after."""
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_dir))
        path = folder / "upload.safetensors"
        try:
            size = 0
            with path.open("wb") as out:
                while chunk := stream.read(_COPY_CHUNK):
                    size += len(chunk)
                    if size > self.limit:
                        raise UploadTooLarge(f"uploads are at most {self.limit} bytes")
                    out.write(chunk)
            yield path
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def staged_key(self, key: str, owner: str) -> Iterator[Path]:
        """An object the owner's client put under `uploads/<owner>/`, downloaded for checking."""
        if not key.startswith(f"{STAGING_PREFIX}/{owner}/") or ".." in key.split("/"):
            raise StagedKeyForbidden(f"a staged upload lives under {STAGING_PREFIX}/{owner}/",
                                     details={"key": key})
        if not self.store.exists(key):
            raise NotFound(f"no staged object {key}", code="staged_key_not_found", details={"key": key})
        if self.store.head(key).size > self.limit:
            raise UploadTooLarge(f"uploads are at most {self.limit} bytes")
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_dir))
        try:
            path = self.store.download_file(key, folder / "upload.safetensors")
            yield Path(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- registering ------------------------------------------------------------------------------

    def add(self, path: Path, spec: UploadSpec, *, request_id: str | None = None, staged_key: str | None = None
            ) -> Registered:
        """Check, publish and register the file at `path` for `spec.owner`."""
        air = parse_air(spec.air) if spec.air else None
        found = inspect_or_refuse(path, declared_kind=spec.kind, declared_family=spec.family)
        if air is not None and (air.family, air.kind) != (found.family, found.kind):
            raise AirInvalid(f"{air} names a {air.family} {air.kind.value}; the file is a {found.family} "
                             f"{found.kind.value}", code="air_mismatch", details={"air": str(air)})
        if path.stat().st_size > self.max_bytes[found.kind]:
            raise UploadTooLarge(f"a {found.kind.value} is at most {self.max_bytes[found.kind]} bytes")
        self._likeness(path, found, spec, request_id, staged_key)
        name = (spec.name or Path(spec.filename or "").stem or found.kind.value)[:200]
        token = self._token(spec.token or name, found.family) if found.kind is ResourceKind.embedding else None
        existing = self._same_file(spec.owner, found)
        if existing is not None:
            return Registered(existing, False, found)
        if air is not None and self.registry.air_taken(str(air)):
            raise Conflict(f"the alias {air} names another resource", code="air_taken", details={"air": str(air)})
        meta: dict[str, Any] = {"format": found.format, "layout": found.layout, "autov2": found.autov2,
                                "autov3": found.autov3, "uploaded_by": spec.owner}
        if spec.filename:
            meta["filename"] = Path(spec.filename).name[:200]
        if token is not None:
            meta["token"] = token
            meta["vectors"] = found.vectors
        if found.kind is ResourceKind.checkpoint:
            meta["config"] = self._config(found.family)
        published = publish_file(self.store, path, f"{RESOURCE_PREFIX}/{found.kind.value}")
        if published.sha256 != found.sha256:  # the staged file changed under us
            raise InvalidRequest("the upload changed while it was checked", code="upload_changed")
        row = self.registry.register(
            id=f"{found.kind.value}-{uuid.uuid4().hex[:16]}", kind=found.kind, family=found.family, name=name,
            format="safetensors", storage_key=published.storage_key, sha256=found.sha256,
            tensor_sha256=found.tensor_sha256, size_bytes=found.size_bytes, owner_user_id=spec.owner,
            minor=spec.minor, poi=spec.poi, sfw_only=spec.sfw_only or spec.minor, nsfw=spec.nsfw and not spec.minor,
            visibility=spec.visibility, air=str(air) if air else None, trigger_words=list(spec.trigger_words), meta=meta,
        )
        self.safety.audit.append("resource_upload", "allow", subject=[found.sha256, found.tensor_sha256],
                                 user_id=spec.owner, request_id=request_id,
                                 details={"resource_id": row.id, "kind": found.kind.value, "family": found.family,
                                          "format": found.format, "visibility": Visibility(row.visibility).value})
        logger.info("registered %s %s (%s, %s) for %s", found.kind.value, row.id, found.family, found.format,
                    spec.owner)
        return Registered(row, True, found)

    def _same_file(self, owner: str, found: Inspection) -> Resource | None:
        for row in self.registry.by_hash(found.sha256):
            if row.owner_user_id == owner and row.sha256 == found.sha256 and ResourceKind(row.kind) is found.kind:
                return row
        return None

    def _likeness(self, path: Path, found: Inspection, spec: UploadSpec, request_id: str | None,
                  staged_key: str | None) -> None:
        """The blocklist on the file (hashes and weights) and, for LyCORIS, on its rewritten weights."""
        blocklist = self.safety.blocklist
        try:
            match = blocklist.check(path)
            if match is None and found.format in ("loha", "lokr", "lycoris"):
                tensors, metadata = load_tensors(path)
                match = blocklist.check_state_dict(lycoris_to_lora(tensors), metadata)
        except LycorisInvalid:
            raise
        except SafetyError as exc:
            if exc.code in ("not_safetensors", "lora_format_invalid"):
                raise InvalidRequest(f"the file cannot be read as a {found.kind.value}: {exc.message}",
                                     code=exc.code) from exc
            raise UploadCheckFailed(f"the likeness check failed: {exc.message}") from exc
        except GenserveError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the check refuses the upload
            raise UploadCheckFailed(f"the likeness check failed: {type(exc).__name__}: {exc}") from exc
        if match is None:
            return
        self.safety.audit.append(
            "resource_upload", "block", rules=[match.rule_id], subject=[found.sha256, found.tensor_sha256],
            user_id=spec.owner, request_id=request_id,
            details={"kind": found.kind.value, "family": found.family, "format": found.format,
                     "staged_key": staged_key, "likeness": match.to_dict()},
        )
        if staged_key is not None:  # blocked bytes are not kept, not even in the owner's staging area
            with contextlib.suppress(Exception):
                self.store.delete(staged_key)
        raise UploadBlocked("this file reproduces a real person's likeness and cannot be registered",
                            details={"rules": [match.rule_id], "entry_id": match.entry_id, "method": match.method})

    def _token(self, token: str, family: str | None) -> str:
        entry = self.catalog.families.get(family or "")
        reserved = [e.token for e in entry.safety_embeddings.values()] if entry is not None else []
        if uses_reserved_token(token, reserved):
            raise ReservedToken(f"the token {token!r} contains a reserved safety token",
                                      details={"token": token})
        return token

    def _config(self, family: str | None) -> dict[str, str]:
        """The diffusers config folder a single-file checkpoint of `family` is rebuilt with: the one the
        catalog's own single-file checkpoint of that family uses, published content-addressed."""
        for entry in self.catalog.checkpoints:
            if entry.family == family and entry.config and (self.models_dir / entry.config).is_dir():
                published = publish_folder(self.store, self.models_dir / entry.config, CONFIG_PREFIX)
                return {"storage_key": published.storage_key, "sha256": published.sha256}
        raise CheckpointConfigMissing(f"no {family} config folder is configured for single-file checkpoints "
                                      "(a single-file checkpoint with `config:` in models.yaml)")

    # -- downloads --------------------------------------------------------------------------------

    def download(self, resource_id: str, user_id: str) -> ResourceDownload:
        """The resource's file for `user_id`. Visibility first, so another user's private resource is
        missing (404 `resource_not_found`) rather than locked; a taken-down or blocklisted one is only its
        owner's (`resource_disabled`, `likeness_blocked`); then early access (403 `early_access` until
        unlocked or the window ends)."""
        row = self.registry.visible(resource_id, user_id)
        if row.owner_user_id != user_id:
            if not row.generation_enabled:
                raise ResourceUnavailable(f"resource {resource_id} is not available",
                                          code="resource_disabled", details={"id": resource_id})
            self._download_likeness(row, user_id)
        if self.access_check is None:
            raise DownloadsUnavailable("downloads need the early-access check; this service has none")
        self.access_check(row.id, user_id)
        return open_download(self.store, row)

    def _download_likeness(self, row: Resource, user_id: str) -> None:
        """The blocklist by the registered hashes (no file read): a likeness the generator refuses to
        load is not handed out either. A check that fails refuses (fail closed); a match is audited."""
        subject = [h for h in (row.sha256, row.tensor_sha256) if h]
        try:
            match = self.safety.blocklist.check_hashes(row.sha256, row.tensor_sha256)
        except Exception as exc:  # noqa: BLE001 - any failure of the check refuses the download
            raise UploadCheckFailed(f"the likeness check failed: {type(exc).__name__}: {exc}") from exc
        if match is None:
            return
        self.safety.audit.append("resource_download", "block", rules=[match.rule_id], subject=subject,
                                 user_id=user_id,
                                 details={"resource_id": row.id, "likeness": match.to_dict()})
        raise DownloadBlocked("this file reproduces a real person's likeness and is not handed out",
                              details={"rules": [match.rule_id], "id": row.id})

    # -- changes ----------------------------------------------------------------------------------

    def update(self, resource_id: str, owner: str, *, visibility: Visibility | None = None,
               flags: dict[str, bool] | None = None) -> Resource:
        """The owner's changes: visibility and flags (not those a moderator locked)."""
        row = self.registry.visible(resource_id, owner)
        if row.owner_user_id != owner:
            raise Forbidden("only the owner changes a resource", code="not_your_resource",
                            details={"id": row.id})
        if flags:
            row = self.registry.set_flags(row.id, moderator=False, **_flags(flags))
        if visibility is not None:
            row = self.registry.set_visibility(row.id, visibility)
        return row

    def moderate(self, resource_id: str, moderator: str, flags: dict[str, bool], note: str = "") -> Resource:
        row = self.registry.set_flags(self.registry.get(resource_id).id, moderator=True, **_flags(flags))
        self.safety.audit.append("resource_flags", "review", rules=[f"resource.{f}" for f in sorted(flags)],
                                 subject=[row.sha256], user_id=moderator,
                                 details={"resource_id": row.id, "flags": flags, "note": note})
        return row

    def disable(self, resource_id: str, moderator: str, reason: str) -> Resource:
        """Off for generation at once everywhere; the ingress's cached copy is dropped."""
        row = self.registry.disable(self.registry.get(resource_id).id, reason or f"disabled by {moderator}")
        self.safety.audit.append("resource_disable", "block", rules=["resource.disabled"], subject=[row.sha256],
                                 user_id=moderator, details={"resource_id": row.id, "reason": reason})
        if self.resource_cache is not None:
            self.resource_cache.evict(row.sha256)
        return row

    def enable(self, resource_id: str, moderator: str) -> Resource:
        row = self.registry.enable(self.registry.get(resource_id).id)
        self.safety.audit.append("resource_disable", "allow", rules=["resource.enabled"], subject=[row.sha256],
                                 user_id=moderator, details={"resource_id": row.id})
        return row


def _flags(flags: dict[str, bool]) -> dict[str, bool]:
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise InvalidRequest(f"unknown flags {unknown}; flags are {list(FLAGS)}", code="unknown_flag")
    return dict(flags)
