"""The object store's contract: the key space, metadata and errors both backends share."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import mimetypes
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from genserve.core.errors import InvalidKey, InvalidRequest, NotFound

if TYPE_CHECKING:
    pass


MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048  # S3's limit on user metadata (names + values)
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4's limit
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_COPY_CHUNK = 1 << 20
_RESERVED_DIR = ".objstore"


class ObjectNotFound(NotFound):
    code = "object_not_found"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str | None = None


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise `InvalidKey`.

    One rule set for every backend, strict enough that a key maps to exactly one file under the
    local root: non-empty, at most 1024 UTF-8 bytes, relative, '/'-separated with no empty, '.' or
    '..' segments, no backslashes and no control characters.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("object key must be a non-empty string", details={"key": key})
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key is longer than {MAX_KEY_BYTES} bytes", details={"key": key[:64] + "..."})
    if key.startswith("/"):
        raise InvalidKey("object key must be relative (no leading '/')", details={"key": key})
    if "\\" in key:
        raise InvalidKey("object key must not contain backslashes", details={"key": key})
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKey("object key must not contain control characters", details={"key": key})
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey("object key has an empty, '.' or '..' segment", details={"key": key})
    return key


def _validate_prefix(prefix: str) -> str:
    """A listing prefix is a key, possibly ending in '/', or empty."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _normalize_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata as S3 stores it: lower-case ASCII names, printable ASCII values, <= 2 KiB."""
    out: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
            raise InvalidRequest(f"invalid metadata name {name!r}", code="invalid_object_metadata")
        if not isinstance(value, str) or not all(32 <= ord(c) < 127 for c in value):
            raise InvalidRequest(f"metadata {name!r} must be printable ASCII text", code="invalid_object_metadata")
        out[name.lower()] = value
    if sum(len(k) + len(v) for k, v in out.items()) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata is larger than {MAX_METADATA_BYTES} bytes", code="invalid_object_metadata")
    return out


def _content_type(key: str, content_type: str | None) -> str:
    return content_type or mimetypes.guess_type(key)[0] or DEFAULT_CONTENT_TYPE


def _check_expiry(expires_s: int) -> int:
    if not isinstance(expires_s, int) or not 1 <= expires_s <= MAX_PRESIGN_EXPIRY_S:
        raise InvalidRequest(f"expires_s must be 1..{MAX_PRESIGN_EXPIRY_S}", code="invalid_presign_expiry")
    return expires_s


def sha256_file(path: str | Path, chunk_bytes: int = _COPY_CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks (LoRAs and checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_destination(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest`, on any error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


class ObjectStore(abc.ABC):
    """Where objects live. Keys are checked with `validate_key` by every method."""

    @abc.abstractmethod
    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store `data` under `key`, replacing any previous object atomically."""

    @abc.abstractmethod
    def put_file(
        self, key: str, path: str | Path, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store the file at `path` under `key` (streamed; multipart on S3 above the threshold)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def download_file(self, key: str, dest_path: str | Path) -> Path:
        """Copy the object to `dest_path`: written to a temp file beside it, then renamed into place."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, buffered binary reader; close it (or use it as a context manager)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (as on S3)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix, as on S3), in lexicographic order."""

    @abc.abstractmethod
    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        """A URL that reads the object without credentials. Existence is not checked (as on S3)."""

    @abc.abstractmethod
    def ensure_bucket(self) -> None:
        """Create the backing bucket or folder if it does not exist yet."""
