"""Per-job receipts: the prices applied, every ledger leg of the job, and the audit rows it links to.

A receipt is read from the ledger itself (the hold and the entries posted under it), never from
what the job row says it charged, so it shows what actually moved: the hold, each capture leg
(platform, owners, tips, priority) and what was released back to the user.
"""

from __future__ import annotations

from typing import Any

from genserve.billing.errors import HoldNotFound
from genserve.billing.ledger import Ledger
from genserve.billing.records import iso


def hold_receipt(ledger: Ledger, hold_id: str | None) -> dict[str, Any]:
    """The hold and its legs as the ledger has them."""
    if not hold_id:
        return {"hold": None, "legs": [], "captured": 0, "released": 0}
    try:
        hold = ledger.get_hold(hold_id)
    except HoldNotFound:
        return {"hold": None, "legs": [], "captured": 0, "released": 0}
    legs = [{"to": e.account, "amount": e.amount, "kind": e.kind, "entry_id": e.id, "transfer_id": e.transfer_id,
             "at": iso(e.created_at)}
            for e in ledger.hold_entries(hold_id) if e.account != hold.account]
    released = hold.amount - hold.captured if hold.status in ("captured", "released", "expired") else 0
    return {
        "hold": {"id": hold.id, "account": hold.account, "amount": hold.amount, "status": hold.status,
                 "key": hold.key, "created_at": iso(hold.created_at), "closed_at": iso(hold.closed_at)},
        "legs": legs, "captured": hold.captured, "released": released,
        "legs_sum_to_capture": sum(leg["amount"] for leg in legs) == hold.captured,
    }


def generation_receipt(job: Any, ledger: Ledger, audit: Any | None = None) -> dict[str, Any]:
    """`GET /v1/generations/{id}/receipt`: a `GenerationJob` row's prices, legs and audit links."""
    result = job.result or {}
    receipt = {
        "job_id": job.id, "user_id": job.user_id, "status": job.status.value, "priority": job.priority,
        "quantity": job.quantity, "delivered": len(result.get("images", [])),
        "withheld": len(result.get("withheld", [])), "charged": job.charged, "quote": job.quote,
        **hold_receipt(ledger, job.hold_id),
    }
    if audit is not None:
        receipt["audit"] = [{"id": r.id, "kind": r.kind, "action": r.action, "rules": r.rules,
                             "row_hash": r.row_hash} for r in audit.query(job_id=job.id, limit=100)]
    return receipt
