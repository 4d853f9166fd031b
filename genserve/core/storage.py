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

import abc
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from genserve.core.errors import InvalidKey, InvalidRequest, NotFound, StorageError

if TYPE_CHECKING:
    from genserve.core.config import Settings, StorageConfig

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


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`; the embedded default.

    Writes go to a temp file that is fsync'd and renamed over the target, so a reader sees the
    old object or the new one, never a partial one. Every key is resolved and checked to stay
    inside `root`, so a symlink planted in the tree cannot redirect a read or write elsewhere.
    `presigned_get_url` returns a `file://` URI: it grants nothing beyond the local filesystem and
    does not expire; it is meant for tools running on the same machine. Unlike S3, a key cannot
    name both an object and a folder of other objects ('a' and 'a/b'): that write is a StorageError.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._meta_root = self.root / _RESERVED_DIR / "meta"
        self._tmp_root = self.root / _RESERVED_DIR / "tmp"

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def ensure_bucket(self) -> None:
        for d in (self.root, self._meta_root, self._tmp_root):
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == _RESERVED_DIR:
            raise InvalidKey(f"the top-level name {_RESERVED_DIR!r} is reserved by the local store", details={"key": key})
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidKey("object key resolves outside the store root", details={"key": key})
        return path

    def _meta_path(self, key: str) -> Path:
        return self._meta_root / f"{key}.json"

    @contextlib.contextmanager
    def _writing(self, key: str, content_type: str | None, metadata: Mapping[str, str] | None) -> Iterator[Any]:
        """Yield (file, digest) for the new object's bytes; commit data and sidecar on success."""
        path = self._path(key)
        meta = _normalize_metadata(metadata)
        ctype = _content_type(key, content_type)
        try:
            self.ensure_bucket()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix="put-", dir=self._tmp_root)
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as f:
                    yield f, digest
                    f.flush()
                    os.fsync(f.fileno())
                sidecar = {"content_type": ctype, "metadata": meta, "etag": digest.hexdigest()}
                meta_path = self._meta_path(key)
                meta_path.parent.mkdir(parents=True, exist_ok=True)
                with _atomic_destination(meta_path) as meta_tmp:
                    meta_tmp.write_text(json.dumps(sidecar))
                os.replace(tmp, path)
                _fsync_dir(path.parent)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not write object {key!r}: {exc}", details={"key": key}) from exc

    def put_bytes(self, key, data, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        with self._writing(key, content_type, metadata) as (f, digest):
            f.write(data)
            digest.update(data)
        return self.head(key)

    def put_file(self, key, path, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below, opened first so a missing file writes nothing
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}", details={"path": str(path)}) from exc
        with src, self._writing(key, content_type, metadata) as (f, digest):
            while block := src.read(_COPY_CHUNK):
                f.write(block)
                digest.update(block)
        return self.head(key)

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            if not path.is_file():
                raise ObjectNotFound(f"no object {key!r}", details={"key": key})
            return open(path, "rb")  # noqa: SIM115 - the caller owns the reader
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r}", details={"key": key}) from exc
        except OSError as exc:
            raise StorageError(f"could not read object {key!r}: {exc}", details={"key": key}) from exc

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def open_read(self, key: str) -> BinaryIO:
        return self._open(key)

    def download_file(self, key: str, dest_path: str | Path) -> Path:
        dest = Path(dest_path)
        with self._open(key) as src:
            try:
                with _atomic_destination(dest) as tmp, open(tmp, "wb") as out:
                    while block := src.read(_COPY_CHUNK):
                        out.write(block)
            except OSError as exc:
                raise StorageError(f"could not download {key!r} to {dest}: {exc}", details={"key": key}) from exc
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r}", details={"key": key}) from exc
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}", details={"key": key})
        try:
            sidecar = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            sidecar = {}  # a file placed by hand: no recorded metadata
        return ObjectInfo(
            key=key,
            size=size,
            content_type=sidecar.get("content_type") or _content_type(key, None),
            metadata=dict(sidecar.get("metadata") or {}),
            etag=sidecar.get("etag"),
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if path.is_file():
                path.unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete object {key!r}: {exc}", details={"key": key}) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names; the rest of the prefix filters names.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.resolve().is_relative_to(self.root):
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != _RESERVED_DIR]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys, key=lambda k: k.encode("utf-8")))

    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        if expires_s is not None:
            _check_expiry(expires_s)
        return self._path(key).as_uri()


