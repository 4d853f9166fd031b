"""Content-addressed publishing of model files into the object store, and a verified local cache of them.

A file is published under `<prefix>/<sha256>/<filename>`; a folder (a diffusers checkpoint) under
`<prefix>/<sha256>/` with a `manifest.json` listing every file's SHA-256 and size, the folder's
sha256 being that of the manifest's bytes. So one hash pins a whole checkpoint, and a worker can
verify every byte it downloads against the hash the registry recorded.

`ResourceCache` keeps downloaded copies under `root/<sha256>/`: a download goes to a temporary
folder, is verified, then renamed into place, so any `root/<sha256>` folder is complete and verified
and the index is rebuilt from disk after a restart. Entries are evicted least-recently-used by
bytes, never while pinned (in use).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from genserve.core.errors import GenserveError, InvalidRequest
from genserve.core.storage import ObjectStore, sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"

ResourceFormat = Literal["file", "folder"]


class ResourceIntegrityError(GenserveError):
    """Downloaded bytes do not match the hash the registry recorded; nothing was kept."""

    code = "resource_integrity_failed"
    http_status = 502


@dataclass(frozen=True)
class PublishedObject:
    storage_key: str
    sha256: str
    size: int


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidRequest(f"not a lower-case hex SHA-256: {sha256!r}", code="invalid_sha256")
    return sha256


def _manifest_files(folder: Path) -> dict[str, dict[str, int | str]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def manifest_bytes(files: dict[str, dict[str, int | str]]) -> bytes:
    """Canonical JSON of a folder manifest: the bytes whose SHA-256 names the folder."""
    body = {"version": MANIFEST_VERSION, "files": files}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def publish_file(store: ObjectStore, path: str | Path, prefix: str) -> PublishedObject:
    """Upload one file content-addressed; a file already published is not uploaded again."""
    path = Path(path)
    sha256 = sha256_file(path)
    key = f"{prefix.rstrip('/')}/{sha256}/{path.name}"
    if not store.exists(key):
        store.put_file(key, path, metadata={"sha256": sha256})
    return PublishedObject(storage_key=key, sha256=sha256, size=path.stat().st_size)


def publish_folder(store: ObjectStore, folder: str | Path, prefix: str) -> PublishedObject:
    """Upload every file of `folder` and its manifest (last, so a present manifest means complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequest(f"not a folder: {folder}", code="not_a_folder")
    if (folder / MANIFEST_NAME).exists():
        raise InvalidRequest(f"{folder} already holds a {MANIFEST_NAME}; it is reserved", code="manifest_name_taken")
    files = _manifest_files(folder)
    if not files:
        raise InvalidRequest(f"folder {folder} is empty", code="empty_folder")
    manifest = manifest_bytes(files)
    sha256 = hashlib.sha256(manifest).hexdigest()
    key = f"{prefix.rstrip('/')}/{sha256}"
    manifest_key = f"{key}/{MANIFEST_NAME}"
    if not store.exists(manifest_key):
        for rel, info in files.items():
            store.put_file(f"{key}/{rel}", folder / rel, metadata={"sha256": str(info["sha256"])})
        store.put_bytes(manifest_key, manifest, content_type="application/json")
    return PublishedObject(storage_key=key, sha256=sha256, size=sum(int(i["size"]) for i in files.values()))


def _safe_relative(rel: str) -> PurePosixPath:
    """A manifest path that stays inside the entry folder (the manifest comes from the network)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in rel:
        raise ResourceIntegrityError(f"manifest names an unsafe path {rel!r}")
    return p


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class _Entry:
    path: Path  # the file, or the folder, handed to callers
    size: int
    last_used: float
    pins: int = 0


class ResourceCache:
    """Verified local copies of published resources, keyed by sha256, LRU-evicted by bytes.

    Thread-safe. Concurrent fetches of the same resource download it once. A pinned entry is never
    evicted; use `use()` (a context manager) or `pin`/`unpin` around anything that reads the files.
    """

    def __init__(self, store: ObjectStore, root: str | Path, max_bytes: int):
        self.store = store
        self.root = Path(root).resolve()
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._downloads: dict[str, threading.Lock] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    # ---- index ----------------------------------------------------------------------------------
    def _rebuild_index(self) -> None:
        """Index what a previous process left; half-finished downloads and deletions are removed."""
        for child in self.root.iterdir():
            if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_dir() and _SHA256.match(child.name):
                self._entries[child.name] = _Entry(
                    path=self._entry_path(child), size=_tree_size(child), last_used=child.stat().st_mtime
                )
        self._evict_locked()

    @staticmethod
    def _entry_path(folder: Path) -> Path:
        """A file entry is `<sha>/<filename>` (the one file inside); a folder entry is `<sha>/files/`."""
        files = folder / "files"
        if files.is_dir():
            return files
        children = [p for p in folder.iterdir() if p.is_file()]
        return children[0] if len(children) == 1 else folder

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._entries

    def entries(self) -> dict[str, int]:
        """sha256 -> bytes of every cached entry."""
        with self._lock:
            return {sha: e.size for sha, e in self._entries.items()}

    # ---- pins -----------------------------------------------------------------------------------
    def pin(self, sha256: str) -> None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                raise KeyError(sha256)
            entry.pins += 1

    def unpin(self, sha256: str) -> None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            self._evict_locked()

    @contextlib.contextmanager
    def use(self, storage_key: str, sha256: str, fmt: ResourceFormat) -> Iterator[Path]:
        """Fetch and pin for the duration of the block."""
        path = self.fetch(storage_key, sha256, fmt, pin=True)
        try:
            yield path
        finally:
            self.unpin(sha256)

    # ---- fetch ----------------------------------------------------------------------------------
    def fetch(self, storage_key: str, sha256: str, fmt: ResourceFormat, *, pin: bool = False) -> Path:
        """The local path of a verified copy, downloading it first when absent."""
        _check_sha(sha256)
        if fmt not in ("file", "folder"):
            raise InvalidRequest(f"unknown resource format {fmt!r}", code="invalid_resource_format")
        if (path := self._hit(sha256, pin)) is not None:
            return path
        with self._lock:
            download_lock = self._downloads.setdefault(sha256, threading.Lock())
        with download_lock:
            if (path := self._hit(sha256, pin)) is not None:
                return path
            started = time.perf_counter()
            try:
                folder = self._download(storage_key, sha256, fmt)
            except BaseException:
                with self._lock:
                    self._downloads.pop(sha256, None)
                raise
            with self._lock:
                entry = _Entry(path=self._entry_path(folder), size=_tree_size(folder), last_used=time.time(),
                               pins=1 if pin else 0)
                self._entries[sha256] = entry
                self._downloads.pop(sha256, None)
                self._evict_locked()
            logger.info("fetched %s (%d bytes) in %.0f ms", storage_key, entry.size,
                        (time.perf_counter() - started) * 1000)
            return entry.path

    def _hit(self, sha256: str, pin: bool) -> Path | None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                return None
            entry.last_used = time.time()
            if pin:
                entry.pins += 1
        with contextlib.suppress(OSError):  # the mtime carries recency across restarts
            os.utime(self.root / sha256)
        return entry.path

    def _download(self, storage_key: str, sha256: str, fmt: ResourceFormat) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            if fmt == "file":
                target = tmp / PurePosixPath(storage_key).name
                self.store.download_file(storage_key, target)
                got = sha256_file(target)
                if got != sha256:
                    raise ResourceIntegrityError(
                        f"{storage_key}: downloaded sha256 {got} does not match {sha256}",
                        details={"storage_key": storage_key, "expected": sha256, "got": got},
                    )
            else:
                self._download_folder(storage_key, sha256, tmp / "files")
            final = self.root / sha256
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # another process sharing the root finished it first: keep theirs
                    raise
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _download_folder(self, storage_key: str, sha256: str, dest: Path) -> None:
        raw = self.store.get_bytes(f"{storage_key.rstrip('/')}/{MANIFEST_NAME}")
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise ResourceIntegrityError(
                f"{storage_key}: manifest sha256 {got} does not match {sha256}",
                details={"storage_key": storage_key, "expected": sha256, "got": got},
            )
        try:
            files = json.loads(raw)["files"]
            items = [(str(rel), str(info["sha256"]), int(info["size"])) for rel, info in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ResourceIntegrityError(f"{storage_key}: unreadable manifest: {exc}") from exc
        for rel, file_sha, size in items:
            target = dest.joinpath(*_safe_relative(rel).parts)
            self.store.download_file(f"{storage_key.rstrip('/')}/{rel}", target)
            got = sha256_file(target)
            if got != file_sha or target.stat().st_size != size:
                raise ResourceIntegrityError(
                    f"{storage_key}/{rel}: downloaded sha256 {got} does not match the manifest's {file_sha}",
                    details={"storage_key": f"{storage_key}/{rel}", "expected": file_sha, "got": got},
                )

    # ---- eviction -------------------------------------------------------------------------------
    def _evict_locked(self) -> None:
        total = sum(e.size for e in self._entries.values())
        for sha256, entry in sorted(self._entries.items(), key=lambda kv: kv[1].last_used):
            if total <= self.max_bytes:
                break
            if entry.pins:
                continue
            del self._entries[sha256]
            total -= entry.size
            self._remove(self.root / sha256)
        if total > self.max_bytes:
            logger.warning("resource cache holds %d bytes over its %d limit: every entry left is in use",
                           total, self.max_bytes)

    def _remove(self, folder: Path) -> None:
        """Rename out of the index namespace first, so a crash mid-delete never leaves a partial entry."""
        trash = folder.with_name(f"{_TRASH_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.replace(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def evict(self, sha256: str) -> bool:
        """Drop one unpinned entry now; False when absent or in use."""
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None or entry.pins:
                return False
            del self._entries[sha256]
            self._remove(self.root / sha256)
            return True
