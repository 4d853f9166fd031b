"""The resource registry: which checkpoints, LoRAs, embeddings and VAEs exist, where their bytes are,
what they may be used for.

Files are published content-addressed into the object store (`genserve.resources.cache`), and the
row records the SHA-256 every download is verified against, the tensor-payload hash the likeness
blocklist matches, and the flags the safety policy reads (minor, poi, sfw_only; nsfw for discovery).
A takedown turns a resource off with `disable`; the row stays, so past jobs still name what they used.

A resource is named by its id or by its AIR alias (`genserve.resources.air`). A private one exists
only for its owner: to anyone else it is reported exactly like a missing one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from genserve.core.db import Database
from genserve.core.errors import Conflict, Forbidden, GenserveError, InvalidRequest, NotFound
from genserve.core.storage import ObjectStore
from genserve.resources.air import canonical_air, is_air
from genserve.resources.cache import publish_file, publish_folder
from genserve.resources.models import ModelFamily, Resource, ResourceKind, Visibility
from safety.hashing import file_hashes

RESOURCE_PREFIX = "resources"
MAX_EXTRA_RESOURCES = 12  # LoRAs and embeddings in one request
FLAGS = ("minor", "poi", "nsfw", "sfw_only")
LOCKED_FLAGS = "locked_flags"  # meta key: flags a moderator set, which the owner cannot change


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


class CheckpointConfigMissing(ResourceRefused, InvalidRequest):
    """A single-file checkpoint with no diffusers config folder to load it with."""

    code = "checkpoint_config_missing"


class ReservedToken(InvalidRequest):
    """A user embedding whose token imitates a mandatory safety token (at upload, admission or loading)."""

    code = "reserved_token"


class FlagLocked(Forbidden):
    """A moderator set this flag; only a moderator changes it."""

    code = "flag_locked"


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
    """The checkpoint, extra resources and VAE (None: the checkpoint's own) of one request, all checked
    to fit together. A VAE is in `all` (flags, fees, receipts) but no extra (it is not priced as one)."""

    checkpoint: ResolvedResource
    loras: tuple[ResolvedResource, ...] = ()
    embeddings: tuple[ResolvedResource, ...] = ()
    vae: ResolvedResource | None = None
    family: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", self.checkpoint.family)

    @property
    def extras(self) -> tuple[ResolvedResource, ...]:
        return self.loras + self.embeddings

    @property
    def all(self) -> tuple[ResolvedResource, ...]:
        return (self.checkpoint, *self.extras, *((self.vae,) if self.vae else ()))


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
        nsfw: bool = False,
        visibility: Visibility | str | None = None,
        air: str | None = None,
        trigger_words: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
        generation_enabled: bool = True,
    ) -> Resource:
        """Add a resource. Registering the same id with the same content again is a no-op (so
        bootstrap can run on every start); the same id with other content is a conflict, as is an
        AIR alias another resource holds. Without a visibility, an owned resource is private and an
        unowned one (the deployment's) public. A resource registered with `generation_enabled=False`
        exists (and can be downloaded by its owner) but no generation loads it until `enable`."""
        kind, family = _kind(kind), _family(family)
        visibility = _visibility(visibility) if visibility is not None else (
            Visibility.public if owner_user_id is None else Visibility.private)
        air = canonical_air(air) if air else None
        row = Resource(
            id=id, kind=kind, family=family, name=name or id, format=format, storage_key=storage_key,
            sha256=sha256, tensor_sha256=tensor_sha256, size_bytes=size_bytes, owner_user_id=owner_user_id,
            minor=minor, poi=poi, sfw_only=sfw_only, nsfw=nsfw, visibility=visibility, air=air,
            generation_enabled=generation_enabled, trigger_words=list(trigger_words), meta=dict(meta or {}),
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
            if air is not None and s.scalar(select(Resource.id).where(Resource.air == air)) is not None:
                raise Conflict(f"the alias {air} names another resource", code="air_taken", details={"air": air})
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
        self, resource_id: str, *, minor: bool | None = None, poi: bool | None = None, sfw_only: bool | None = None,
        nsfw: bool | None = None, moderator: bool = True,
    ) -> Resource:
        """Set flags. A moderator's setting locks the flag: an owner (`moderator=False`) may then no
        longer change it, as a site locks the properties its moderators decided."""
        wanted = {name: value for name, value in (("minor", minor), ("poi", poi), ("sfw_only", sfw_only),
                                                   ("nsfw", nsfw)) if value is not None}
        if wanted.get("minor"):  # a resource depicting minors is for safe-for-work images only
            wanted.update(sfw_only=True, nsfw=False)
        with self.db.transaction() as s:
            row = self._row(s, resource_id)
            meta = dict(row.meta or {})
            locked = set(meta.get(LOCKED_FLAGS) or ())
            if not moderator:
                taken = sorted(n for n, v in wanted.items() if n in locked and bool(getattr(row, n)) != v)
                if taken:
                    raise FlagLocked(f"a moderator set {', '.join(taken)} on {resource_id}",
                                     details={"id": resource_id, "flags": taken})
            for name, value in wanted.items():
                setattr(row, name, value)
            if moderator and wanted:
                meta[LOCKED_FLAGS] = sorted(locked | set(wanted))
                row.meta = meta
            return row

    def set_visibility(self, resource_id: str, visibility: Visibility | str) -> Resource:
        with self.db.transaction() as s:
            row = self._row(s, resource_id)
            row.visibility = _visibility(visibility)
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
    def _lookup(session: Any, ref: str) -> Resource | None:
        """The row named by an id or an AIR alias (malformed aliases name nothing)."""
        if is_air(ref):
            try:
                air = canonical_air(ref)
            except InvalidRequest:
                return None
            return session.scalar(select(Resource).where(Resource.air == air))
        return session.get(Resource, ref)

    @classmethod
    def _row(cls, session: Any, resource_id: str) -> Resource:
        row = cls._lookup(session, resource_id)
        if row is None:
            raise ResourceNotFound(f"no resource {resource_id}", details={"id": resource_id})
        return row

    def get(self, resource_id: str) -> Resource:
        """A row by id or AIR alias, whoever owns it (moderation, the worker)."""
        with self.db.session() as s:
            return self._row(s, resource_id)

    def visible(self, resource_id: str, user_id: str | None) -> Resource:
        """A row by id or alias as `user_id` may see it: public, or their own (None: every row)."""
        with self.db.session() as s:
            row = self._lookup(s, resource_id)
        if row is None or not _visible_to(row, user_id):
            raise ResourceNotFound(f"no resource {resource_id}", details={"id": resource_id})
        return row

    def usable(self, resource_id: str, kind: ResourceKind | str, family: str, user_id: str | None = None) -> Resource:
        """The row of a resource a generation of `family` may use as a `kind`, or the refusal: the
        one question the ingress (per request) and the worker (per resource, again) both ask."""
        kind = _kind(kind)
        with self.db.session() as s:
            row = self._lookup(s, resource_id)
        _check_usable(resource_id, row, user_id)
        if ResourceKind(row.kind) is not kind or ModelFamily(row.family).value != family:
            raise ResourceUnavailable(
                f"resource {resource_id} is a {ModelFamily(row.family).value} {ResourceKind(row.kind).value}, "
                f"not a {family} {kind.value}", code="resource_unusable", details={"id": resource_id})
        return row

    def list(self, kind: ResourceKind | str | None = None, family: ModelFamily | str | None = None, *,
             owner: str | None = None, visibility: Visibility | str | None = None, viewer: str | None = None,
             include_nsfw: bool = True, enabled_only: bool = False, after: str | None = None,
             limit: int | None = None) -> list[Resource]:
        """Rows by id, filtered. With a `viewer`, only what that user may see (public and their own);
        without, every row (moderators, operators). `after` and `limit` page by id."""
        query = select(Resource).order_by(Resource.id)
        if kind is not None:
            query = query.where(Resource.kind == _kind(kind))
        if family is not None:
            query = query.where(Resource.family == _family(family))
        if owner is not None:
            query = query.where(Resource.owner_user_id == owner)
        if visibility is not None:
            query = query.where(Resource.visibility == _visibility(visibility))
        if viewer is not None:
            query = query.where(or_(Resource.visibility == Visibility.public, Resource.owner_user_id == viewer))
        if not include_nsfw:
            query = query.where(Resource.nsfw.is_(False))
        if enabled_only:
            query = query.where(Resource.generation_enabled.is_(True))
        if after is not None:
            query = query.where(Resource.id > after)
        if limit is not None:
            query = query.limit(limit)
        with self.db.session() as s:
            return list(s.scalars(query))

    def by_hash(self, digest: str) -> list[Resource]:
        """Resources whose file or tensor payload has this SHA-256 (what a takedown names)."""
        with self.db.session() as s:
            return list(s.scalars(select(Resource).where(or_(Resource.sha256 == digest, Resource.tensor_sha256 == digest))))

    def air_taken(self, air: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Resource.id).where(Resource.air == canonical_air(air))) is not None

    def disabled_hashes(self, digests: Iterable[str]) -> set[str]:
        """Which of these file hashes only disabled resources have (what a worker may drop at once)."""
        digests = set(digests)
        if not digests:
            return set()
        with self.db.session() as s:
            rows = s.execute(select(Resource.sha256, Resource.generation_enabled)
                             .where(Resource.sha256.in_(digests))).all()
        enabled = {sha for sha, on in rows if on}
        return {sha for sha, _ in rows} - enabled

    def resolve(self, checkpoint_id: str, refs: Iterable[ResourceUse], user_id: str | None = None) -> ResolvedResources:
        """Look up a request's resources and check they can run together: a checkpoint first, LoRAs
        and embeddings after, one family, all enabled, private ones only for their owner."""
        refs = list(refs)
        if len(refs) > MAX_EXTRA_RESOURCES:
            raise InvalidRequest(f"at most {MAX_EXTRA_RESOURCES} extra resources", code="too_many_resources")
        ids = [checkpoint_id, *(r.id for r in refs)]
        with self.db.session() as s:
            rows = {row.id: row for row in s.scalars(select(Resource).where(Resource.id.in_(ids)))}
            for ref in {i for i in ids if is_air(i)}:  # AIR aliases name the row they were registered for
                if (row := self._lookup(s, ref)) is not None:
                    rows[ref] = row
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
            if kind in (ResourceKind.checkpoint, ResourceKind.vae):
                raise ResourceUnavailable(f"{ref.id} is a {kind.value}; a request names its one {kind.value} apart",
                                          code=f"extra_{kind.value}", details={"id": ref.id})
            if row.family != checkpoint.family:
                raise ResourceUnavailable(
                    f"{ref.id} is a {ModelFamily(row.family).value} resource; the checkpoint is "
                    f"{ModelFamily(checkpoint.family).value}",
                    code="family_mismatch", details={"id": ref.id},
                )
            (loras if kind is ResourceKind.lora else embeddings).append(ResolvedResource.from_row(row, ref.strength))
        return ResolvedResources(ResolvedResource.from_row(checkpoint), tuple(loras), tuple(embeddings))


def _visible_to(row: Resource, user_id: str | None) -> bool:
    """Public, owned by `user_id`, or asked without a user (the worker re-asking, moderators)."""
    if user_id is None or row.owner_user_id == user_id:
        return True
    visibility = row.visibility or (Visibility.public if row.owner_user_id is None else Visibility.private)
    return Visibility(visibility) is Visibility.public


def _check_usable(resource_id: str, row: Resource | None, user_id: str | None) -> None:
    """Exists, visible to `user_id`, enabled for generation."""
    # a private resource of someone else is reported exactly like a missing one
    if row is None or not _visible_to(row, user_id):
        raise ResourceNotFound(f"no resource {resource_id}", details={"id": resource_id})
    if not row.generation_enabled:
        raise ResourceUnavailable(f"resource {resource_id} is not available for generation", code="resource_disabled",
                                  details={"id": resource_id})


def _kind(value: ResourceKind | str) -> ResourceKind:
    try:
        return ResourceKind(value)
    except ValueError:
        raise InvalidRequest(f"unknown resource kind {value!r}", code="unknown_resource_kind") from None


def _visibility(value: Visibility | str) -> Visibility:
    try:
        return Visibility(value)
    except ValueError:
        raise InvalidRequest(f"visibility is private or public, not {value!r}", code="invalid_visibility") from None


def _family(value: ModelFamily | str) -> ModelFamily:
    try:
        return ModelFamily(value)
    except ValueError:
        raise InvalidRequest(f"unknown model family {value!r}", code="unknown_family") from None
