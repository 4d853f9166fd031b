"""Admin routes of moderation that came after the ingress's own: the known-abusive image hashes.

Mounted by the composition root through `create_api(routers=...)`, so they share the ingress's admin
token check and error mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from genserve.core.config.generation import InputImageLimits
from genserve.generation.protocol import MAX_INPUT_BASE64_CHARS
from genserve.moderation import Moderation


class ImageHashAdd(BaseModel):
    """`POST /v1/admin/image-hashes`: a known-abusive image (base64) or its 16-hex-digit pHash."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, min_length=1, max_length=MAX_INPUT_BASE64_CHARS)
    phash: str | None = Field(None, min_length=16, max_length=16)
    reason: str = Field("", max_length=2000)
    source: str = Field("", max_length=200)


def build_moderation_router(moderation: Moderation, limits: InputImageLimits, caller: Callable[..., Any],
                            admin: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["admin"])
    admin_only = Depends(admin)  # a default, not an annotation: annotations are strings here

    @router.post("/admin/image-hashes", status_code=201)
    async def add_image_hash(body: ImageHashAdd, _: Any = admin_only) -> dict[str, Any]:
        """Refuse every input image within the configured distance of this one's perceptual hash."""
        return await asyncio.to_thread(moderation.add_image_hash, phash=body.phash, image_base64=body.image,
                                       reason=body.reason, source=body.source, limits=limits)

    return router
