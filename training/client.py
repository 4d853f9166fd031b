"""HTTP client of the training API (what `genserve train` and the site's back end call).

Refusals come back as typed errors carrying the server's stable `code`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from genserve.errors import GenserveError, SafetyBlocked, Unavailable

SAFETY_CODES = {"safety_blocked", "dataset_blocked", "sample_withheld"}


def _error(response: httpx.Response) -> GenserveError:
    try:
        body = response.json()
        code, message, details = body["code"], body.get("message", ""), body.get("details") or {}
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500], {}
    cls = SafetyBlocked if code in SAFETY_CODES else GenserveError
    exc = cls(message, code=code, details=details)
    exc.http_status = response.status_code
    return exc


class TrainingClient:
    def __init__(self, base_url: str, token: str, user_id: str | None = None, *, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {token}"}
        if user_id:
            headers["X-User-Id"] = user_id
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrainingClient:
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
            raise _error(response)
        return response

    def submit(self, dataset: str | Path, *, family: str, real_person: bool, name: str = "",
               trigger_words: list[str] | None = None, person: str = "",
               params: dict[str, Any] | None = None) -> dict[str, Any]:
        dataset = Path(dataset)
        form = {"family": family, "real_person": "true" if real_person else "false", "name": name,
                "trigger_words": ",".join(trigger_words or []), "person": person, "params": json.dumps(params or {})}
        with dataset.open("rb") as f:
            files = {"dataset": (dataset.name, f, "application/zip")}
            return self._call("POST", "/v1/trainings", data=form, files=files).json()

    def get(self, training_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/trainings/{training_id}").json()

    def cancel(self, training_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/trainings/{training_id}/cancel").json()

    def download(self, training_id: str, dest: str | Path) -> Path:
        dest = Path(dest)
        with self._http.stream("GET", f"/v1/trainings/{training_id}/download") as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            tmp = dest.with_name(dest.name + ".part")
            with tmp.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            tmp.replace(dest)
        return dest

    def approve(self, training_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/admin/trainings/{training_id}/approve").json()

    def deny(self, training_id: str, reason: str = "") -> dict[str, Any]:
        return self._call("POST", f"/v1/admin/trainings/{training_id}/deny", json={"reason": reason}).json()
