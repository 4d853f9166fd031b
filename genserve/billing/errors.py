"""Ledger refusals. Each has a stable `code`; every one leaves the ledger unchanged."""

from __future__ import annotations

from genserve.core.errors import Conflict, InsufficientFunds, InvalidRequest, NotFound


class InvalidAmount(InvalidRequest):
    code = "invalid_amount"


class InvalidAccount(InvalidRequest):
    code = "invalid_account"


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"


class AccountNotFound(NotFound):
    code = "account_not_found"


class HoldNotFound(NotFound):
    code = "hold_not_found"


class CaptureExceedsHold(InvalidRequest):
    code = "capture_exceeds_hold"


class HoldClosed(Conflict):
    """The hold is no longer open: `code` is hold_captured, hold_released or hold_expired."""

    code = "hold_closed"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


class InsufficientBuzz(InsufficientFunds):
    code = "insufficient_funds"