class _StreamingBodyReader(io.RawIOBase):
    """Adapts botocore's StreamingBody to a raw stream, so callers get a normal buffered reader."""

    def __init__(self, body: Any, key: str):
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except Exception as exc:  # noqa: BLE001 - any transport failure mid-stream
            raise StorageError(f"reading object {self._key!r} failed: {exc}", details={"key": self._key}) from exc
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket (or any S3-protocol store) through boto3.

    The client is created lazily and dropped when pickled, so a store can be handed to a Ray
    actor; each process then opens its own connection pool.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "path",
        multipart_threshold_bytes: int = 8 * 1024 * 1024,
        multipart_chunk_bytes: int = 8 * 1024 * 1024,
        presign_expiry_s: int = 3600,
    ):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self.addressing_style = addressing_style
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_chunk_bytes = multipart_chunk_bytes
        self.presign_expiry_s = presign_expiry_s
        self._client: Any = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> S3ObjectStore:
        return cls(
            cfg.s3_bucket,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            access_key_id=cfg.s3_access_key_id.get_secret_value() if cfg.s3_access_key_id else None,
            secret_access_key=cfg.s3_secret_access_key.get_secret_value() if cfg.s3_secret_access_key else None,
            addressing_style=cfg.s3_addressing_style,
            multipart_threshold_bytes=cfg.multipart_threshold_bytes,
            multipart_chunk_bytes=cfg.multipart_chunk_bytes,
            presign_expiry_s=cfg.presign_expiry_s,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret_access_key,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": self.addressing_style},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold_bytes, multipart_chunksize=self.multipart_chunk_bytes
        )

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Map boto3 failures to ObjectNotFound / StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        details = {"bucket": self.bucket, **({"key": key} if key else {})}
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"no object {key!r}", details=details) from exc
            raise StorageError(f"S3 {action} failed: {code} {err.get('Message', '')}".strip(), details=details) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageError(f"S3 {action} failed: {exc}", details=details) from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors("head_bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with self._errors("create_bucket"):
            try:
                self.client.create_bucket(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key, data, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        validate_key(key)
        meta = _normalize_metadata(metadata)
        with self._errors("put_object", key):
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=bytes(data), ContentType=_content_type(key, content_type), Metadata=meta
            )
        return self.head(key)

    def put_file(self, key, path, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        validate_key(key)
        meta = _normalize_metadata(metadata)
        if not Path(path).is_file():
            raise StorageError(f"cannot read {path}: not a file", details={"path": str(path)})
        with self._errors("upload", key):
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": _content_type(key, content_type), "Metadata": meta},
                Config=self._transfer_config(),
            )
        return self.head(key)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key: str) -> BinaryIO:
        validate_key(key)
        with self._errors("get_object", key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return io.BufferedReader(_StreamingBodyReader(body, key), buffer_size=_COPY_CHUNK)  # type: ignore[return-value]

    def download_file(self, key: str, dest_path: str | Path) -> Path:
        validate_key(key)
        dest = Path(dest_path)
        with self._errors("download", key), _atomic_destination(dest) as tmp:
            self.client.download_file(self.bucket, key, str(tmp), Config=self._transfer_config())
        return dest

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def head(self, key: str) -> ObjectInfo:
        validate_key(key)
        with self._errors("head_object", key):
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            content_type=resp.get("ContentType") or DEFAULT_CONTENT_TYPE,
            metadata=dict(resp.get("Metadata") or {}),
            etag=(resp.get("ETag") or "").strip('"') or None,
        )

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._errors("delete_object", key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def list(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)  # here, not in the generator, so a bad prefix fails at the call
        return self._iter_keys(prefix)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list_objects_v2"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"]

    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        validate_key(key)
        expiry = _check_expiry(self.presign_expiry_s if expires_s is None else expires_s)
        with self._errors("presign", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expiry
            )


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
