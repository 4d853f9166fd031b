"""HTTP client of the training API (what `genserve train` and the site's back end call).

Refusals come back as typed errors carrying the server's stable `code`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genserve.client import ServiceClient, http_error


class TrainingClient(ServiceClient):
    def __init__(self, base_url: str, token: str, user_id: str | None = None, *, timeout_s: float = 600.0):
        super().__init__(base_url, token, {"X-User-Id": user_id} if user_id else None, timeout_s=timeout_s)

    def submit(self, dataset: str | Path, *, family: str, real_person: bool, name: str = "",
               trigger_words: list[str] | None = None, person: str = "",
               params: dict[str, Any] | None = None, config: str | None = None,
               dataset_config: str | None = None, captions: dict[str, str] | None = None,
               auto_caption: bool = False) -> dict[str, Any]:
        """`config` / `dataset_config`: the text of a kohya config TOML / dataset TOML."""
        dataset = Path(dataset)
        form = {"family": family, "real_person": "true" if real_person else "false", "name": name,
                "trigger_words": ",".join(trigger_words or []), "person": person, "params": json.dumps(params or {}),
                "config": config or "", "dataset_config": dataset_config or "",
                "captions": json.dumps(captions) if captions else "", "auto_caption": "true" if auto_caption else "false"}
        with dataset.open("rb") as f:
            files = {"dataset": (dataset.name, f, "application/zip")}
            return self._call("POST", "/v1/trainings", data=form, files=files).json()

    def propose_captions(self, dataset: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
        dataset = Path(dataset)
        with dataset.open("rb") as f:
            files = {"dataset": (dataset.name, f, "application/zip")}
            return self._call("POST", "/v1/trainings/captions", data={"overwrite": "true" if overwrite else "false"},
                              files=files).json()

    def get(self, training_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/trainings/{training_id}").json()

    def cancel(self, training_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/trainings/{training_id}/cancel").json()

    def publish_epoch(self, training_id: str, epoch: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/trainings/{training_id}/epochs/{int(epoch)}/publish").json()

    def epochs(self, training_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/trainings/{training_id}/epochs").json()

    def download(self, training_id: str, dest: str | Path, epoch: int | None = None) -> Path:
        dest = Path(dest)
        query = f"?epoch={int(epoch)}" if epoch is not None else ""
        with self._http.stream("GET", f"/v1/trainings/{training_id}/download{query}") as response:
            if response.status_code >= 400:
                response.read()
                raise http_error(response)
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
