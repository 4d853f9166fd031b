"""HTTP API of resources: registering files, discovering resources, checkpoints and samplers, and the
moderators' flags and switch. A router the ingress mounts (`create_api(..., routers=[...])`), with
its caller and admin dependencies handed in, so errors and auth are the ingress's own.

A user sees public resources and their own; a private resource of someone else answers 404 exactly
like a missing one. `GET /v1/resources/{id}/download` streams a resource's file under the same rule
and the economy's early access. Every route runs its database and object-store work in a thread.
"""


import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from genserve.core.errors import InvalidRequest
from genserve.resources.catalog import ModelCatalog
from genserve.resources.models import ModelFamily, ResourceKind, Visibility
from genserve.resources.protocol import (
    ModelList,
    ModelView,
    ModerationFlags,
    ResourceDisable,
    ResourceList,
    ResourceUpdate,
    ResourceView,
)
from genserve.resources.service import ResourceService, UploadSpec
from safety.levels import NsfwLevel

PREFIX = "/v1"
ResourceRef = Annotated[str, Path(min_length=1, max_length=200, description="resource id or AIR alias")]
DEFAULT_PAGE = 100


def _words(value: str) -> list[str]:
    return [w.strip() for w in value.split(",") if w.strip()][:50]


def build_router(resources: ResourceService, catalog: ModelCatalog, caller: Callable[..., Any],
                 admin: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix=PREFIX)
    CallerDep = Annotated[Any, Depends(caller)]
    AdminDep = Annotated[str, Depends(admin)]
    registry = resources.registry

    def sees_nsfw(who: Any) -> bool:
        return NsfwLevel.parse(getattr(who, "max_nsfw_level", NsfwLevel.PG13)) >= NsfwLevel.R

    @router.post("/resources", response_model=ResourceView, status_code=201, tags=["resources"],
                 responses={200: {"description": "the caller had registered this very file already"},
                            403: {"description": "likeness_blocked: the file reproduces a blocklisted person"},
                            413: {"description": "upload_too_large"},
                            422: {"description": "not_safetensors, safetensors_header_invalid, family_mismatch, "
                                                 "resource_kind_unknown, ..."}})
    async def register_resource(
        who: CallerDep,
        file: Annotated[UploadFile | None, File(description="a .safetensors file")] = None,
        key: Annotated[str | None, Form(description="or: an object already staged under uploads/<user>/")] = None,
        kind: Annotated[ResourceKind | None, Form(description="checkpoint | lora | embedding | vae (default: detected)")] = None,
        family: Annotated[ModelFamily | None, Form(description="sd1 | sdxl (default: detected)")] = None,
        name: Annotated[str | None, Form(max_length=200)] = None,
        visibility: Annotated[Visibility, Form()] = Visibility.private,
        minor: Annotated[bool, Form()] = False,
        poi: Annotated[bool, Form(description="depicts a real person")] = False,
        nsfw: Annotated[bool, Form()] = False,
        sfw_only: Annotated[bool, Form()] = False,
        air: Annotated[str | None, Form(max_length=200, description="AIR alias to register it under")] = None,
        trigger_words: Annotated[str, Form(description="comma-separated")] = "",
        token: Annotated[str | None, Form(max_length=100, description="an embedding's prompt token")] = None,
    ) -> JSONResponse:
        """Register a LoRA (kohya, diffusers/PEFT, LyCORIS, DoRA), a textual inversion, a VAE (its family
        declared: the keys do not tell) or a single-file checkpoint. Safetensors only; its family is read
        from its keys and must match a declared one;
        it is checked against the likeness blocklist before anything is stored. Uploads cost nothing."""
        if (file is None) == (key is None):
            raise InvalidRequest("send either a file or the key of a staged upload", code="upload_source")
        spec = UploadSpec(owner=who.user_id, name=name, kind=kind, family=family.value if family else None,
                          visibility=visibility, minor=minor, poi=poi, nsfw=nsfw, sfw_only=sfw_only, air=air,
                          trigger_words=_words(trigger_words), token=token,
                          filename=file.filename if file is not None else key)
        request_id = getattr(who, "request_id", None)

        def run() -> Any:
            if file is not None:
                with resources.staged(file.file) as path:
                    return resources.add(path, spec, request_id=request_id)
            with resources.staged_key(key, who.user_id) as path:
                return resources.add(path, spec, request_id=request_id, staged_key=key)

        done = await asyncio.to_thread(run)
        view = ResourceView.of(done.resource)
        return JSONResponse(view.model_dump(mode="json"), status_code=201 if done.created else 200,
                            headers={"Location": f"{PREFIX}/resources/{view.id}"})

    @router.get("/resources", response_model=ResourceList, tags=["resources"])
    async def list_resources(
        who: CallerDep,
        kind: ResourceKind | None = None,
        family: ModelFamily | None = None,
        owner: str | None = Query(None, description="`me` for the caller's own"),
        visibility: Visibility | None = None,
        after: str | None = Query(None, description="page after this id"),
        limit: int = Query(DEFAULT_PAGE, ge=1, le=500),
    ) -> ResourceList:
        """Resources the caller may use: public ones and their own (mature ones only from level R)."""
        owner = who.user_id if owner == "me" else owner
        rows = await asyncio.to_thread(registry.list, kind, family, owner=owner, visibility=visibility,
                                       viewer=who.user_id, include_nsfw=sees_nsfw(who), after=after,
                                       limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return ResourceList(resources=[ResourceView.of(r) for r in rows], next_after=rows[-1].id if more else None)

    @router.get("/resources/{resource_id}", response_model=ResourceView, tags=["resources"])
    async def get_resource(who: CallerDep, resource_id: ResourceRef) -> ResourceView:
        return ResourceView.of(await asyncio.to_thread(registry.visible, resource_id, who.user_id))

    @router.get("/resources/{resource_id}/download", tags=["resources"], response_class=StreamingResponse,
                responses={200: {"content": {"application/octet-stream": {}},
                                 "description": "the safetensors file; ETag is its SHA-256"},
                           403: {"description": "early_access: unlock it, or wait until the window ends"},
                           404: {"description": "resource_not_found (also another user's private resource)"},
                           409: {"description": "resource_not_downloadable: a diffusers folder"},
                           422: {"description": "resource_disabled: taken down (its owner still may)"}})
    async def download_resource(who: CallerDep, resource_id: ResourceRef) -> StreamingResponse:
        """The resource's file, for a caller who may see it and is past its early access."""
        found = await asyncio.to_thread(resources.download, resource_id, who.user_id)
        # a plain iterator: Starlette reads it in a worker thread, off the event loop
        return StreamingResponse(found.chunks, media_type=found.content_type, headers=found.headers())

    @router.patch("/resources/{resource_id}", response_model=ResourceView, tags=["resources"])
    async def update_resource(who: CallerDep, resource_id: ResourceRef, body: ResourceUpdate) -> ResourceView:
        """The owner's visibility and flags (a flag a moderator set stays as they set it: `flag_locked`)."""
        row = await asyncio.to_thread(resources.update, resource_id, who.user_id, visibility=body.visibility,
                                      flags=body.flags.set() if body.flags else None)
        return ResourceView.of(row)

    @router.get("/models", response_model=ModelList, tags=["resources"])
    async def list_models(who: CallerDep, family: ModelFamily | None = None) -> ModelList:
        """Checkpoints a generation can name, with file sizes and their family's sizes."""
        rows = await asyncio.to_thread(registry.list, ResourceKind.checkpoint, family, viewer=who.user_id,
                                       include_nsfw=sees_nsfw(who), enabled_only=True)
        models = []
        for row in rows:
            view = ResourceView.of(row)
            fam = catalog.families.get(view.family.value)
            models.append(ModelView(
                id=view.id, air=view.air, name=view.name, family=view.family, file_format=view.file_format,
                size_bytes=view.size_bytes, hashes=view.hashes, owner=view.owner, visibility=view.visibility,
                pipeline=fam.pipeline if fam else None, default_size=fam.default_size if fam else None,
                allowed_sizes=list(fam.allowed_sizes) if fam else [], flags=view.flags))
        return ModelList(models=models)

    # -- moderators -----------------------------------------------------------------------------

    @router.get("/admin/resources", response_model=ResourceList, tags=["admin"])
    async def admin_list_resources(
        _: AdminDep, kind: ResourceKind | None = None, family: ModelFamily | None = None, owner: str | None = None,
        visibility: Visibility | None = None, after: str | None = None, limit: int = Query(DEFAULT_PAGE, ge=1, le=500),
    ) -> ResourceList:
        rows = await asyncio.to_thread(registry.list, kind, family, owner=owner, visibility=visibility,
                                       after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return ResourceList(resources=[ResourceView.of(r) for r in rows], next_after=rows[-1].id if more else None)

    @router.post("/admin/resources/{resource_id}/flags", response_model=ResourceView, tags=["admin"])
    async def moderate_flags(_: AdminDep, resource_id: ResourceRef, body: ModerationFlags) -> ResourceView:
        """Set flags as a moderator; they are locked against the owner's changes."""
        row = await asyncio.to_thread(resources.moderate, resource_id, body.moderator, body.flags.set(), body.note)
        return ResourceView.of(row)

    @router.post("/admin/resources/{resource_id}/disable", response_model=ResourceView, tags=["admin"])
    async def disable_resource(_: AdminDep, resource_id: ResourceRef, body: ResourceDisable) -> ResourceView:
        """Refused for generation at once on every replica; workers drop its adapter on next sight."""
        return ResourceView.of(await asyncio.to_thread(resources.disable, resource_id, body.moderator, body.reason))

    @router.post("/admin/resources/{resource_id}/enable", response_model=ResourceView, tags=["admin"])
    async def enable_resource(_: AdminDep, resource_id: ResourceRef, body: ResourceDisable) -> ResourceView:
        return ResourceView.of(await asyncio.to_thread(resources.enable, resource_id, body.moderator))

    return router
