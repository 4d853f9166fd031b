"""HTTP routes of the creator economy, mounted through `create_api(..., routers=[...])`.

    GET  /v1/generations/{id}/receipt            the job's prices, ledger legs and audit rows
    POST /v1/accounts/{user}/allowance            claim today's free buzz (once per UTC day)
    GET  /v1/accounts/{user}/earnings             an owner's income by kind over [since, until)
    GET  /v1/resources/{id}/terms                 licence fee, early-access window, unlock price, goal
    PUT  /v1/resources/{id}/terms                 the owner sets them
    GET  /v1/resources/{id}/access                200 when the caller may generate with / download it
                                                  (the file itself: the resources router's /download)
    POST /v1/resources/{id}/unlock                buy early access (idempotent)
    POST /v1/resources/{id}/contributions         give toward the goal (idempotent per key)
    POST /v1/admin/unlocks/{unlock_id}/refund     admin: refund an unlock or contribution
    GET  /v1/admin/resources/{id}/unlocks         admin: who unlocked or contributed

Tips and priority are fields of the generation request itself (`creator_tip_pct`, `platform_tip_pct`,
`priority`); the quote lists what they cost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from genserve.billing.ledger import user_account
from genserve.core.errors import Forbidden
from genserve.economy.receipts import generation_receipt

PREFIX = "/v1"
# module-level aliases: FastAPI resolves the (string) annotations in this module's globals
ResourceId = Annotated[str, Path(min_length=1, max_length=64)]
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


class TermsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    licence_fee: int | None = Field(None, ge=0, description="buzz per delivered image, 0..licence_fee_cap")
    early_access_days: int | None = Field(None, ge=0, description="window from now, 0..early_access_max_days; 0 ends it")
    unlock_price: int | None = Field(None, ge=0)
    contribution_goal: int | None = Field(None, ge=0, description="0 removes the goal")


class ContributionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(gt=0)
    idempotency_key: str = Field(min_length=1, max_length=100)


class RefundBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=200)


def _own(who: Any, user: str) -> None:
    if user != who.user_id:
        raise Forbidden("a user sees only their own account", code="not_your_account")


def build_router(service: Any, auth_dependency: Callable[..., Any], admin_dependency: Callable[..., Any]) -> APIRouter:
    """The economy routes on a `GenerationService` (its ledger, jobs, audit log and `economy`)."""
    router = APIRouter(prefix=PREFIX)
    caller = Depends(auth_dependency)
    admin = Depends(admin_dependency)
    economy = service.economy

    @router.get("/generations/{job_id}/receipt", tags=["billing"])
    async def receipt(job_id: JobId, who: Any = caller) -> dict:
        def read() -> dict:
            job = service.jobs.get(job_id, who.user_id)
            return generation_receipt(job, service.ledger, service.safety.audit)
        return await asyncio.to_thread(read)

    @router.post("/accounts/{user}/allowance", tags=["billing"])
    async def allowance(user: str, who: Any = caller) -> dict:
        _own(who, user)

        def claim() -> dict:
            entry = service.ledger.daily_allowance(user_account(user))
            balance = service.ledger.balance(user_account(user))
            return {"granted": entry.amount if entry else 0, "already_claimed": entry is None,
                    "available": balance.available}
        return await asyncio.to_thread(claim)

    @router.get("/accounts/{user}/earnings", tags=["billing"])
    async def earnings(user: str, who: Any = caller, since: dt.datetime | None = Query(None),
                       until: dt.datetime | None = Query(None)) -> dict:
        _own(who, user)
        return await asyncio.to_thread(economy.earnings, user, since, until)

    @router.get("/resources/{resource_id}/terms", tags=["economy"])
    async def get_terms(resource_id: ResourceId, who: Any = caller) -> dict:
        return (await asyncio.to_thread(economy.get_terms, resource_id)).to_dict()

    @router.put("/resources/{resource_id}/terms", tags=["economy"])
    async def put_terms(resource_id: ResourceId, body: TermsBody, who: Any = caller) -> dict:
        terms = await asyncio.to_thread(lambda: economy.set_terms(who.user_id, resource_id, **body.model_dump()))
        return terms.to_dict()

    @router.get("/resources/{resource_id}/access", tags=["economy"])
    async def access(resource_id: ResourceId, who: Any = caller) -> dict:
        await asyncio.to_thread(economy.check_download, resource_id, who.user_id)
        return {"resource_id": resource_id, "allowed": True}

    @router.post("/resources/{resource_id}/unlock", tags=["economy"])
    async def unlock(resource_id: ResourceId, who: Any = caller) -> dict:
        return await asyncio.to_thread(economy.unlock, who.user_id, resource_id)

    @router.post("/resources/{resource_id}/contributions", tags=["economy"])
    async def contribute(resource_id: ResourceId, body: ContributionBody, who: Any = caller) -> dict:
        return await asyncio.to_thread(economy.contribute, who.user_id, resource_id, body.amount,
                                       body.idempotency_key)

    @router.post("/admin/unlocks/{unlock_id}/refund", tags=["admin"])
    async def refund(unlock_id: int, body: RefundBody | None = None, _: Any = admin) -> dict:
        return await asyncio.to_thread(economy.refund, unlock_id, body.reason if body else "")

    @router.get("/admin/resources/{resource_id}/unlocks", tags=["admin"])
    async def unlocks(resource_id: ResourceId, _: Any = admin) -> list[dict]:
        return await asyncio.to_thread(economy.unlocks, resource_id)

    return router
