"""The HTTP ingress (`/v1`): authentication, validation and error mapping around `GenerationService`.

Thin on purpose: every decision is the service's. Errors are mapped here exactly once, from
`GenserveError` / `SafetyError` / validation failures to `{"code", "message", "details"}` with the
matching status. The calling back end authenticates with the service token and names the user in
`X-User-Id` (with `X-User-Tier` and `X-Max-Nsfw-Level`); admin routes take the admin token.

`Ingress` is the Ray Serve deployment; `create_api` builds the same FastAPI app around any
service, so the routes also run in-process (tests, benchmarks). Routes never block their event loop:
database and object-store calls run in threads, because in Serve's throughput mode (the HAProxy
ingress) the routes share the loop that also carries the replica's own control traffic.

Past 450 lines on purpose: every `/v1` generation, billing, admin and operations route sits beside the
one auth and the one error mapping they share; the resource, training and economy routes are routers of
their own, mounted here.
"""


import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, SecretStr, model_validator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.core import metrics
from genserve.core.config import Settings
from genserve.core.errors import Forbidden, GenserveError, InvalidRequest, QueueFull, Unauthenticated
from genserve.core.ids import USER_ID_DESCRIPTION, is_user_id
from genserve.core.log import log_context
from genserve.engine.infotext import MEDIA_TYPES, image_format
from genserve.engine.schedulers import sampler_catalog
from genserve.generation.admission import Caller
from genserve.generation.inputs import body_limit
from genserve.generation.protocol import (
    API_VERSION,
    BalanceView,
    GenerationRequest,
    JobView,
    QuoteRequest,
    QuoteView,
    refuse_nul,
)
from genserve.generation.service import GenerationService
from genserve.moderation import Moderation
from safety.errors import NotSafetensors, SafetyError
from safety.levels import NsfwLevel
from safety.lora_format import LoraFormatError
from safety.takedowns import TakedownNotFound, TakedownNotPending

logger = logging.getLogger(__name__)

PREFIX = f"/{API_VERSION}"
# a JSON body is a few KB besides its input images (their room: `inputs.body_limit`); more is no request
MAX_JSON_BODY_BYTES = 1 << 20
# a `Last-Event-ID` past every event a job can have: the stream ends once the job has ended
MAX_EVENT_SEQ = 1 << 62
_DIGITS = re.compile(r"[0-9]+")

# SafetyError subclasses that are the caller's fault; any other safety failure is ours (fail closed, 503)
_SAFETY_STATUS: tuple[tuple[type[SafetyError], int], ...] = (
    (TakedownNotFound, 404),
    (TakedownNotPending, 409),
    (NotSafetensors, 422),
    (LoraFormatError, 422),
)


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "details": details or {}}, status_code=status,
                        headers=headers)


