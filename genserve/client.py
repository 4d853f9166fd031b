"""A small HTTP client of the `/v1` API, as the site's back end (and `genserve generate`) calls it.

Refusals come back as the same typed errors the service raised (`code`, `message`, `details`, HTTP
status), so callers branch on codes, never on text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from genserve.core.config import Settings
from genserve.core.errors import GenserveError, QueueFull, SafetyBlocked, Unavailable


@dataclass(frozen=True)
class ServerEvent:
    id: int
    event: str
    data: dict[str, Any]


# codes whose refusal is a safety decision (the CLI exits 3 on them)
SAFETY_CODES = frozenset({"safety_blocked", "dataset_blocked", "sample_withheld"})


def http_error(response: httpx.Response) -> GenserveError:
    """The typed error a refusal stands for, with the server's stable code."""
    try:
        body = response.json()
        code, message, details = body["code"], body.get("message", ""), body.get("details") or {}
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500], {}
    if code in SAFETY_CODES:
        exc: GenserveError = SafetyBlocked(message, code=code, details=details)
    elif response.status_code == 429:
        exc = QueueFull(message, code=code, details=details,
                        retry_after_s=int(response.headers.get("retry-after", "5") or 5))
    else:
        exc = GenserveError(message, code=code, details=details)
    exc.http_status = response.status_code
    return exc


class ServiceClient:
    """HTTP transport shared by the API clients: bearer token, caller headers, typed errors."""

    def __init__(self, base_url: str, token: str, headers: dict[str, str] | None = None, *, timeout_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {token}", **(headers or {})})

    def close(self) -> None:
        self._http.close()

    def __enter__(self):  # noqa: ANN204 - the subclass instance
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach genserve at {self.base_url}: {exc} (is `genserve serve` running?)",
                              code="service_unreachable") from exc
        if response.status_code >= 400:
            raise http_error(response)
        return response


class GenserveClient(ServiceClient):
    def __init__(self, base_url: str, service_token: str, user_id: str, *, tier: str | None = None,
                 max_nsfw_level: str | None = None, timeout_s: float = 60.0):
        headers = {"X-User-Id": user_id}
        if tier:
            headers["X-User-Tier"] = tier
        if max_nsfw_level:
            headers["X-Max-Nsfw-Level"] = max_nsfw_level
        super().__init__(base_url, service_token, headers, timeout_s=timeout_s)
        self.user_id = user_id

    @classmethod
    def from_settings(cls, settings: Settings, user_id: str | None = None, base_url: str | None = None,
                      **kw: Any) -> GenserveClient:
        """The local service as `genserve serve` runs it, with the token from the settings."""
        url = base_url or f"http://{settings.server.host}:{settings.server.port}"
        return cls(url, settings.auth.service_token.get_secret_value(), user_id or settings.generation.demo_user, **kw)

    # -- API ------------------------------------------------------------------------------------

    def generate(self, body: dict[str, Any], *, wait: bool = False, timeout_s: float = 60.0) -> dict[str, Any]:
        params = {"wait": "true", "timeout": str(timeout_s)} if wait else None
        return self._call("POST", "/v1/generations", json=body, params=params,
                          timeout=timeout_s + 30 if wait else httpx.USE_CLIENT_DEFAULT).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/generations/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/generations/{job_id}/cancel").json()

    def image(self, job_id: str, index: int) -> bytes:
        return self._call("GET", f"/v1/generations/{job_id}/images/{index}").content

    def quote(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/quotes", json=body).json()

    def balance(self, user_id: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/v1/accounts/{user_id or self.user_id}/balance").json()

    def events(self, job_id: str, last_event_id: int | None = None, timeout_s: float = 600.0) -> Iterator[ServerEvent]:
        """Server-sent events of a job until its terminal status."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        try:
            with self._http.stream("GET", f"/v1/generations/{job_id}/events", headers=headers,
                                   timeout=httpx.Timeout(10.0, read=timeout_s)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise http_error(response)
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                    elif fields:
                        yield ServerEvent(int(fields.get("id", 0)), fields.get("event", "message"),
                                          json.loads(fields.get("data") or "{}"))
                        fields = {}
        except httpx.TransportError as exc:
            raise Unavailable(f"event stream of {job_id} broke: {exc}", code="service_unreachable") from exc
