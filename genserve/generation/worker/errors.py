"""The worker's refusals, each with a stable code (the ingress maps them like every `GenserveError`).

Resource refusals are the registry's (`genserve.resources.registry`): the worker asks the same
`usable` question the ingress asked, so a resource is refused with one code whoever refuses it.
"""

from __future__ import annotations

from genserve.core.errors import InvalidRequest, Unavailable
from genserve.resources.registry import ResourceRefused


class CheckpointConfigMissing(ResourceRefused, InvalidRequest):
    code = "checkpoint_config_missing"


class ReservedToken(InvalidRequest):
    """A user embedding whose token imitates a mandatory safety token."""

    code = "reserved_token"


class CheckpointMismatch(InvalidRequest):
    code = "checkpoint_mismatch"


class TooManySteps(InvalidRequest):
    code = "too_many_steps"


class TooManyImages(InvalidRequest):
    code = "too_many_images"


class ImageTooLarge(InvalidRequest):
    code = "image_too_large"


class CheckpointEvicted(Unavailable):
    code = "checkpoint_evicted"


class WorkerWedged(Unavailable):
    code = "worker_wedged"


class ScannerUnavailable(Unavailable):
    code = "scanner_unavailable"


class ConfigNotHot(InvalidRequest):
    code = "config_not_hot"