def map_error(exc: Exception) -> JSONResponse:
    """The one place where exceptions become HTTP responses."""
    if isinstance(exc, GenserveError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)
    if isinstance(exc, SafetyError):
        status = next((s for cls, s in _SAFETY_STATUS if isinstance(exc, cls)), 503)
        return error_response(status, exc.code, exc.message)
    if isinstance(exc, RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(422, "invalid_json", "the body is not valid JSON", {"errors": errors})
        fields = sorted({".".join(str(p) for p in e["loc"][1:]) for e in errors if len(e["loc"]) > 1})
        return error_response(422, "invalid_request", f"invalid request: {', '.join(fields) or 'body'}",
                              {"errors": errors})
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not parse the body at all (not UTF-8, a broken form)
            return error_response(422, "invalid_body", "the body could not be parsed")
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def last_event_seq(header: str | None) -> int:
    """The event a reconnecting client saw last. Anything but ASCII digits is ignored (0: from the
    start, as the header is the client's echo of an id this service sent); a value past any real
    event is clamped, so it reads as "after the last one"."""
    value = (header or "").strip()
    if not _DIGITS.fullmatch(value):
        return 0
    return MAX_EVENT_SEQ if len(value) > 18 else min(int(value), MAX_EVENT_SEQ)


# --------------------------------------------------------------------------------------------- auth


def _tokens(*secrets_: SecretStr | None) -> tuple[bytes, ...]:
    return tuple(s.get_secret_value().encode() for s in secrets_ if s is not None and s.get_secret_value())


def _matches(token: bytes, accepted: tuple[bytes, ...]) -> bool:
    """Constant time per candidate, and every candidate compared."""
    return sum(secrets.compare_digest(token, t) for t in accepted) > 0


class Auth:
    """Bearer tokens compared in constant time; the user comes from the calling back end's headers."""

    def __init__(self, settings: Settings):
        auth = settings.auth
        # the previous token stays valid while a rotation rolls out to the site's back ends
        self._service = _tokens(auth.service_token, auth.previous_service_token)
        self._admin = _tokens(auth.admin_token, auth.previous_admin_token)

    @staticmethod
    def _token(authorization: str | None) -> bytes:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token", code="token_missing")
        return authorization[7:].strip().encode()

    def admin(self, authorization: str | None) -> None:
        if not _matches(self._token(authorization), self._admin):
            raise Unauthenticated("invalid admin token", code="token_invalid")

    def caller(self, authorization: str | None, user_id: str | None, tier: str | None, nsfw: str | None,
               request_id: str) -> Caller:
        if not _matches(self._token(authorization), self._service):
            raise Unauthenticated("invalid service token", code="token_invalid")
        if not is_user_id(user_id):  # the ledger's rule too: every id accepted here has an account
            raise Unauthenticated(f"X-User-Id must name the user ({USER_ID_DESCRIPTION})", code="user_missing")
        try:
            level = NsfwLevel.from_wire(nsfw) if nsfw else NsfwLevel.PG13
        except ValueError:
            raise InvalidRequest(f"X-Max-Nsfw-Level must be one of {[lv.to_wire() for lv in NsfwLevel]}",
                                 code="invalid_nsfw_level") from None
        return Caller(user_id=user_id, tier=tier or None, max_nsfw_level=level, request_id=request_id)


def auth_dependencies(auth: Auth) -> tuple[Callable[..., Caller], Callable[..., str]]:
    """FastAPI dependencies for the caller (service token + user headers) and for admin routes.

    Both are `async def` although they never await: FastAPI runs a plain `def` dependency in its
    thread pool, a hop per request for a few microseconds of work."""

    async def caller(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_user_id: Annotated[str | None, Header()] = None,
        x_user_tier: Annotated[str | None, Header()] = None,
        x_max_nsfw_level: Annotated[str | None, Header()] = None,
    ) -> Caller:
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        return auth.caller(authorization, x_user_id, x_user_tier, x_max_nsfw_level, request_id)

    async def admin(authorization: Annotated[str | None, Header()] = None) -> str:
        auth.admin(authorization)
        return "admin"

    return caller, admin


# --------------------------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = {"extra": "forbid"}

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        return refuse_nul(data)


class LikenessAdd(_Body):
    resource_id: str = Field(min_length=1, max_length=64)
    person: str = Field(min_length=1, max_length=200)
    reason: str = Field("", max_length=2000)
    source: str = Field("", max_length=200)


class TakedownCreate(_Body):
    person: str = Field(min_length=1, max_length=200)
    contact: str = Field("", max_length=320)
    resource_ids: list[str] = Field(default_factory=list, max_length=100)
    reason: str = Field("", max_length=2000)


class TakedownDecision(_Body):
    moderator: str = Field(min_length=1, max_length=200)
    note: str = Field("", max_length=2000)


# --------------------------------------------------------------------------------------------- app


class RequestContext:
    """Every request gets an id (the caller's `X-Request-Id` or a new one) that tags its logs and
    comes back in the response; errors not mapped by a handler are mapped here; requests are
    counted by route and status. Plain ASGI: `@app.middleware` would wrap every call in an extra
    task and response stream."""

    def __init__(self, app: Callable[..., Any], page: metrics.ServicePage):
        self.app = app
        self.page = page

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status: list[int] = []

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # noqa: BLE001 - anything the handlers did not map
                if status:
                    raise
                await map_error(exc)(scope, receive, send_with_id)
        path = getattr(scope.get("route"), "path", "unmatched")
        code = status[0] if status else 500
        self.page.count_request(path, code)
        metrics.inc("genserve_requests_total", route=path, status=str(code))


_STATUS_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type", 429: "too_many_requests", 500: "internal_error"}


class JsonErrors:
    """Every error leaves as `{"code", "message", "details"}` JSON, also the few that Starlette writes
    itself as plain text before any handler runs (413 from a declared Content-Length past a route's
    body limit). Plain ASGI, outermost after `RequestContext`."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json_errors(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] >= 400:
                headers = [(k, v) for k, v in message.get("headers", [])]
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if not ctype.startswith(b"application/json"):
                    replaced = True
                    status = message["status"]
                    code = _STATUS_CODES.get(status, "http_error")
                    try:
                        phrase = HTTPStatus(status).phrase
                    except ValueError:
                        phrase = "error"
                    body = json.dumps({"code": code, "message": phrase, "details": {}}).encode()
                    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
                    await send({"type": "http.response.start", "status": status, "headers": [
                        *kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced and message["type"] == "http.response.body":
                return  # the plain-text body was replaced
            await send(message)

        await self.app(scope, receive, send_json_errors)


RouterBuilder = Callable[[Callable[..., Any], Callable[..., Any]], APIRouter]


def create_api(service: GenerationService, moderation: Moderation, *, routers: Sequence[RouterBuilder] = (),
               start_background: bool = True) -> FastAPI:
    """The FastAPI app around `service` (generation routes) and `moderation` (admin routes). Each of
    `routers` is called with this app's caller and admin dependencies and mounted (the training API),
    so every route shares one auth and one error mapping."""
    settings = service.settings
    auth = Auth(settings)
    page = metrics.ServicePage(service.job_figures)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_background:
            service.start_background()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="genserve", version=API_VERSION, lifespan=lifespan,
                  description="Stable Diffusion generation with metered buzz billing and mandatory safety guards.")
    for exc_type in (GenserveError, SafetyError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, lambda _req, exc: map_error(exc))

    app.add_middleware(JsonErrors)
    app.add_middleware(RequestContext, page=page)

    caller, admin = auth_dependencies(auth)
    CallerDep = Annotated[Caller, Depends(caller)]
    AdminDep = Annotated[str, Depends(admin)]
    JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]

    def job_response(view: JobView, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(view.model_dump(mode="json"), status_code=status, headers=headers)

    # -- generations ----------------------------------------------------------------------------

    @app.post(f"{PREFIX}/generations", response_model=JobView, status_code=202, tags=["generations"],
              max_body_size=body_limit(settings.generation.input_images, MAX_JSON_BODY_BYTES))
    async def create_generation(
        who: CallerDep,
        body: GenerationRequest,
        wait: bool = Query(False, description="block until the job ends (up to `timeout` seconds)"),
        timeout: float = Query(60.0, gt=0),
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Start a generation. Returns at once with the job (202), or with `wait=true` when it ends (200)."""
        if idempotency_key and not body.idempotency_key:
            body = GenerationRequest.model_validate({**body.model_dump(), "idempotency_key": idempotency_key})
        view, created = await service.submit(who, body)
        if wait:
            view = await service.wait(who, view.id, timeout)
        finished = view.status.value not in ("queued", "running")
        # 202: accepted and still going; 200: finished, or an earlier job named by the idempotency key
        return job_response(view, 200 if finished or not created else 202,
                            {"Location": f"{PREFIX}/generations/{view.id}"})

    @app.get(f"{PREFIX}/generations/{{job_id}}", response_model=JobView, tags=["generations"])
    async def get_generation(who: CallerDep, job_id: JobId) -> JobView:
        return await asyncio.to_thread(service.get, who, job_id)

    @app.post(f"{PREFIX}/generations/{{job_id}}/cancel", response_model=JobView, status_code=202,
              tags=["generations"])
    async def cancel_generation(who: CallerDep, job_id: JobId) -> JSONResponse:
        return job_response(await service.cancel(who, job_id), 202)

    @app.get(f"{PREFIX}/generations/{{job_id}}/events", tags=["generations"],
             response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def generation_events(
        who: CallerDep, job_id: JobId, last_event_id: Annotated[str | None, Header()] = None
    ) -> EventSourceResponse:
        """Server-sent events: `status` and `progress`, ending with the terminal status. Resumable:
        `Last-Event-ID` resumes after that event; at or past the last one of an ended job the stream
        ends at once (what a browser sends when it reconnects after the end)."""
        after = last_event_seq(last_event_id)
        await asyncio.to_thread(service.get, who, job_id)  # an unknown job is a 404 before the stream starts
        events = service.events(who, job_id, after)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            async for event in events:
                yield ServerSentEvent(id=str(event.seq), event=event.kind, data=json.dumps(event.data, sort_keys=True))

        # a comment line every `sse_ping_s` keeps a job queued for long past a load balancer's idle timeout
        return EventSourceResponse(stream(), ping=settings.generation.sse_ping_s, sep="\n",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get(f"{PREFIX}/generations/{{job_id}}/images/{{index}}", tags=["generations"],
             response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}})
    async def generation_image(
        who: CallerDep, job_id: JobId, index: Annotated[int, Path(ge=0, le=63)],
        redirect: bool = Query(False, description="307 to a presigned object-store URL instead of the bytes"),
    ) -> Response:
        if redirect:
            url = await asyncio.to_thread(service.image_url, who, job_id, index)
            if url is not None:  # a store without HTTP URLs (local files) answers with the bytes
                return RedirectResponse(url, status_code=307)
        _, png = await asyncio.to_thread(service.image, who, job_id, index)
        return Response(png, media_type=MEDIA_TYPES[image_format(png)],
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get(f"{PREFIX}/samplers", tags=["generations"])
    async def list_samplers(who: CallerDep) -> list[dict[str, Any]]:
        """The samplers `sampler` accepts (the engine's list), with A1111's split form and ComfyUI's names."""
        return sampler_catalog()

    # -- billing --------------------------------------------------------------------------------

    @app.post(f"{PREFIX}/quotes", response_model=QuoteView, tags=["billing"],
              max_body_size=body_limit(settings.generation.input_images, MAX_JSON_BODY_BYTES))
    async def create_quote(who: CallerDep, body: QuoteRequest) -> QuoteView:
        """The price of a generation request, checked like a submit; nothing is held."""
        return await asyncio.to_thread(service.quote, who, body)

    @app.get(f"{PREFIX}/accounts/{{user}}/balance", response_model=BalanceView, tags=["billing"])
    async def get_balance(who: CallerDep, user: str) -> BalanceView:
        if user != who.user_id:
            raise Forbidden("a user sees only their own balance", code="not_your_account")
        return await asyncio.to_thread(service.balance, user)

    # -- admin ----------------------------------------------------------------------------------

    @app.post(f"{PREFIX}/admin/likeness", status_code=201, tags=["admin"])
    async def add_likeness(_: AdminDep, body: LikenessAdd) -> dict[str, Any]:
        """Blocklist a registered LoRA/embedding as a real person's likeness (and its copies)."""
        entry_id = await asyncio.to_thread(moderation.add_likeness, body.resource_id, body.person, body.reason, body.source)
        return {"entry_id": entry_id, "resource_id": body.resource_id}

    @app.post(f"{PREFIX}/admin/takedowns", status_code=201, tags=["admin"])
    async def request_takedown(_: AdminDep, body: TakedownCreate) -> dict[str, Any]:
        record = await asyncio.to_thread(moderation.request_takedown, body.person, contact=body.contact,
                                         resource_ids=body.resource_ids, reason=body.reason, requested_by="admin-api")
        return record.to_dict()

    @app.post(f"{PREFIX}/admin/takedowns/{{takedown_id}}/approve", tags=["admin"])
    async def approve_takedown(_: AdminDep, takedown_id: str, body: Annotated[TakedownDecision, Body()]) -> dict:
        """Blocklist the named resources and the person's name; the resources stop being generated with."""
        return (await asyncio.to_thread(moderation.approve_takedown, takedown_id, body.moderator, body.note)).to_dict()

    @app.post(f"{PREFIX}/admin/takedowns/{{takedown_id}}/deny", tags=["admin"])
    async def deny_takedown(_: AdminDep, takedown_id: str, body: Annotated[TakedownDecision, Body()]) -> dict:
        return (await asyncio.to_thread(moderation.deny_takedown, takedown_id, body.moderator, body.note)).to_dict()

    # -- operations -----------------------------------------------------------------------------

    @app.get(f"{PREFIX}/healthz", tags=["operations"])
    async def healthz() -> dict[str, Any]:
        started = time.perf_counter()
        active = await asyncio.to_thread(service.count_active)
        return {"status": "ok", "active_jobs": active, "db_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.get(f"{PREFIX}/metrics", response_class=PlainTextResponse, tags=["operations"])
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(await asyncio.to_thread(page.render), media_type=CONTENT_TYPE_LATEST)

    for build in routers:
        app.include_router(build(caller, admin))
    return app

