"""The resource registry: which checkpoints, LoRAs and embeddings exist, where their bytes are, what
they may be used for.

Files are published content-addressed into the object store (`genserve.resources.cache`), and the
row records the SHA-256 every download is verified against, the tensor-payload hash the likeness
blocklist matches, and the flags the safety policy reads (minor, poi, sfw_only). A takedown turns a
resource off with `disable`; the row stays, so past jobs still name what they used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from genserve.core.db import Database
from genserve.core.errors import Conflict, GenserveError, InvalidRequest, NotFound
from genserve.core.storage import ObjectStore
from genserve.resources.cache import publish_file, publish_folder
from genserve.resources.models import ModelFamily, Resource, ResourceKind
from safety.hashing import file_hashes

RESOURCE_PREFIX = "resources"
MAX_EXTRA_RESOURCES = 12  # LoRAs and embeddings in one request


class ResourceUse(Protocol):
    """A request's use of a resource: which one, and (for a LoRA) at what strength."""

    id: str
    strength: float


class ResourceRefused(GenserveError):
    """Any refusal of a resource id (the worker and the ingress catch them as one)."""


class ResourceNotFound(ResourceRefused, NotFound):
    code = "resource_not_found"


class ResourceUnavailable(ResourceRefused, InvalidRequest):
    """The resource exists but cannot be used for this generation (disabled, wrong kind or family)."""

    code = "resource_unavailable"


@dataclass(frozen=True)
class ResolvedResource:
    """A registry row as one request uses it (with the request's LoRA strength)."""

    id: str
    kind: ResourceKind
    family: str
    name: str
    format: str
    storage_key: str
    sha256: str
    tensor_sha256: str | None
    size_bytes: int
    minor: bool
    poi: bool
    sfw_only: bool
    trigger_words: tuple[str, ...] = ()
    strength: float = 1.0
    # the prompt token an embedding is used by (its `meta.token`, else its name)
    token: str | None = None

    @classmethod
    def from_row(cls, row: Resource, strength: float = 1.0) -> ResolvedResource:
        return cls(
            id=row.id, kind=ResourceKind(row.kind), family=ModelFamily(row.family).value, name=row.name,
            format=row.format, storage_key=row.storage_key, sha256=row.sha256, tensor_sha256=row.tensor_sha256,
            size_bytes=int(row.size_bytes or 0), minor=bool(row.minor), poi=bool(row.poi),
            sfw_only=bool(row.sfw_only), trigger_words=tuple(row.trigger_words or ()), strength=strength,
            token=str((row.meta or {}).get("token") or row.name) if row.kind == ResourceKind.embedding else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind.value, "name": self.name, "sha256": self.sha256,
                "strength": self.strength}


@dataclass(frozen=True)
class ResolvedResources:
    """The checkpoint and extra resources of one request, all checked to fit together."""

    checkpoint: ResolvedResource
    loras: tuple[ResolvedResource, ...] = ()
    embeddings: tuple[ResolvedResource, ...] = ()
    family: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", self.checkpoint.family)

    @property
    def extras(self) -> tuple[ResolvedResource, ...]:
        return self.loras + self.embeddings

    @property
    def all(self) -> tuple[ResolvedResource, ...]:
        return (self.checkpoint, *self.extras)


