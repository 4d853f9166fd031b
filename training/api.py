"""HTTP API of training jobs: a router the ingress mounts, with its auth handed in.

User endpoints take the ingress's caller dependency (anything with `.user_id`, and optionally
`.max_nsfw_level`); admin endpoints take its admin dependency. Errors are `GenserveError`s, which
the ingress turns into JSON with a stable `code` in one place.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Body, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from genserve.core.errors import InvalidRequest
from safety.levels import NsfwLevel
from training.service import Submission, TrainingService
from training.table import Training

PREFIX = "/v1"
TrainingId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
FORM_SLACK_BYTES = 64 << 10


class ProgressView(BaseModel):
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float | None
    eta_s: float | None
    percent: float


class TrainingView(BaseModel):
    id: str
    status: str
    name: str
    family: str
    base_model: str
    trigger_words: list[str]
    real_person: bool
    params: dict[str, Any]
    progress: ProgressView
    dataset: dict[str, Any]
    safety: dict[str, Any]
    quote_total: int
    # the quote's lines: steps, saved epochs and, for a fee-bearing base model, `licence_fee:<id>`
    quote_items: list[dict[str, Any]] = []
    charged: int | None
    resource_id: str | None
    output_sha256: str | None
    samples: list[dict[str, Any]]
    config: dict[str, Any]
    error: dict[str, str] | None
    attempts: int
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, row: Training) -> TrainingView:
        verdict = (row.safety or {}).get("verdict", {})
        return cls(
            id=row.id, status=row.status, name=row.name, family=row.family, base_model=row.base_model,
            trigger_words=list(row.trigger_words or []), real_person=row.real_person, params=row.params,
            progress=ProgressView(step=row.step, total_steps=row.total_steps, epoch=row.epoch, epochs=row.epochs,
                                  loss=row.loss, eta_s=row.eta_s,
                                  percent=round(100.0 * row.step / max(row.total_steps, 1), 1)),
            dataset={"images": row.dataset_images, "report": {k: v for k, v in (row.intake_report or {}).items()
                                                              if k not in ("images", "config")}},
            config=(row.intake_report or {}).get("config") or {"ignored": {}},
            safety={"action": verdict.get("action"), "rules": verdict.get("rules", [])},
            quote_total=row.quote_total, quote_items=list((row.quote or {}).get("items") or []),
            charged=row.charged, resource_id=row.resource_id,
            output_sha256=row.output_sha256,
            samples=[{k: v for k, v in s.items() if k != "key"} for s in row.samples or []],
            error={"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
            attempts=row.attempts, created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        )


class EpochView(BaseModel):
    epoch: int
    bytes: int
    sha256: str | None = None


class DenyBody(BaseModel):
    model_config = {"extra": "forbid"}
    reason: str = ""


def _stream(body: BinaryIO) -> Iterator[bytes]:
    with body:
        while chunk := body.read(1 << 20):
            yield chunk


def _allowed_level(caller: Any) -> str:
    """The most mature samples the caller may see (the ingress's `Caller.max_nsfw_level`), on the wire."""
    level = getattr(caller, "max_nsfw_level", None)
    return (level if isinstance(level, NsfwLevel) else NsfwLevel.PG13).to_wire()


def build_router(service: TrainingService, auth_dependency: Callable[..., Any],
                 admin_dependency: Callable[..., Any]) -> APIRouter:
    """`/v1/trainings...` and `/v1/admin/trainings...` on `service`."""
    router = APIRouter(prefix=PREFIX)
    # plain defaults, not local Annotated aliases: FastAPI resolves string annotations in module globals
    caller = Depends(auth_dependency)
    admin = Depends(admin_dependency)

    # the upload limit holds while the body streams in (413 at the first byte past it, or at once from
    # Content-Length), not after a whole body was spooled to disk; the slack is the form's other parts
    upload_limit = service.deps.limits.intake.max_upload_bytes + FORM_SLACK_BYTES

    @router.post("/trainings", response_model=TrainingView, status_code=202, tags=["trainings"],
                 max_body_size=upload_limit)
    def create_training(
        *,
        who: Any = caller,
        dataset: Annotated[UploadFile, File(description="zip of png/jpg/jpeg/webp images with optional .txt/.caption captions")],
        family: Annotated[str, Form(description="sd1 | sdxl")],
        real_person: Annotated[bool, Form(description="the subject is a real, identifiable person")],
        name: Annotated[str, Form(max_length=200)] = "",
        trigger_words: Annotated[str, Form(description="comma-separated")] = "",
        person: Annotated[str, Form(max_length=200, description="the person's name when real_person")] = "",
        params: Annotated[str, Form(description="JSON object of training parameters (kohya's names accepted)")] = "{}",
        config: Annotated[str, Form(description="a kohya --config_file TOML (params override it)")] = "",
        dataset_config: Annotated[str, Form(description="a kohya dataset TOML")] = "",
        captions: Annotated[str, Form(description="JSON object: file name in the zip -> caption (edits)")] = "",
        auto_caption: Annotated[bool, Form(description="caption images that have none with the captioner")] = False,
    ) -> TrainingView:
        """Upload a dataset and start a training (or queue it for review when the dataset is flagged)."""
        try:
            parsed = json.loads(params or "{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"params is not JSON: {exc}", code="invalid_training_params") from exc
        if not isinstance(parsed, dict):
            raise InvalidRequest("params must be a JSON object", code="invalid_training_params")
        try:
            edits = json.loads(captions) if captions else None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"captions is not JSON: {exc}", code="invalid_caption") from exc
        if edits is not None and not (isinstance(edits, dict) and all(isinstance(v, str) for v in edits.values())):
            raise InvalidRequest("captions must be a JSON object of file name -> caption", code="invalid_caption")
        upload = service.save_upload(dataset.file)
        try:
            row = service.submit(who.user_id, upload, Submission(
                family=family, real_person=real_person, name=name,
                trigger_words=tuple(w for w in trigger_words.split(",") if w.strip()), person=person,
                params=parsed, allowed_level=_allowed_level(who), config=config or None,
                dataset_config=dataset_config or None, captions=edits, auto_caption=auto_caption))
        finally:
            upload.unlink(missing_ok=True)
        return TrainingView.of(row)

    @router.post("/trainings/captions", tags=["trainings"])
    def propose_captions(
        *,
        who: Any = caller,
        dataset: Annotated[UploadFile, File(description="the zip you mean to train on")],
        overwrite: Annotated[bool, Form(description="caption every image, not only those without one")] = False,
    ) -> dict[str, Any]:
        """Proposed captions for review and editing before `POST /trainings` (send the edits as `captions`)."""
        upload = service.save_upload(dataset.file)
        try:
            return service.propose_captions(who.user_id, upload, overwrite=overwrite)
        finally:
            upload.unlink(missing_ok=True)

    @router.get("/trainings/{training_id}", response_model=TrainingView, tags=["trainings"])
    def get_training(*, who: Any = caller, training_id: TrainingId) -> TrainingView:
        """Status, progress (step, loss, ETA), samples and outcome."""
        return TrainingView.of(service.get(training_id, who.user_id))

    @router.post("/trainings/{training_id}/cancel", response_model=TrainingView, tags=["trainings"])
    def cancel_training(*, who: Any = caller, training_id: TrainingId) -> TrainingView:
        return TrainingView.of(service.cancel(training_id, who.user_id))

    @router.get("/trainings/{training_id}/download", tags=["trainings"],
                responses={200: {"content": {"application/octet-stream": {}}}})
    def download_training(*, who: Any = caller, training_id: TrainingId,
                          epoch: int | None = Query(None, ge=1, description="an epoch's LoRA (default: the final one)"),
                          ) -> StreamingResponse:
        """The trained LoRA (kohya-format safetensors), or the LoRA as it was after epoch `epoch`."""
        filename, body = service.download(training_id, who.user_id, epoch=epoch)
        return StreamingResponse(_stream(body), media_type="application/octet-stream",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @router.get("/trainings/{training_id}/epochs", response_model=list[EpochView], tags=["trainings"])
    def training_epochs(*, who: Any = caller, training_id: TrainingId) -> list[EpochView]:
        """Every epoch's LoRA kept so far (download one with `.../download?epoch=N`)."""
        return [EpochView(**e) for e in service.epochs(training_id, who.user_id)]

    @router.post("/trainings/{training_id}/epochs/{epoch}/publish", tags=["trainings"])
    def publish_training_epoch(*, who: Any = caller, training_id: TrainingId, epoch: int) -> dict[str, Any]:
        """Register that epoch's LoRA as a LoRA resource of its own (the user's choice of epoch)."""
        resource = service.publish_epoch(training_id, who.user_id, epoch)
        return {"resource_id": resource.id, "sha256": resource.sha256, "epoch": epoch, "name": resource.name}

    @router.get("/trainings/{training_id}/samples/{epoch}/{index}", tags=["trainings"],
                responses={200: {"content": {"image/png": {}}}})
    def training_sample(*, who: Any = caller, training_id: TrainingId, epoch: int, index: int) -> StreamingResponse:
        return StreamingResponse(_stream(service.sample(training_id, who.user_id, epoch, index)), media_type="image/png")

    @router.get("/admin/trainings", response_model=list[TrainingView], tags=["admin"])
    def list_trainings(*, _: Any = admin, status: str | None = Query(None, description="e.g. review")) -> list[TrainingView]:
        return [TrainingView.of(r) for r in service.list(statuses=[status] if status else None)]

    @router.post("/admin/trainings/{training_id}/approve", response_model=TrainingView, tags=["admin"])
    def approve_training(*, _: Any = admin, training_id: TrainingId) -> TrainingView:
        """Let a dataset in review train."""
        return TrainingView.of(service.approve(training_id))

    @router.post("/admin/trainings/{training_id}/deny", response_model=TrainingView, tags=["admin"])
    def deny_training(*, _: Any = admin, training_id: TrainingId,
                      body: Annotated[DenyBody | None, Body()] = None) -> TrainingView:
        """Refuse a dataset in review; its hold is released in full."""
        return TrainingView.of(service.deny(training_id, reason=(body or DenyBody()).reason))

    return router
