"""`GET /v1/resources/{id}/download` in-process, mounted as `genserve.app` mounts it (with the economy's
routes): early access (refused before unlock, allowed after, for everyone once the window ends),
visibility (another user's private resource is missing), take-downs and the likeness blocklist, the
served bytes against the registered SHA-256 (a corrupted object is never delivered whole), and
`genserve resources download`."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json

import pytest
from engine_loras import make_lora, write_lora
from loopback import asgi_calls, loopback_server
from test_service_flow import env  # noqa: F401 - `env` is the shared module fixture
from typer.testing import CliRunner

import genserve.billing.ledger as ledger_module
from genserve.app import resource_service, resources_router
from genserve.cli import app as cli_app
from genserve.economy.api import build_router as build_economy_router
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.resources.client import _attachment_name
from genserve.resources.download import StoredFileCorrupt
from genserve.tinymodels import build_tiny_pipeline

SERVICE = {"Authorization": "Bearer local-service-token"}
_PIPE: list[object] = []


def _h(user: str) -> dict[str, str]:
    return {**SERVICE, "X-User-Id": user}


def _app(env):  # noqa: F811 - the fixture
    moderation = Moderation(env.service.registry, env.service.resource_cache, env.service.safety)
    return create_api(env.service, moderation, start_background=False,
                      routers=[resources_router(resource_service(env.settings, env.service)),
                               functools.partial(build_economy_router, env.service)])


def _call(env, *requests):  # noqa: F811
    return asgi_calls(_app(env), *requests)


def _get(rid: str, user: str):
    return ("GET", f"/v1/resources/{rid}/download", {"headers": _h(user)})


def _publish(env, tmp_path, rid: str, seed: int, owner: str, visibility: str, **fields):  # noqa: F811
    """A LoRA file of `owner` in the registry (content-addressed in the object store); its bytes."""
    if not _PIPE:
        _PIPE.append(build_tiny_pipeline("sd1"))
    path = write_lora(tmp_path / f"{rid}.safetensors", make_lora(_PIPE[0], seed=seed))
    row = env.service.registry.publish(path, id=rid, kind="lora", family="sd1", owner_user_id=owner,
                                       visibility=visibility, **fields)
    data = path.read_bytes()
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    return row, data


def test_early_access_download_refused_before_unlock_allowed_after_and_for_all_after_the_window(
        env, tmp_path, monkeypatch):  # noqa: F811
    row, data = _publish(env, tmp_path, "dl-ea-lora", 701, "olga", "public",
                         meta={"filename": "Fox Style (v2).safetensors"})
    buyer, late = env.user(grant=500).user_id, env.user(grant=0).user_id
    terms, refused, owner, unlock, bought, other = _call(
        env,
        ("PUT", f"/v1/resources/{row.id}/terms", {"json": {"early_access_days": 7, "unlock_price": 30},
                                                  "headers": _h("olga")}),
        _get(row.id, buyer), _get(row.id, "olga"),
        ("POST", f"/v1/resources/{row.id}/unlock", {"headers": _h(buyer)}),
        _get(row.id, buyer), _get(row.id, late))
    assert terms.status_code == 200 and terms.json()["early_access"]
    assert refused.status_code == 403 and refused.json()["code"] == "early_access"
    assert refused.json()["details"]["resources"][0]["id"] == row.id and refused.content != data
    assert owner.status_code == 200 and owner.content == data  # the owner always may
    assert unlock.status_code == 200
    assert bought.status_code == 200, bought.text
    assert hashlib.sha256(bought.content).hexdigest() == row.sha256 and bought.content == data
    assert bought.headers["content-type"] == "application/octet-stream"
    assert bought.headers["content-length"] == str(len(data)) == str(row.size_bytes)
    assert bought.headers["etag"] == f'"{row.sha256}"'
    disposition = bought.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="Fox_Style_v2_.safetensors"')
    assert _attachment_name(disposition) == "Fox Style (v2).safetensors"
    assert other.status_code == 403 and other.json()["code"] == "early_access"

    # time is part of the check: once the window has passed, everyone may download it
    real = ledger_module.utcnow
    monkeypatch.setattr(ledger_module, "utcnow", lambda: real() + dt.timedelta(days=7, seconds=1))
    (after,) = _call(env, _get(row.id, late))
    assert after.status_code == 200 and hashlib.sha256(after.content).hexdigest() == row.sha256
    monkeypatch.setattr(ledger_module, "utcnow", real)
    assert env.ledger.verify().ok


def test_private_taken_down_and_folder_resources(env, tmp_path):  # noqa: F811
    private, data = _publish(env, tmp_path, "dl-private-lora", 702, "pia", "private")
    public, _ = _publish(env, tmp_path, "dl-down-lora", 703, "pia", "public")
    env.service.registry.disable(public.id, "takedown test")
    likeness, likeness_data = _publish(env, tmp_path, "dl-likeness-lora", 706, "pia", "public")
    env.service.safety.blocklist.add(likeness_data, "Jane Roe", "likeness", source="test", hash_only=True)
    other, missing, mine, down, down_mine, folder, blocked, blocked_mine = _call(
        env, _get(private.id, "otto"), _get("dl-no-such-lora", "otto"), _get(private.id, "pia"),
        _get(public.id, "otto"), _get(public.id, "pia"), _get("tiny-sd1", "otto"),
        _get(likeness.id, "otto"), _get(likeness.id, "pia"))
    # another user's private resource is answered exactly like one that does not exist
    assert other.status_code == missing.status_code == 404
    assert other.json()["code"] == missing.json()["code"] == "resource_not_found"
    assert mine.status_code == 200 and mine.content == data
    assert down.status_code == 422 and down.json()["code"] == "resource_disabled"
    assert down_mine.status_code == 200  # a taken-down resource stays its owner's
    assert folder.status_code == 409 and folder.json()["code"] == "resource_not_downloadable"
    # a file on the likeness blocklist is handed to nobody but its owner, and the refusal is audited
    assert blocked.status_code == 403 and blocked.json()["code"] == "likeness_blocked"
    assert blocked_mine.status_code == 200 and blocked_mine.content == likeness_data
    rows = env.service.safety.audit.query(kind="resource_download")
    assert [(r.action, r.user_id) for r in rows] == [("block", "otto")]


def test_a_corrupted_stored_file_is_never_delivered_whole(env, tmp_path):  # noqa: F811
    row, data = _publish(env, tmp_path, "dl-corrupt-lora", 704, None, "public")
    stored = env.service.store._path(row.storage_key)  # the local object store's file
    corrupted = bytearray(data)
    corrupted[-1] ^= 0xFF  # same size, one byte off: only the hash can tell
    stored.write_bytes(bytes(corrupted))
    try:
        with pytest.raises(StoredFileCorrupt):  # raised past the handlers: a server cuts the connection
            _call(env, _get(row.id, "otto"))
    finally:
        stored.write_bytes(data)
    (ok,) = _call(env, _get(row.id, "otto"))
    assert ok.status_code == 200 and ok.content == data


@pytest.fixture
def http_server(env):  # noqa: F811
    with loopback_server(_app(env)) as url:
        yield url


def test_cli_download_saves_the_file_and_exits_non_zero_when_locked(env, http_server, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(env.settings.data_dir))
    row, data = _publish(env, tmp_path, "dl-cli-lora", 705, "olga", "public")
    out = tmp_path / "out"
    out.mkdir()

    def cli(*args: str):  # noqa: ANN202
        return CliRunner().invoke(cli_app, [*args, "--url", http_server, "--json"], catch_exceptions=False)

    saved = cli("resources", "download", row.id, "--out", str(out), "--user", "otto")
    assert saved.exit_code == 0, saved.output
    result = json.loads(saved.output)
    assert result["sha256"] == row.sha256 and result["bytes"] == len(data)
    assert (out / "dl-cli-lora.safetensors").read_bytes() == data

    # a stored object that no longer hashes right: the server cuts the stream, the client keeps nothing
    stored = env.service.store._path(row.storage_key)
    stored.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    try:
        cut = cli("resources", "download", row.id, "--out", str(tmp_path / "cut.safetensors"), "--user",
                  "otto")
    finally:
        stored.write_bytes(data)
    assert cut.exit_code != 0 and json.loads(cut.output)["error"]["code"] == "download_failed"
    assert not list(tmp_path.glob("cut.safetensors*"))

    env.service.economy.set_terms("olga", row.id, early_access_days=3, unlock_price=10)
    locked = cli("resources", "download", row.id, "--out", str(tmp_path / "locked.safetensors"),
                 "--user", "otto")
    assert locked.exit_code != 0 and json.loads(locked.output)["error"]["code"] == "early_access"
    assert not (tmp_path / "locked.safetensors").exists()
