"""Object store for datasets, LoRAs and delivered images: a local folder by default, S3 at scale.

Both stores speak the same key space and the same semantics, so the service never branches on
the backend: keys are checked by one function (`validate_key`), a missing object is always
`ObjectNotFound` (code `object_not_found`), a backend failure is always `StorageError`, and a
download never leaves a half-written file at its destination.

The local store keeps each object as a plain file `<root>/<key>` (so an operator can look at it)
and its content type, user metadata and ETag in a JSON sidecar under `<root>/.objstore/meta/`;
temporary files live in `<root>/.objstore/tmp/` (same filesystem, so renames are atomic). The
top-level name `.objstore` is therefore reserved in the local store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from genserve.core.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, sha256_file, validate_key
from genserve.core.storage.local import LocalObjectStore
from genserve.core.storage.s3 import S3ObjectStore

if TYPE_CHECKING:
    from genserve.core.config import Settings


def object_store_from_settings(settings: Settings) -> ObjectStore:
    """The store the settings name (`storage.backend`); the caller runs `ensure_bucket()` at start-up."""
    if settings.storage.backend == "s3":
        return S3ObjectStore.from_config(settings.storage)
    return LocalObjectStore(settings.objects_dir)


__all__ = [
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "LocalObjectStore",
    "S3ObjectStore",
    "object_store_from_settings",
    "sha256_file",
    "validate_key",
]
