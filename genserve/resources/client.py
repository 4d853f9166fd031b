"""Client calls of the resource routes (`genserve resources ...`, the site's back end)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from genserve.client import GenserveClient, ServiceClient, http_error
from genserve.core.errors import Unavailable
from genserve.resources.cache import ResourceIntegrityError

_EXACT_NAME = re.compile(r"filename\*=UTF-8''([^;]+)")
_PLAIN_NAME = re.compile(r'filename="([^"]+)"')


def _attachment_name(header: str) -> str | None:
    """The file name a Content-Disposition header gives (the exact form first), reduced to a base name."""
    found = _EXACT_NAME.search(header) or _PLAIN_NAME.search(header)
    name = Path(unquote(found.group(1))).name if found else ""
    return name if name not in ("", ".", "..") else None


def _form(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in fields.items():
        if value is None or value is False:
            continue
        out[name] = ",".join(value) if isinstance(value, (list, tuple)) else str(value).lower() \
            if isinstance(value, bool) else str(value)
    return out


class ResourcesClient(GenserveClient):
    def register(self, path: str | Path | None = None, *, key: str | None = None, timeout_s: float = 600.0,
                 **fields: Any) -> dict[str, Any]:
        """Upload `path` (or register the staged object `key`); `fields` are the form's (kind, family,
        name, visibility, minor, poi, nsfw, sfw_only, air, trigger_words, token)."""
        data = _form({**fields, "key": key})
        if path is None:
            return self._call("POST", "/v1/resources", data=data, timeout=timeout_s).json()
        path = Path(path)
        with path.open("rb") as f:
            return self._call("POST", "/v1/resources", data=data, timeout=timeout_s,
                              files={"file": (path.name, f, "application/octet-stream")}).json()

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/v1/resources", params=params).json()

    def get(self, resource_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/resources/{resource_id}").json()

    def update(self, resource_id: str, **body: Any) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/resources/{resource_id}", json=body).json()

    def download(self, resource_id: str, out: str | Path) -> dict[str, Any]:
        """Save the resource's file to `out` (a file, or a folder to keep the server's file name in),
        checked against the SHA-256 the server sends as its ETag; a mismatch keeps nothing."""
        out = Path(out)
        try:
            with self._http.stream("GET", f"/v1/resources/{resource_id}/download") as response:
                if response.status_code >= 400:
                    response.read()
                    raise http_error(response)
                disposition = response.headers.get("content-disposition", "")
                name = _attachment_name(disposition) or f"{resource_id}.safetensors"
                dest = out / name if out.is_dir() else out
                expected = response.headers.get("etag", "").strip('"')
                digest, size, tmp = hashlib.sha256(), 0, dest.with_name(dest.name + ".part")
                try:
                    with tmp.open("wb") as f:
                        for chunk in response.iter_bytes():
                            digest.update(chunk)
                            size += len(chunk)
                            f.write(chunk)
                    if expected and digest.hexdigest() != expected:
                        raise ResourceIntegrityError(
                            f"{resource_id} hashes {digest.hexdigest()}, the server sent {expected}",
                            details={"id": resource_id})
                    tmp.replace(dest)
                finally:
                    tmp.unlink(missing_ok=True)
        except httpx.TransportError as exc:  # also a stream the server cut short (its own hash check)
            raise Unavailable(f"download of {resource_id} from {self.base_url} failed: {exc}",
                              code="download_failed") from exc
        return {"id": resource_id, "path": str(dest), "bytes": size, "sha256": digest.hexdigest()}

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/v1/models").json()

    def samplers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/samplers").json()


class ResourcesAdminClient(ServiceClient):
    """Moderator calls, with the admin token."""

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/v1/admin/resources", params=params).json()

    def disable(self, resource_id: str, moderator: str, reason: str = "") -> dict[str, Any]:
        return self._call("POST", f"/v1/admin/resources/{resource_id}/disable",
                          json={"moderator": moderator, "reason": reason}).json()

    def enable(self, resource_id: str, moderator: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/admin/resources/{resource_id}/enable",
                          json={"moderator": moderator}).json()

    def flags(self, resource_id: str, moderator: str, note: str = "", **flags: bool) -> dict[str, Any]:
        return self._call("POST", f"/v1/admin/resources/{resource_id}/flags",
                          json={"moderator": moderator, "flags": flags, "note": note}).json()
