"""The local object store: each object a plain file `<root>/<key>`, its metadata in a JSON sidecar."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from genserve.core.errors import InvalidKey, StorageError

if TYPE_CHECKING:
    pass

from genserve.core.storage.base import (  # the contract both backends share
    _COPY_CHUNK,
    _RESERVED_DIR,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    _atomic_destination,
    _check_expiry,
    _content_type,
    _fsync_dir,
    _normalize_metadata,
    _validate_prefix,
    validate_key,
)


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
