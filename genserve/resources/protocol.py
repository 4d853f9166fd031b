"""The `/v1` models of resources and checkpoints: what clients send and get back."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from genserve.engine.infotext import autov2, autov3
from genserve.resources.models import ModelFamily, Resource, ResourceKind, Visibility
from genserve.resources.registry import LOCKED_FLAGS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourceFlagsView(BaseModel):
    minor: bool
    poi: bool = Field(description="depicts a real person of interest")
    nsfw: bool = Field(description="made for mature content; hidden from callers below R")
    sfw_only: bool = Field(description="images made with it are withheld above PG-13")


class ResourceHashes(BaseModel):
    sha256: str
    tensor_sha256: str | None = Field(None, description="SHA-256 of the safetensors tensor payload")
    autov2: str = Field(description="first 10 hex digits of the file's SHA-256 (A1111 / Civitai model hash)")
    autov3: str | None = Field(None, description="first 12 hex digits of the tensor-payload SHA-256")


class ResourceView(BaseModel):
    id: str
    air: str | None = Field(None, description="AIR alias: urn:air:<family>:<kind>:<source>:<id>@<version>")
    kind: ResourceKind
    family: ModelFamily
    name: str
    type: str = Field(description="checkpoint | lora | locon | loha | lokr | dora | lycoris | embedding")
    file_format: str = Field(description="safetensors (one file) or diffusers (a folder)")
    owner: str | None
    visibility: Visibility
    enabled: bool
    disabled_reason: str | None = None
    flags: ResourceFlagsView
    locked_flags: list[str] = Field(default_factory=list, description="flags a moderator set")
    hashes: ResourceHashes
    size_bytes: int
    trigger_words: list[str]
    token: str | None = Field(None, description="an embedding's prompt token")
    created_at: dt.datetime | None = None

    @classmethod
    def of(cls, row: Resource) -> ResourceView:
        meta: dict[str, Any] = row.meta or {}
        owner = row.owner_user_id
        visibility = row.visibility or (Visibility.public if owner is None else Visibility.private)
        kind = ResourceKind(row.kind)
        return cls(
            id=row.id, air=row.air, kind=kind, family=ModelFamily(row.family), name=row.name,
            type=str(meta.get("format") or kind.value), file_format=row.format, owner=owner,
            visibility=Visibility(visibility), enabled=bool(row.generation_enabled),
            disabled_reason=meta.get("disabled_reason"),
            flags=ResourceFlagsView(minor=bool(row.minor), poi=bool(row.poi), nsfw=bool(row.nsfw),
                                    sfw_only=bool(row.sfw_only)),
            locked_flags=list(meta.get(LOCKED_FLAGS) or []),
            hashes=ResourceHashes(sha256=row.sha256, tensor_sha256=row.tensor_sha256,
                                  autov2=autov2(row.sha256).upper(),
                                  autov3=autov3(row.tensor_sha256).upper() if row.tensor_sha256 else None),
            size_bytes=int(row.size_bytes or 0), trigger_words=list(row.trigger_words or []),
            token=str(meta.get("token") or row.name) if kind is ResourceKind.embedding else None,
            created_at=row.created_at,
        )


class ResourceList(BaseModel):
    resources: list[ResourceView]
    next_after: str | None = Field(None, description="pass as `after` for the next page")


class FlagsUpdate(_Strict):
    minor: bool | None = None
    poi: bool | None = None
    nsfw: bool | None = None
    sfw_only: bool | None = None

    def set(self) -> dict[str, bool]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ResourceUpdate(_Strict):
    """The owner's changes."""

    visibility: Visibility | None = None
    flags: FlagsUpdate | None = None


class ModerationFlags(_Strict):
    moderator: str = Field(min_length=1, max_length=200)
    flags: FlagsUpdate
    note: str = Field("", max_length=2000)


class ResourceDisable(_Strict):
    moderator: str = Field(min_length=1, max_length=200)
    reason: str = Field("", max_length=2000)


class ModelView(BaseModel):
    """A checkpoint a generation can name, with its family's sizes."""

    id: str
    air: str | None
    name: str
    family: ModelFamily
    file_format: str
    size_bytes: int
    hashes: ResourceHashes
    owner: str | None
    visibility: Visibility
    pipeline: str | None
    default_size: tuple[int, int] | None
    allowed_sizes: list[tuple[int, int]]
    flags: ResourceFlagsView


class ModelList(BaseModel):
    models: list[ModelView]