class ResourceRegistry:
    """Reads and writes of the `resources` table, plus publishing files into the object store."""

    def __init__(self, db: Database, store: ObjectStore | None = None):
        self.db = db
        self.store = store

    # -- writes -------------------------------------------------------------------------------

    def register(
        self,
        *,
        id: str,  # noqa: A002 - the column's name
        kind: ResourceKind | str,
        family: ModelFamily | str,
        storage_key: str,
        sha256: str,
        name: str | None = None,
        format: str = "safetensors",  # noqa: A002
        tensor_sha256: str | None = None,
        size_bytes: int = 0,
        owner_user_id: str | None = None,
        minor: bool = False,
        poi: bool = False,
        sfw_only: bool = False,
        trigger_words: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
        generation_enabled: bool = True,
    ) -> Resource:
        """Add a resource. Registering the same id with the same content again is a no-op (so
        bootstrap can run on every start); the same id with other content is a conflict. A resource
        registered with `generation_enabled=False` exists (and can be downloaded by its owner) but
        no generation loads it until `enable`."""
        kind, family = _kind(kind), _family(family)
        row = Resource(
            id=id, kind=kind, family=family, name=name or id, format=format, storage_key=storage_key,
            sha256=sha256, tensor_sha256=tensor_sha256, size_bytes=size_bytes, owner_user_id=owner_user_id,
            minor=minor, poi=poi, sfw_only=sfw_only, generation_enabled=generation_enabled,
            trigger_words=list(trigger_words), meta=dict(meta or {}),
        )
        with self.db.transaction() as s:
            existing = s.get(Resource, id)
            if existing is not None:
                if (existing.sha256, existing.kind, existing.family) != (sha256, kind, family):
                    raise Conflict(
                        f"resource {id} is already registered with other content",
                        code="resource_exists", details={"id": id, "sha256": existing.sha256},
                    )
                return existing
            s.add(row)
        return row

    def publish(
        self,
        path: str | Path,
        *,
        id: str,  # noqa: A002
        kind: ResourceKind | str,
        family: ModelFamily | str,
        name: str | None = None,
        **fields: Any,
    ) -> Resource:
        """Upload a safetensors file or a diffusers folder content-addressed, then register it."""
        if self.store is None:
            raise InvalidRequest("this registry has no object store to publish into", code="no_object_store")
        path = Path(path)
        kind = _kind(kind)
        if not path.exists():
            raise ResourceNotFound(f"no such file or folder: {path}", code="resource_file_not_found")
        prefix = f"{RESOURCE_PREFIX}/{kind.value}"
        if path.is_dir():
            published = publish_folder(self.store, path, prefix)
            fmt, tensor_sha = "diffusers", None
        else:
            if path.suffix != ".safetensors":
                raise InvalidRequest(f"resources are safetensors files: {path.name}", code="not_safetensors")
            published = publish_file(self.store, path, prefix)
            fmt, tensor_sha = "safetensors", file_hashes(path).tensor_sha256
        return self.register(
            id=id, kind=kind, family=family, name=name or id, format=fields.pop("format", fmt),
            storage_key=published.storage_key, sha256=published.sha256, size_bytes=published.size,
            tensor_sha256=fields.pop("tensor_sha256", tensor_sha), **fields,
        )

    def set_flags(
        self, resource_id: str, *, minor: bool | None = None, poi: bool | None = None, sfw_only: bool | None = None
    ) -> Resource:
        with self.db.transaction() as s:
            row = self._row(s, resource_id)
            for name, value in (("minor", minor), ("poi", poi), ("sfw_only", sfw_only)):
                if value is not None:
                    setattr(row, name, value)
            return row

    def disable(self, resource_id: str, reason: str) -> Resource:
        """Take a resource out of generation (a takedown, a moderation decision); idempotent."""
        with self.db.transaction() as s:
            row = self._row(s, resource_id)
            row.generation_enabled = False
            row.meta = {**(row.meta or {}), "disabled_reason": reason}
            return row

    def enable(self, resource_id: str, *, session: Session | None = None) -> Resource:
        """Put a resource (back) into generation; with `session`, inside the caller's transaction, so
        whatever must be true first (a blocklist entry) commits with it or not at all."""
        if session is not None:
            return self._enable(session, resource_id)
        with self.db.transaction() as s:
            return self._enable(s, resource_id)

    def _enable(self, session: Session, resource_id: str) -> Resource:
        row = self._row(session, resource_id)
        row.generation_enabled = True
        row.meta = {k: v for k, v in (row.meta or {}).items() if k != "disabled_reason"}
        return row

    # -- reads --------------------------------------------------------------------------------

    @staticmethod
    def _row(session: Any, resource_id: str) -> Resource:
        row = session.get(Resource, resource_id)
        if row is None:
            raise ResourceNotFound(f"no resource {resource_id}", details={"id": resource_id})
        return row

    def get(self, resource_id: str) -> Resource:
        with self.db.session() as s:
            return self._row(s, resource_id)

    def usable(self, resource_id: str, kind: ResourceKind | str, family: str, user_id: str | None = None) -> Resource:
        """The row of a resource a generation of `family` may use as a `kind`, or the refusal: the
        one question the ingress (per request) and the worker (per resource, again) both ask."""
        kind = _kind(kind)
        with self.db.session() as s:
            row = s.get(Resource, resource_id)
        _check_usable(resource_id, row, user_id)
        if ResourceKind(row.kind) is not kind or ModelFamily(row.family).value != family:
            raise ResourceUnavailable(
                f"resource {resource_id} is a {ModelFamily(row.family).value} {ResourceKind(row.kind).value}, "
                f"not a {family} {kind.value}", code="resource_unusable", details={"id": resource_id})
        return row

    def list(self, kind: ResourceKind | str | None = None, family: ModelFamily | str | None = None) -> list[Resource]:
        query = select(Resource).order_by(Resource.id)
        if kind is not None:
            query = query.where(Resource.kind == _kind(kind))
        if family is not None:
            query = query.where(Resource.family == _family(family))
        with self.db.session() as s:
            return list(s.scalars(query))

    def by_hash(self, digest: str) -> list[Resource]:
        """Resources whose file or tensor payload has this SHA-256 (what a takedown names)."""
        with self.db.session() as s:
            return list(s.scalars(select(Resource).where(or_(Resource.sha256 == digest, Resource.tensor_sha256 == digest))))

    def resolve(self, checkpoint_id: str, refs: Iterable[ResourceUse], user_id: str | None = None) -> ResolvedResources:
        """Look up a request's resources and check they can run together: a checkpoint first, LoRAs
        and embeddings after, one family, all enabled, private ones only for their owner."""
        refs = list(refs)
        if len(refs) > MAX_EXTRA_RESOURCES:
            raise InvalidRequest(f"at most {MAX_EXTRA_RESOURCES} extra resources", code="too_many_resources")
        ids = [checkpoint_id, *(r.id for r in refs)]
        with self.db.session() as s:
            rows = {row.id: row for row in s.scalars(select(Resource).where(Resource.id.in_(ids)))}
        for rid in ids:
            _check_usable(rid, rows.get(rid), user_id)
        checkpoint = rows[checkpoint_id]
        if ResourceKind(checkpoint.kind) is not ResourceKind.checkpoint:
            raise ResourceUnavailable(f"{checkpoint_id} is not a checkpoint", code="not_a_checkpoint",
                                      details={"id": checkpoint_id, "kind": ResourceKind(checkpoint.kind).value})
        loras, embeddings = [], []
        for ref in refs:
            row = rows[ref.id]
            kind = ResourceKind(row.kind)
            if kind is ResourceKind.checkpoint:
                raise ResourceUnavailable(f"{ref.id} is a checkpoint; a request has one", code="extra_checkpoint",
                                          details={"id": ref.id})
            if row.family != checkpoint.family:
                raise ResourceUnavailable(
                    f"{ref.id} is a {ModelFamily(row.family).value} resource; the checkpoint is "
                    f"{ModelFamily(checkpoint.family).value}",
                    code="family_mismatch", details={"id": ref.id},
                )
            (loras if kind is ResourceKind.lora else embeddings).append(ResolvedResource.from_row(row, ref.strength))
        return ResolvedResources(ResolvedResource.from_row(checkpoint), tuple(loras), tuple(embeddings))


def _check_usable(resource_id: str, row: Resource | None, user_id: str | None) -> None:
    """Exists, visible to `user_id`, enabled for generation."""
    # a private resource of someone else is reported exactly like a missing one
    if row is None or (row.owner_user_id is not None and user_id is not None and row.owner_user_id != user_id):
        raise ResourceNotFound(f"no resource {resource_id}", details={"id": resource_id})
    if not row.generation_enabled:
        raise ResourceUnavailable(f"resource {resource_id} is not available for generation", code="resource_disabled",
                                  details={"id": resource_id})


def _kind(value: ResourceKind | str) -> ResourceKind:
    try:
        return ResourceKind(value)
    except ValueError:
        raise InvalidRequest(f"unknown resource kind {value!r}", code="unknown_resource_kind") from None


def _family(value: ModelFamily | str) -> ModelFamily:
    try:
        return ModelFamily(value)
    except ValueError:
        raise InvalidRequest(f"unknown model family {value!r}", code="unknown_family") from None
