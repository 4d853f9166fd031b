"""Typed errors with stable machine-readable codes.

Every refusal the service makes is one of these; the ingress maps them to HTTP once
(`http_status`), the CLI maps them to exit codes. Codes never change once published.
"""

from __future__ import annotations

from typing import Any


class GenserveError(Exception):
    """Base of every expected refusal. `code` is stable; `message` is for people."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidRequest(GenserveError):
    code = "invalid_request"
    http_status = 422


class Unauthenticated(GenserveError):
    code = "unauthenticated"
    http_status = 401


class Forbidden(GenserveError):
    code = "forbidden"
    http_status = 403


class NotFound(GenserveError):
    code = "not_found"
    http_status = 404


class Conflict(GenserveError):
    code = "conflict"
    http_status = 409


class InsufficientFunds(GenserveError):
    code = "insufficient_funds"
    http_status = 402


class SafetyBlocked(GenserveError):
    """A safety rule refused the request; `details` carries the rule ids."""

    code = "safety_blocked"
    http_status = 403


class QueueFull(GenserveError):
    code = "queue_full"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int = 5, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class Unavailable(GenserveError):
    code = "unavailable"
    http_status = 503


class ConfigError(GenserveError):
    code = "config_error"
    http_status = 500


class StorageError(GenserveError):
    code = "storage_error"
    http_status = 502


class InvalidKey(InvalidRequest):
    code = "invalid_object_key"


class InputImageRefused(InvalidRequest):
    """An input image (img2img, inpaint) or mask that cannot be used. Codes: `input_image_invalid`
    (not base64, not an image, truncated), `input_image_format` (not PNG, JPEG or WebP),
    `input_image_animated`, `input_image_dimensions` (a side out of bounds), `input_image_bomb` (more
    pixels than the decompression-bomb limit), `input_image_not_found` (a reference to no delivered image
    of the caller), `mask_size_mismatch`, `mask_empty`, `input_image_missing`, `input_image_unexpected`,
    `input_image_with_hires`."""

    code = "input_image_invalid"


class InputImageTooLarge(InputImageRefused):
    """An input image's encoded bytes are over the limit: refused before it is decoded."""

    code = "input_image_too_large"
    http_status = 413
