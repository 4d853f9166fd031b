"""The API's views of jobs and quotes, built from the job row and the price."""

from __future__ import annotations

from genserve.billing.pricing import Quote
from genserve.generation.jobs import GenerationJob
from genserve.generation.protocol import (
    API_VERSION,
    ErrorView,
    ImageView,
    JobView,
    ProgressView,
    QuoteItemView,
    QuoteView,
    WithheldImageView,
)


def quote_view(quote: Quote, quantity: int, available: int | None = None) -> QuoteView:
    items = [QuoteItemView(name=i.name, amount=i.amount, detail=i.detail) for i in quote.items]
    return QuoteView(total=quote.total, per_image=quote.per_image, quantity=quantity, items=items,
                     balance_available=available)


def job_view(job: GenerationJob) -> JobView:
    result = job.result or {}
    base = f"/{API_VERSION}/generations/{job.id}/images"
    progress = job.progress or {}
    return JobView(
        id=job.id, status=job.status.value, user_id=job.user_id, checkpoint=job.checkpoint_id,
        family=job.family, priority=job.priority, seeds=list(job.request.get("seeds", [])),
        quantity=job.quantity, quote=job.quote_total, charged=job.charged,
        progress=ProgressView(**{k: int(progress.get(k, 0)) for k in ("step", "total", "image", "images")}),
        images=[ImageView(url=f"{base}/{i['index']}", **i) for i in result.get("images", [])],
        withheld=[WithheldImageView(**w) for w in result.get("withheld", [])],
        infotext=result.get("infotext"),
        error=ErrorView(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        safety=job.request.get("precheck"),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
    )
