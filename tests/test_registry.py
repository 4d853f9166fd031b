"""Resource registry: publish content-addressed, verified download, resolve with family/kind/owner checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from genserve.core.errors import Conflict, InvalidRequest
from genserve.core.storage import LocalObjectStore
from genserve.generation.protocol import ResourceRef
from genserve.resources.cache import ResourceCache
from genserve.resources.models import ResourceKind
from genserve.resources.registry import ResourceNotFound, ResourceRegistry, ResourceUnavailable
from safety.hashing import file_hashes


@pytest.fixture
def registry(db, tmp_path):
    return ResourceRegistry(db, LocalObjectStore(tmp_path / "objects"))


def _lora_file(path, seed: int = 0, metadata: dict | None = None):
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(4, 64, generator=g),
         "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(64, 4, generator=g)},
        path, metadata=metadata or {"format": "pt"},
    )
    return path


def _register(registry, rid, kind, family="sd1", owner=None, sha=None):
    return registry.register(id=rid, kind=kind, family=family, storage_key=f"k/{rid}", sha256=sha or rid.ljust(64, "0"),
                             owner_user_id=owner)


def test_publish_file_records_hashes_and_downloads_verified(registry, tmp_path):
    path = _lora_file(tmp_path / "fox.safetensors")
    row = registry.publish(path, id="fox", kind="lora", family="sd1", trigger_words=["foxstyle"], poi=True)
    hashes = file_hashes(path)
    assert (row.sha256, row.tensor_sha256, row.size_bytes) == (hashes.sha256, hashes.tensor_sha256, path.stat().st_size)
    assert row.storage_key.startswith(f"resources/lora/{row.sha256}/") and row.format == "safetensors"
    assert row.poi and not row.minor and row.trigger_words == ["foxstyle"]
    cache = ResourceCache(registry.store, tmp_path / "cache", max_bytes=1 << 30)
    local = cache.fetch(row.storage_key, row.sha256, "file")
    assert local.read_bytes() == path.read_bytes()
    # publishing the same file again is idempotent; another file under the same id is refused
    assert registry.publish(path, id="fox", kind="lora", family="sd1").sha256 == row.sha256
    with pytest.raises(Conflict) as info:
        registry.publish(_lora_file(tmp_path / "other.safetensors", seed=1), id="fox", kind="lora", family="sd1")
    assert info.value.code == "resource_exists"
    assert [r.id for r in registry.by_hash(hashes.tensor_sha256)] == ["fox"]


def test_publish_folder_checkpoint(registry, tiny_models):
    row = registry.publish(tiny_models["sd1"].diffusers_dir, id="ckpt", kind="checkpoint", family="sd1")
    assert row.format == "diffusers" and row.tensor_sha256 is None and row.size_bytes > 0
    assert registry.store.exists(f"{row.storage_key}/manifest.json")


def test_publish_refuses_pickles(registry, tmp_path):
    bad = tmp_path / "lora.ckpt"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequest) as info:
        registry.publish(bad, id="bad", kind="lora", family="sd1")
    assert info.value.code == "not_safetensors"


def test_resolve_splits_kinds_and_keeps_strengths(registry):
    _register(registry, "ck", "checkpoint")
    _register(registry, "l1", "lora")
    _register(registry, "l2", "lora")
    _register(registry, "emb", "embedding")
    res = registry.resolve("ck", [ResourceRef(id="l1", strength=0.5), ResourceRef(id="emb"),
                                  ResourceRef(id="l2", strength=-1)])
    assert res.family == "sd1" and res.checkpoint.id == "ck"
    assert [(r.id, r.strength) for r in res.loras] == [("l1", 0.5), ("l2", -1.0)]
    assert [r.id for r in res.embeddings] == ["emb"]
    assert [r.id for r in res.all] == ["ck", "l1", "l2", "emb"]


@pytest.mark.parametrize(
    ("checkpoint", "extra", "error", "code"),
    [
        ("missing", [], ResourceNotFound, "resource_not_found"),
        ("ck", ["missing"], ResourceNotFound, "resource_not_found"),
        ("l1", [], ResourceUnavailable, "not_a_checkpoint"),
        ("ck", ["ck2"], ResourceUnavailable, "extra_checkpoint"),
        ("ck", ["xl-lora"], ResourceUnavailable, "family_mismatch"),
        ("ck", ["private"], ResourceNotFound, "resource_not_found"),
    ],
)
def test_resolve_refusals(registry, checkpoint, extra, error, code):
    _register(registry, "ck", "checkpoint")
    _register(registry, "ck2", "checkpoint")
    _register(registry, "l1", "lora")
    _register(registry, "xl-lora", "lora", family="sdxl")
    _register(registry, "private", "lora", owner="alice")
    with pytest.raises(error) as info:
        registry.resolve(checkpoint, [ResourceRef(id=i) for i in extra], user_id="bob")
    assert info.value.code == code


def test_private_resource_is_usable_by_its_owner(registry):
    _register(registry, "ck", "checkpoint")
    _register(registry, "mine", "lora", owner="alice")
    assert registry.resolve("ck", [ResourceRef(id="mine")], user_id="alice").loras[0].id == "mine"


def test_disable_takes_a_resource_out_and_enable_restores_it(registry):
    _register(registry, "ck", "checkpoint")
    _register(registry, "l1", "lora")
    row = registry.disable("l1", "takedown t-1")
    assert not row.generation_enabled and row.meta["disabled_reason"] == "takedown t-1"
    with pytest.raises(ResourceUnavailable) as info:
        registry.resolve("ck", [ResourceRef(id="l1")])
    assert info.value.code == "resource_disabled"
    registry.enable("l1")
    assert registry.resolve("ck", [ResourceRef(id="l1")]).loras[0].id == "l1"
    with pytest.raises(ResourceNotFound):
        registry.disable("nope", "x")


def test_flags_and_listing(registry):
    _register(registry, "ck", "checkpoint")
    _register(registry, "l1", "lora")
    registry.set_flags("l1", minor=True, sfw_only=True)
    flagged = registry.resolve("ck", [ResourceRef(id="l1")]).loras[0]
    assert (flagged.minor, flagged.poi, flagged.sfw_only) == (True, False, True)
    assert [r.id for r in registry.list(kind=ResourceKind.lora)] == ["l1"]
    assert [r.id for r in registry.list(family="sd1")] == ["ck", "l1"]
    with pytest.raises(InvalidRequest):
        registry.list(kind="hypernetwork")
    _register(registry, "v1", "vae")
    assert [r.id for r in registry.list(kind="vae")] == ["v1"]
    with pytest.raises(InvalidRequest) as err:  # a VAE is the request's `vae`, never an extra resource
        registry.resolve("ck", [ResourceRef(id="v1")])
    assert err.value.code == "extra_vae"
