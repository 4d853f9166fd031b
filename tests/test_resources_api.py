"""The resource API in-process (no Ray), mounted as `genserve.app` mounts it: upload -> generate with the
uploaded file, visibility, AIR aliases, refusals that store and charge nothing, the likeness check at
upload (audited), flags, disabling (refused at once, evicted from the worker), discovery and the CLI."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from engine_loras import make_lora, write_lora
from loopback import asgi_calls, loopback_server
from safetensors.torch import save_file
from sqlalchemy import select
from test_service_flow import GRANT, env  # noqa: F401 - `env` is the shared module fixture
from typer.testing import CliRunner

from genserve.app import resource_service, resources_router
from genserve.cli import app as cli_app
from genserve.engine.schedulers import sampler_names
from genserve.ingress import create_api
from genserve.moderation import Moderation
from genserve.resources.models import Resource
from genserve.tinymodels import build_tiny_pipeline
from safety.store import AuditRow

SERVICE = {"Authorization": "Bearer local-service-token"}
ADMIN = {"Authorization": "Bearer local-admin-token"}
GEN = {"prompt": "a red fox", "steps": 2, "seed": 5}
_PIPES: dict[str, object] = {}


def _headers(user: str, **extra: str) -> dict[str, str]:
    return {**SERVICE, "X-User-Id": user, **extra}


def _app(env):  # noqa: F811 - the fixture
    moderation = Moderation(env.service.registry, env.service.resource_cache, env.service.safety)
    resources = resource_service(env.settings, env.service)
    return create_api(env.service, moderation, routers=[resources_router(resources)], start_background=False)


def _call(env, *requests):  # noqa: F811
    return asgi_calls(_app(env), *requests)


def _lora_bytes(tmp_path, family: str, seed: int, fmt: str = "kohya", metadata: dict | None = None) -> bytes:
    pipe = _PIPES.setdefault(family, build_tiny_pipeline(family))
    path = write_lora(tmp_path / f"{family}-{seed}-{fmt}.safetensors", make_lora(pipe, seed=seed, fmt=fmt),
                      metadata=metadata)
    return path.read_bytes()


def _upload(data: bytes, user: str, name: str = "lora.safetensors", **form):
    return ("POST", "/v1/resources", {"files": {"file": (name, data)}, "data": form, "headers": _headers(user)})


def _generate(user: str, checkpoint: str, *resources, **extra):
    body = {**GEN, "checkpoint": checkpoint, "resources": [{"id": r} for r in resources], **extra}
    return ("POST", "/v1/generations?wait=true&timeout=120", {"json": body, "headers": _headers(user)})


def _rows(env) -> int:  # noqa: F811
    with env.db.session() as s:
        return len(list(s.scalars(select(Resource.id))))


def _audit(env, kind: str) -> list[AuditRow]:  # noqa: F811
    with env.db.session() as s:
        return list(s.scalars(select(AuditRow).where(AuditRow.kind == kind).order_by(AuditRow.id)))


def test_upload_then_generate_with_the_uploaded_lora(env, tmp_path):  # noqa: F811
    owner, other = env.user(), env.user()
    data = _lora_bytes(tmp_path, "sd1", seed=101)
    up, again, mine, theirs, listed, hidden, job, refused = _upload_flow(env, data, owner, other)
    assert up.status_code == 201, up.text
    r = up.json()
    digest = __import__("hashlib").sha256(data).hexdigest()
    assert (r["kind"], r["family"], r["type"], r["visibility"], r["owner"]) == ("lora", "sd1", "lora", "private",
                                                                                owner.user_id)
    assert r["hashes"]["sha256"] == digest and r["hashes"]["autov2"] == digest[:10].upper()
    assert len(r["hashes"]["autov3"]) == 12 and r["name"] == "fox-style" and r["trigger_words"] == ["foxstyle", "red"]
    assert again.status_code == 200 and again.json()["id"] == r["id"]  # the same file: the same resource
    assert mine.status_code == 200 and theirs.status_code == 404 and theirs.json()["code"] == "resource_not_found"
    assert [x["id"] for x in listed.json()["resources"]] == [r["id"]]
    assert r["id"] not in [x["id"] for x in hidden.json()["resources"]]
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    assert "Lora hashes" in job.json()["infotext"]
    assert refused.status_code == 404 and refused.json()["code"] == "resource_not_found"
    assert env.available(owner) == GRANT - job.json()["charged"]  # the upload itself cost nothing


def _upload_flow(env, data, owner, other):  # noqa: F811
    (up,) = _call(env, _upload(data, owner.user_id, "fox-style.safetensors", trigger_words="foxstyle, red"))
    rid = up.json().get("id", "missing")
    rest = _call(
        env,
        _upload(data, owner.user_id, "fox-style.safetensors"),
        ("GET", f"/v1/resources/{rid}", {"headers": _headers(owner.user_id)}),
        ("GET", f"/v1/resources/{rid}", {"headers": _headers(other.user_id)}),
        ("GET", "/v1/resources?kind=lora&owner=me", {"headers": _headers(owner.user_id)}),
        ("GET", "/v1/resources?kind=lora", {"headers": _headers(other.user_id)}),
        _generate(owner.user_id, "tiny-sd1", rid),
        _generate(other.user_id, "tiny-sd1", rid),
    )
    return (up, *rest)


def test_public_sdxl_lycoris_by_air_alias_and_a_single_file_checkpoint(env, tmp_path, tiny_models):  # noqa: F811
    owner, other = env.user(), env.user()
    g = torch.Generator().manual_seed(7)
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # tiny SDXL: 64 <- 80
    loha = {f"{module}.hada_w1_a": torch.randn(64, 2, generator=g) * 0.1,
            f"{module}.hada_w1_b": torch.randn(2, 80, generator=g) * 0.1,
            f"{module}.hada_w2_a": torch.randn(64, 2, generator=g) * 0.1,
            f"{module}.hada_w2_b": torch.randn(2, 80, generator=g) * 0.1, f"{module}.alpha": torch.tensor(1.0)}
    buf = tmp_path / "loha.safetensors"
    save_file(loha, str(buf))
    air = "urn:air:sdxl:lora:civitai:4242@77"
    up, ckpt = _call(
        env,
        _upload(buf.read_bytes(), owner.user_id, "loha.safetensors", visibility="public", air=air),
        _upload(tiny_models["sd1"].single_file.read_bytes(), owner.user_id, "my-model.safetensors",
                kind="checkpoint"),
    )
    assert up.status_code == 201, up.text
    assert (up.json()["type"], up.json()["family"], up.json()["air"]) == ("loha", "sdxl", air)
    assert ckpt.status_code == 201, ckpt.text
    assert (ckpt.json()["kind"], ckpt.json()["family"]) == ("checkpoint", "sd1")
    by_alias, job, own_ckpt, models = _call(
        env,
        ("GET", "/v1/resources/urn:air:pony:lycoris:civitai:4242@77", {"headers": _headers(other.user_id)}),
        _generate(other.user_id, "tiny-sdxl", "urn:air:sdxl:lora:civitai:4242@77"),
        _generate(owner.user_id, ckpt.json()["id"]),
        ("GET", "/v1/models", {"headers": _headers(other.user_id)}),
    )
    assert by_alias.status_code == 200 and by_alias.json()["id"] == up.json()["id"]
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    assert own_ckpt.status_code == 200 and own_ckpt.json()["status"] == "succeeded", own_ckpt.text
    ids = [m["id"] for m in models.json()["models"]]
    assert "tiny-sd1" in ids and ckpt.json()["id"] not in ids  # private to its owner
    (taken,) = _call(env, _upload(_lora_bytes(tmp_path, "sdxl", 5), owner.user_id, air=air))
    assert (taken.status_code, taken.json()["code"]) == (409, "air_taken")


def test_refusals_store_nothing(env, tmp_path):  # noqa: F811
    user = env.user()
    good = _lora_bytes(tmp_path, "sd1", seed=202)
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["shape"])
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]  # the shape lies
    body = json.dumps(header).encode()
    lying = struct.pack("<Q", len(body)) + body + good[8 + n:]
    pickle_bytes = b"\x80\x04\x95" + bytes(64)
    rows, objects = _rows(env), set(env.service.store.list("resources/"))
    responses = _call(
        env,
        _upload(pickle_bytes, user.user_id, "model.ckpt"),
        _upload(lying, user.user_id),
        _upload(good, user.user_id, family="sdxl"),
        _upload(good, user.user_id, kind="embedding"),
        ("POST", "/v1/resources", {"data": {"key": "uploads/someone-else/x.safetensors"},
                                   "headers": _headers(user.user_id)}),
        ("POST", "/v1/resources", {"data": {}, "headers": _headers(user.user_id)}),
        _upload(good, user.user_id, air="urn:air:flux1:lora:civitai:1@1"),
    )
    codes = [(r.status_code, r.json()["code"]) for r in responses]
    assert codes == [(422, "not_safetensors"), (422, "safetensors_header_invalid"), (422, "family_mismatch"),
                     (422, "resource_kind_mismatch"), (403, "staged_key_forbidden"), (422, "upload_source"),
                     (422, "air_invalid")]
    assert _rows(env) == rows and set(env.service.store.list("resources/")) == objects
    assert env.available(user) == GRANT


def test_blocked_likeness_upload_is_refused_audited_and_free(env, tmp_path):  # noqa: F811
    user = env.user()
    blocked = _lora_bytes(tmp_path, "sd1", seed=303)
    path = tmp_path / "blocked.safetensors"
    path.write_bytes(blocked)
    env.service.safety.blocklist.add(path, "A. Person", "test likeness", source="test")
    # a disguise: the same weights in another layout with another header (new file and tensor hashes)
    disguise = _lora_bytes(tmp_path, "sd1", seed=303, fmt="peft", metadata={"ss_output_name": "innocent"})
    staged = f"uploads/{user.user_id}/d.safetensors"
    env.service.store.put_bytes(staged, disguise)
    rows, objects = _rows(env), set(env.service.store.list("resources/"))
    before = len(_audit(env, "resource_upload"))
    same, renamed, by_key = _call(
        env,
        _upload(blocked, user.user_id, "nice-style.safetensors"),
        _upload(disguise, user.user_id, "other.safetensors"),
        ("POST", "/v1/resources", {"data": {"key": staged}, "headers": _headers(user.user_id)}),
    )
    for resp in (same, renamed, by_key):
        assert (resp.status_code, resp.json()["code"]) == (403, "likeness_blocked"), resp.text
    assert same.json()["details"]["rules"] == ["likeness.sha256"]
    assert renamed.json()["details"]["rules"] == ["likeness.fingerprint"]
    assert _rows(env) == rows and set(env.service.store.list("resources/")) == objects
    assert not env.service.store.exists(staged)  # blocked bytes are not kept in staging either
    audit = _audit(env, "resource_upload")[before:]
    assert [(a.action, a.rules, a.user_id) for a in audit] == [("block", ["likeness.sha256"], user.user_id),
                                                               ("block", ["likeness.fingerprint"], user.user_id),
                                                               ("block", ["likeness.fingerprint"], user.user_id)]
    assert env.available(user) == GRANT
    assert env.service.safety.audit.verify().ok


def test_flags_moderation_and_nsfw_discovery(env, tmp_path):  # noqa: F811
    owner, other = env.user(), env.user()
    (up,) = _call(env, _upload(_lora_bytes(tmp_path, "sd1", 404), owner.user_id, visibility="public", nsfw="true"))
    rid = up.json()["id"]
    pg13, r_level, moderated, locked, allowed = _call(
        env,
        ("GET", "/v1/resources?kind=lora", {"headers": _headers(other.user_id)}),
        ("GET", "/v1/resources?kind=lora", {"headers": _headers(other.user_id, **{"X-Max-Nsfw-Level": "r"})}),
        ("POST", f"/v1/admin/resources/{rid}/flags",
         {"json": {"moderator": "mod-1", "flags": {"minor": True}}, "headers": ADMIN}),
        ("PATCH", f"/v1/resources/{rid}", {"json": {"flags": {"minor": False}}, "headers": _headers(owner.user_id)}),
        ("PATCH", f"/v1/resources/{rid}", {"json": {"flags": {"poi": True}, "visibility": "private"},
                                           "headers": _headers(owner.user_id)}),
    )
    assert rid not in [r["id"] for r in pg13.json()["resources"]]
    assert rid in [r["id"] for r in r_level.json()["resources"]]
    flags = moderated.json()["flags"]
    assert flags["minor"] and flags["sfw_only"] and not flags["nsfw"]
    assert moderated.json()["locked_flags"] == ["minor", "nsfw", "sfw_only"]
    assert (locked.status_code, locked.json()["code"]) == (403, "flag_locked")
    assert allowed.status_code == 200 and allowed.json()["flags"]["poi"] and allowed.json()["visibility"] == "private"
    (not_owner,) = _call(env, ("PATCH", f"/v1/resources/{rid}", {"json": {"visibility": "public"},
                                                                  "headers": _headers(other.user_id)}))
    assert not_owner.status_code == 404


def test_disable_refuses_at_once_and_evicts_the_worker_adapter(env, tmp_path):  # noqa: F811
    user = env.user()
    (up,) = _call(env, _upload(_lora_bytes(tmp_path, "sd1", 505), user.user_id))
    rid, sha = up.json()["id"], up.json()["hashes"]["sha256"]
    (job,) = _call(env, _generate(user.user_id, "tiny-sd1", rid))
    assert job.json()["status"] == "succeeded"
    core = env.service.workers.cores["sd1"]
    loaded = core.checkpoint("tiny-sd1")
    assert sha in loaded.loras
    disabled, refused, shown = _call(
        env,
        ("POST", f"/v1/admin/resources/{rid}/disable", {"json": {"moderator": "mod-2", "reason": "report"},
                                                        "headers": ADMIN}),
        _generate(user.user_id, "tiny-sd1", rid),
        ("GET", f"/v1/resources/{rid}", {"headers": _headers(user.user_id)}),
    )
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert (refused.status_code, refused.json()["code"]) == (422, "resource_disabled")
    assert shown.json()["disabled_reason"] == "report"
    # a worker that is asked anyway (a request admitted just before) refuses and drops the adapter
    from genserve.generation.worker.wire import LoraSpec, WorkerRequest  # noqa: PLC0415

    request = WorkerRequest(job_id="f" * 32, checkpoint_id="tiny-sd1", prompt="x", negative_prompt="",
                            loras=[LoraSpec(resource_id=rid, strength=1.0)], steps=1, seeds=[1], width=64,
                            height=64)
    with pytest.raises(Exception) as info:
        core.generate(request)
    assert getattr(info.value, "code", "") == "resource_disabled"
    assert sha not in loaded.loras and sha not in core.cache
    (audit,) = [a for a in _audit(env, "resource_disable") if a.details.get("resource_id") == rid]
    assert (audit.action, audit.user_id) == ("block", "mod-2")


def test_discovery_routes_and_openapi(env):  # noqa: F811
    user = env.user().user_id
    models, samplers, openapi, unauth = _call(
        env,
        ("GET", "/v1/models", {"headers": _headers(user)}),
        ("GET", "/v1/samplers", {"headers": _headers(user)}),
        ("GET", "/openapi.json", {}),
        ("GET", "/v1/models", {}),
    )
    by_id = {m["id"]: m for m in models.json()["models"]}
    assert {"tiny-sd1", "tiny-sdxl", "tiny-sd1-single"} <= set(by_id)
    sd1 = by_id["tiny-sd1"]
    assert sd1["family"] == "sd1" and sd1["size_bytes"] > 0 and sd1["default_size"] == [64, 64]
    assert [64, 96] in sd1["allowed_sizes"] and sd1["pipeline"] == "StableDiffusionPipeline"
    assert [s["name"] for s in samplers.json()] == sampler_names()
    paths = openapi.json()["paths"]
    for path in ("/v1/resources", "/v1/resources/{resource_id}", "/v1/models", "/v1/samplers",
                 "/v1/admin/resources/{resource_id}/disable", "/v1/admin/resources/{resource_id}/flags"):
        assert path in paths
    assert unauth.status_code == 401


@pytest.fixture()
def http_server(env):  # noqa: F811
    with loopback_server(_app(env)) as url:
        yield url


def test_cli_add_generate_list_show_disable(env, http_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(env.settings.data_dir))
    user = env.user().user_id
    path = tmp_path / "cli.safetensors"
    path.write_bytes(_lora_bytes(tmp_path, "sd1", 606))

    def cli(*args: str):  # noqa: ANN202
        return CliRunner().invoke(cli_app, [*args, "--url", http_server, "--json"], catch_exceptions=False)

    added = cli("resources", "add", str(path), "--user", user, "--name", "cli-lora", "--trigger", "clitok")
    assert added.exit_code == 0, added.output
    rid = json.loads(added.output)["id"]
    gen = cli("generate", "a fox clitok", "--out", str(tmp_path / "out"), "--lora", f"{rid}:0.8", "--steps", "2",
              "--user", user)
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.output)["status"] == "succeeded" and len(list((tmp_path / "out").glob("*.png"))) == 1
    listed = json.loads(cli("resources", "list", "--owner", "me", "--user", user).output)
    assert [r["id"] for r in listed["resources"]] == [rid]
    shown = json.loads(cli("resources", "show", rid, "--user", user).output)
    assert shown["name"] == "cli-lora" and shown["trigger_words"] == ["clitok"]
    off = cli("resources", "disable", rid, "--reason", "cli test")
    assert off.exit_code == 0 and json.loads(off.output)["enabled"] is False
    refused = cli("generate", "a fox", "--out", str(tmp_path / "out"), "--lora", rid, "--steps", "2", "--user", user)
    assert refused.exit_code == 1 and json.loads(refused.output)["error"]["code"] == "resource_disabled"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    refused_upload = cli("resources", "add", str(bad), "--user", user)
    assert refused_upload.exit_code == 1 and json.loads(refused_upload.output)["error"]["code"] == "not_safetensors"
    blocked = tmp_path / "blocked-cli.safetensors"
    blocked.write_bytes(_lora_bytes(tmp_path, "sd1", 607))
    env.service.safety.blocklist.add(blocked, "B. Person", "cli test", source="test")
    refused_blocked = cli("resources", "add", str(blocked), "--user", user)
    assert refused_blocked.exit_code == 3  # a safety refusal
    assert json.loads(refused_blocked.output)["error"]["code"] == "likeness_blocked"


def test_textual_inversion_upload_and_reserved_tokens(env, tmp_path):  # noqa: F811
    user = env.user()
    g = torch.Generator().manual_seed(9)
    ti = tmp_path / "ti.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, str(ti))  # tiny SD1's CLIP is 32 wide
    up, reserved = _call(
        env,
        _upload(ti.read_bytes(), user.user_id, "fox-ti.safetensors", token="<fox-ti>"),
        _upload(ti.read_bytes(), user.user_id, "sneaky.safetensors", token="gs-safe-neg"),
    )
    assert up.status_code == 201, up.text
    assert (up.json()["kind"], up.json()["family"], up.json()["token"]) == ("embedding", "sd1", "<fox-ti>")
    assert (reserved.status_code, reserved.json()["code"]) == (422, "reserved_token")
    (job,) = _call(env, _generate(user.user_id, "tiny-sd1", up.json()["id"], prompt="a <fox-ti> fox"))
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text


def test_vae_upload_then_generate_with_it_and_refusals_by_code(env, tmp_path):  # noqa: F811
    import io

    from PIL import Image

    from genserve.tinymodels import write_tiny_vae

    owner, other = env.user(), env.user()
    data = write_tiny_vae(tmp_path / "fox_vae.safetensors", seed=8).read_bytes()
    undeclared, up = _call(env, _upload(data, owner.user_id, "fox_vae.safetensors"),
                           _upload(data, owner.user_id, "fox_vae.safetensors", family="sd1"))
    assert (undeclared.status_code, undeclared.json()["code"]) == (422, "family_undetected")
    assert up.status_code == 201, up.text
    assert (up.json()["kind"], up.json()["family"], up.json()["name"]) == ("vae", "sd1", "fox_vae")
    rid = up.json()["id"]
    own, chosen, theirs, listed = _call(
        env, _generate(owner.user_id, "tiny-sd1"), _generate(owner.user_id, "tiny-sd1", vae=rid),
        _generate(other.user_id, "tiny-sd1", vae=rid),  # a private VAE is nobody else's to name
        _generate(owner.user_id, "tiny-sd1", rid))
    assert chosen.status_code == 200 and chosen.json()["status"] == "succeeded", chosen.text
    assert "VAE: fox_vae" in chosen.json()["infotext"] and "VAE" not in own.json()["infotext"]
    pngs = _call(env, *[("GET", f"/v1/generations/{job.json()['id']}/images/0", {"headers": _headers(owner.user_id)})
                        for job in (own, chosen)])
    own_pixels, chosen_pixels = (Image.open(io.BytesIO(png.content)).convert("RGB").tobytes() for png in pngs)
    assert own_pixels != chosen_pixels  # the same seed and prompt, decoded by another VAE
    assert (theirs.status_code, theirs.json()["code"]) == (404, "vae_not_found")
    assert env.available(other) == GRANT
    assert (listed.status_code, listed.json()["code"]) == (422, "extra_vae")
