"""File hashes for safetensors resources, and the one safe way safety reads their tensors.

`sha256` covers the whole file (changes with any edit). `tensor_sha256` covers only the tensor
payload after the 8-byte length and the JSON header (kohya's `sshs_model_hash`, Civitai's AutoV3 before
truncation), so editing `__metadata__` does not change it.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from safety.errors import NotSafetensors

Source = str | Path | bytes | bytearray | memoryview

# A header larger than this is not a LoRA's (safetensors itself caps headers at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    tensor_sha256: str

    @property
    def autov3(self) -> str:
        """The short form Civitai shows (first 12 hex digits of the tensor hash)."""
        return self.tensor_sha256[:12].upper()

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "tensor_sha256": self.tensor_sha256, "autov3": self.autov3}


def _open(src: Source) -> BinaryIO:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    try:
        return open(src, "rb")  # noqa: SIM115 - closed by the caller's `with`
    except OSError as exc:
        raise NotSafetensors(f"cannot read {src}: {exc.strerror or exc}") from exc


def _source_name(src: Source) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _read_header(f: BinaryIO, name: str) -> tuple[bytes, bytes, dict]:
    """(length prefix, raw header, parsed header); raises NotSafetensors on anything else."""
    prefix = f.read(8)
    if len(prefix) != 8:
        raise NotSafetensors(f"{name}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", prefix)
    if n < 2 or n > MAX_HEADER_BYTES:
        raise NotSafetensors(f"{name}: not a safetensors file (header length {n})")
    raw = f.read(n)
    if len(raw) != n or not raw.lstrip().startswith(b"{"):
        raise NotSafetensors(f"{name}: not a safetensors file (bad header)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensors(f"{name}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise NotSafetensors(f"{name}: not a safetensors file (header is not an object)")
    return prefix, raw, header


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def file_hashes(src: Source) -> FileHashes:
    """Whole-file and tensor-payload SHA-256 of a safetensors file (path or bytes), streamed."""
    name = _source_name(src)
    with _open(src) as f:
        prefix, raw, _ = _read_header(f, name)
        whole = hashlib.sha256(prefix + raw)
        payload = hashlib.sha256()
        for chunk in _chunks(f):
            whole.update(chunk)
            payload.update(chunk)
    return FileHashes(sha256=whole.hexdigest(), tensor_sha256=payload.hexdigest())


def load_tensors(src: Source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, on CPU. Never unpickles anything."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    name = _source_name(src)
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            with io.BytesIO(data) as f:
                _, _, header = _read_header(f, name)
            tensors = load(data)
            meta = header.get("__metadata__") or {}
        else:
            with _open(src) as f:
                _read_header(f, name)
            with safe_open(str(src), framework="pt", device="cpu") as sf:
                tensors = {k: sf.get_tensor(k) for k in sf.keys()}
                meta = sf.metadata() or {}
    except SafetensorError as exc:
        raise NotSafetensors(f"{name}: not a valid safetensors file ({exc})") from exc
    return tensors, {str(k): str(v) for k, v in meta.items()}


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A safetensors file read lazily, one tensor at a time (a multi-GB checkpoint never sits in memory
    whole): a read-only mapping of tensor name -> CPU tensor, with `shapes` and `metadata` from the header.
    Use as a context manager. Never unpickles anything."""

    def __init__(self, src: Source):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load

        self._name = _source_name(src)
        try:
            if isinstance(src, (bytes, bytearray, memoryview)):
                data = bytes(src)
                with io.BytesIO(data) as f:
                    _, _, header = _read_header(f, self._name)
                self._handle, self._tensors = None, load(data)
            else:
                with _open(src) as f:
                    _, _, header = _read_header(f, self._name)
                self._handle, self._tensors = safe_open(str(src), framework="pt", device="cpu"), None
        except SafetensorError as exc:
            raise NotSafetensors(f"{self._name}: not a valid safetensors file ({exc})") from exc
        self.metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
        self.shapes = {k: tuple(v.get("shape", ())) for k, v in header.items()
                       if k != "__metadata__" and isinstance(v, dict)}

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        if key not in self.shapes:
            raise KeyError(key)
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except SafetensorError as exc:
            raise NotSafetensors(f"{self._name}: cannot read tensor {key!r} ({exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle = self._tensors = None
