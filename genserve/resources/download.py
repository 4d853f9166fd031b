"""Serving a resource's file: its name, its headers, and its bytes checked against the registered hash.

The bytes stream from the object store as they are read. The SHA-256 the registry recorded is checked
while streaming, one chunk behind: the last chunk is sent only once the whole file hashed right, so a
corrupted object ends the response short of its `Content-Length` and no client keeps it as whole.
(A stored object whose size already disagrees is refused before anything is sent.)
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

from genserve.core.errors import Conflict
from genserve.core.storage import ObjectStore
from genserve.resources.cache import ResourceIntegrityError
from genserve.resources.models import Resource

logger = logging.getLogger(__name__)

# safetensors has no registered media type; it is served as the binary file it is (as model hubs do)
SAFETENSORS_TYPE = "application/octet-stream"
_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StoredFileCorrupt(Exception):
    """The stored bytes do not hash to the registered SHA-256, found mid-stream. Deliberately no
    `GenserveError`: the response has started, so no error body can follow; raised past the error
    handlers, it makes the server cut the connection short of the promised length."""


class NotDownloadable(Conflict):
    """A diffusers folder (a deployment's checkpoint) is no single file to hand out."""

    code = "resource_not_downloadable"


@dataclass(frozen=True)
class ResourceDownload:
    resource_id: str
    filename: str
    size: int
    sha256: str
    chunks: Iterator[bytes]
    content_type: str = SAFETENSORS_TYPE

    def headers(self) -> dict[str, str]:
        """Length, name, and the content hash as a strong ETag (the object is content-addressed).
        `private`: who may download depends on the caller (early access), so no shared cache keeps it."""
        return {"Content-Length": str(self.size), "Content-Disposition": content_disposition(self.filename),
                "ETag": f'"{self.sha256}"', "Cache-Control": "private, no-store"}


def download_name(row: Resource) -> str:
    """The name the owner uploaded it under, else the resource's name, as `<stem>.safetensors`."""
    uploaded = str((row.meta or {}).get("filename") or "")
    stem = PurePosixPath(uploaded.replace("\\", "/")).name if uploaded else row.name or row.id
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    stem = "".join(c for c in stem if c.isprintable() and c not in '"/\\').strip(" .") or row.id
    return f"{stem[:180]}.safetensors"


def content_disposition(filename: str) -> str:
    """An attachment header with an ASCII fallback name and the exact one in RFC 5987 form."""
    fallback = _UNSAFE.sub("_", filename).strip("_") or "resource.safetensors"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def verified_chunks(open_stream: Callable[[], BinaryIO], sha256: str, size: int | None,
                    what: str) -> Iterator[bytes]:
    """The stream's chunks, each yielded after the next one is read: the last is held back until the
    whole file's hash (and size, when known) matched, else `StoredFileCorrupt` ends the stream."""
    digest, seen = hashlib.sha256(), 0
    with open_stream() as stream:
        held = stream.read(_CHUNK)
        while held:
            following = stream.read(_CHUNK)
            digest.update(held)
            seen += len(held)
            if not following and (digest.hexdigest() != sha256 or (size is not None and seen != size)):
                logger.error("download of %s: %d bytes hashing %s, registered %s (%s bytes)", what, seen,
                             digest.hexdigest(), sha256, size)
                raise StoredFileCorrupt(f"the stored file of {what} does not match its registered hash")
            yield held
            held = following


def open_download(store: ObjectStore, row: Resource) -> ResourceDownload:
    """The file of a single-file resource, ready to stream (the caller checked who may have it)."""
    if row.format != "safetensors":
        raise NotDownloadable(f"{row.id} is a {row.format} folder, not a file to download",
                              details={"id": row.id})
    info = store.head(row.storage_key)
    if row.size_bytes and info.size != row.size_bytes:
        raise ResourceIntegrityError(f"the stored file of {row.id} has {info.size} bytes, registered "
                                     f"{row.size_bytes}", details={"id": row.id})
    key = row.storage_key
    chunks = verified_chunks(lambda: store.open_read(key), row.sha256, info.size, row.id)
    return ResourceDownload(resource_id=row.id, filename=download_name(row), size=info.size,
                            sha256=row.sha256, chunks=chunks)
