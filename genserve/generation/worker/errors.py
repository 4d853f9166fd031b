"""The worker's refusals, each with a stable code (the ingress maps them like every `GenserveError`).

Resource refusals (not found, unusable, reserved token, missing checkpoint config) are the registry's
(`genserve.resources.registry`): the worker asks the same `usable` question the ingress asked, so a
resource is refused with one code whoever refuses it.
"""

from __future__ import annotations

from genserve.core.errors import InvalidRequest, Unavailable


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


class InputImageChanged(Unavailable):
    """An input image in the store is not the one the ingress judged (its SHA-256 differs): never used."""

    code = "input_image_changed"
