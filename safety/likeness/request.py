"""One request's files against the blocklist, with each file prepared (hashed, fingerprinted) once.

The ingress (at admission) and the worker (before it activates the adapters) ask the same question of
the same files: `RequestCheck.check` takes the request's LoRAs with their strengths and returns the
blocklist's strongest match over every file alone and their combined update. Preparing a file reads
all of its tensors, so prepared files are kept by content hash (LRU): a LoRA used by many requests is
read once per process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from safety.likeness.blocklist import LikenessBlocklist, LikenessMatch, PreparedResource


@dataclass(frozen=True)
class RequestFile:
    """A file one request uses: its content hash, how to reach it on disk, its family and strength."""

    sha256: str
    open: Callable[[], AbstractContextManager[Path]]
    family: str | None
    strength: float = 1.0


class RequestCheck:
    def __init__(self, blocklist: LikenessBlocklist, max_files: int = 4096):
        self.blocklist = blocklist
        self.max_files = max_files
        self._prepared: OrderedDict[str, PreparedResource] = OrderedDict()
        self._lock = threading.Lock()

    def prepared(self, file: RequestFile) -> PreparedResource:
        with self._lock:
            hit = self._prepared.get(file.sha256)
            if hit is not None:
                self._prepared.move_to_end(file.sha256)
                return hit
        with file.open() as path:
            prepared = self.blocklist.prepare(path, family=file.family)
        with self._lock:
            self._prepared[file.sha256] = prepared
            while len(self._prepared) > self.max_files:
                self._prepared.popitem(last=False)
        return prepared

    def check(self, files: Sequence[RequestFile]) -> LikenessMatch | None:
        """The strongest match of the files alone and together (`match.parts`: positions in `files`)."""
        if not files:
            return None
        return self.blocklist.check_combined([(self.prepared(f), f.strength) for f in files])
