"""`POST /v1/generations/multipart`: a generation whose input image (and mask) come as file parts.

The `request` part is the JSON body `POST /v1/generations` takes; the `init_image` and `mask` parts
stand in for its base64 fields. Each part is read up to the input byte bound plus one byte (past it,
`input_image_too_large` before the rest is read), then handed to the same admission as a JSON request:
one decoder, one set of bounds, one safety check.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from genserve.core.errors import InputImageTooLarge, InvalidRequest
from genserve.generation.protocol import GenerationRequest


async def _part(upload: UploadFile | None, field: str, max_bytes: int) -> dict[str, str] | None:
    if upload is None:
        return None
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputImageTooLarge(f"{field} is over {max_bytes} bytes", details={"field": field, "max_bytes": max_bytes})
    return {"data": base64.b64encode(data).decode()}


def build_upload_router(service: Any, caller: Callable[..., Any], admin: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["generations"])
    who_dep = Depends(caller)  # a default, not an annotation: annotations are strings here
    limits = service.settings.generation.input_images
    body_limit = 2 * limits.max_bytes + (1 << 20)

    @router.post("/generations/multipart", status_code=202, max_body_size=body_limit)
    async def create_generation_multipart(
        request: Annotated[str, Form(description="the JSON body of POST /v1/generations")],
        init_image: Annotated[UploadFile | None, File(description="img2img / inpaint input")] = None,
        mask: Annotated[UploadFile | None, File(description="inpaint mask")] = None,
        wait: bool = Query(False),
        timeout: float = Query(60.0, gt=0),
        who: Any = who_dep,
    ) -> JSONResponse:
        """Start a generation with its input image as a file part; answers as `POST /v1/generations`."""
        try:
            body = json.loads(request)
        except ValueError as exc:
            raise InvalidRequest("`request` is not JSON", code="invalid_body") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("`request` is a JSON object", code="invalid_body")
        for name, upload in (("init_image", init_image), ("mask", mask)):
            part = await _part(upload, name, limits.max_bytes)
            if part is not None:
                body[name] = part
        try:
            parsed = GenerationRequest.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest("invalid request", details={"errors": exc.errors(include_url=False,
                                                                                 include_input=False)}) from exc
        view, created = await service.submit(who, parsed)
        if wait:
            view = await service.wait(who, view.id, timeout)
        finished = view.status.value not in ("queued", "running")
        return JSONResponse(view.model_dump(mode="json"), status_code=200 if finished or not created else 202,
                            headers={"Location": f"/v1/generations/{view.id}"})

    return router
