"""Client calls of the resource routes (`genserve resources ...`, the site's back end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genserve.client import GenserveClient, ServiceClient


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
