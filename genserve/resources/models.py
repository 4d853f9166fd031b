"""The resource table: checkpoints, LoRAs, embeddings and VAEs the generator and trainer know by id (or by
an AIR alias), with their owner, visibility and the flags the safety policy reads."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Enum, String, func
from sqlalchemy.orm import Mapped, mapped_column

from genserve.core.db import Base


class ResourceKind(str, enum.Enum):
    checkpoint = "checkpoint"
    lora = "lora"
    embedding = "embedding"
    # an autoencoder a request may decode (and hires-encode) with instead of the checkpoint's own
    vae = "vae"


class ModelFamily(str, enum.Enum):
    sd1 = "sd1"
    sdxl = "sdxl"


class Visibility(str, enum.Enum):
    """Who may discover and use a resource: its owner only, or every user."""

    private = "private"
    public = "public"


class Resource(Base):
    __tablename__ = "resources"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[ResourceKind] = mapped_column(Enum(ResourceKind, native_enum=False, length=16))
    family: Mapped[ModelFamily] = mapped_column(Enum(ModelFamily, native_enum=False, length=16))
    name: Mapped[str] = mapped_column(String(200))
    # "diffusers" (a folder, stored as a prefix) or "safetensors" (one file)
    format: Mapped[str] = mapped_column(String(32), default="safetensors")
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    tensor_sha256: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    owner_user_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    minor: Mapped[bool] = mapped_column(Boolean, default=False)
    poi: Mapped[bool] = mapped_column(Boolean, default=False)
    sfw_only: Mapped[bool] = mapped_column(Boolean, default=False)
    # made for mature content: hidden from the discovery of callers whose level is below R
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    visibility: Mapped[Visibility] = mapped_column(Enum(Visibility, native_enum=False, length=16),
                                                   default=Visibility.private)
    # an AIR-style alias (`urn:air:<family>:<kind>:<source>:<id>@<version>`) the site may name it by
    air: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    generation_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    trigger_words: Mapped[list] = mapped_column(JSON, default=list)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
