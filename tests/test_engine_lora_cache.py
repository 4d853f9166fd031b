"""The per-pipeline LoRA adapter cache: formats, strengths, LRU limits, explicit deletes, blocklist refusals."""

from __future__ import annotations

import hashlib

import pytest
import torch
from engine_loras import make_lora, write_lora
from engine_support import differ, load_tiny, one_torch_thread

from genserve.engine.generate import ModelInfo, generate
from genserve.engine.lora_cache import (
    LikenessBlocked,
    LikenessCheckFailed,
    LoraCache,
    LoraCacheFull,
    LoraIncompatible,
    LoraInvalid,
    adapter_name,
)
from genserve.generation.worker.wire import WorkerRequest


class NoMatches:
    """A blocklist with no entries (the real one is exercised below with the database)."""

    def __init__(self):
        self.checked = []

    def check(self, src):
        self.checked.append(src)
        return None


def _adapters(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


@pytest.fixture(scope="module")
def sd1(tiny_models):
    with one_torch_thread():
        yield load_tiny(tiny_models["sd1"])


@pytest.fixture(scope="module")
def lora_files(sd1, tmp_path_factory):
    """sha256 -> path of four LoRAs: kohya with text encoder, PEFT, kohya, PEFT unet-only."""
    pipe, _ = sd1
    root = tmp_path_factory.mktemp("loras")
    files = []
    for i, (fmt, te) in enumerate([("kohya", True), ("peft", True), ("kohya", True), ("peft", False)]):
        path = write_lora(root / f"l{i}.safetensors", make_lora(pipe, seed=10 + i, fmt=fmt, text_encoder=te))
        files.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
    return files


@pytest.fixture
def cache(sd1):
    pipe, _ = sd1
    cache = LoraCache(pipe, NoMatches(), max_adapters=8, max_bytes=1 << 30)
    yield cache
    cache.clear()
    assert _adapters(pipe) == set()


def _image(sd1, seed=3):
    pipe, safety = sd1
    request = WorkerRequest(job_id="j", checkpoint_id="c", prompt="a cat", steps=2, width=64, height=64, seeds=[seed])
    with one_torch_thread():
        return generate(pipe, request, safety=safety, model=ModelInfo("m", "h")).images[0].image


def test_two_loras_at_different_strengths_change_the_image(sd1, cache, lora_files):
    (sha_a, path_a), (sha_b, path_b) = lora_files[0], lora_files[1]
    base = _image(sd1)
    a = cache.ensure(sha_a, path_a)
    b = cache.ensure(sha_b, path_b)
    assert {a.name, b.name} <= set(sd1[0].get_list_adapters()["unet"])
    assert set(sd1[0].get_list_adapters()["text_encoder"]) >= {a.name, b.name}  # kohya and PEFT text encoder keys
    images = {}
    for label, active in {"a1": [(a.name, 1.0)], "a05": [(a.name, 0.5)], "ab": [(a.name, 1.0), (b.name, 0.7)],
                          "b": [(b.name, 1.0)]}.items():
        cache.activate(active)
        images[label] = _image(sd1)
    labels = list(images)
    for i, x in enumerate(labels):
        assert differ(images[x], base) > 0.5, x
        for y in labels[i + 1:]:
            assert differ(images[x], images[y]) > 0.2, (x, y)
    cache.activate([(a.name, 0.0)])
    assert differ(_image(sd1), base) == 0.0  # strength 0 is the base model
    cache.activate([])
    assert differ(_image(sd1), base) == 0.0  # a request without LoRAs runs with LoRA disabled
    cache.activate([(a.name, 1.0)])
    assert differ(_image(sd1), images["a1"]) == 0.0  # and switching back restores it exactly


def test_activation_cost_is_recorded_and_repeats_are_free(cache, lora_files):
    a = cache.ensure(*lora_files[0])
    b = cache.ensure(*lora_files[1])
    assert cache.activate([(a.name, 1.0)]) > 0.0
    assert cache.activate([(a.name, 1.0)]) == 0.0
    cache.activate([(b.name, 0.5)])
    assert cache.stats["switches"] == 2 and cache.stats["switch_ms_total"] > 0
    assert cache.ensure(*lora_files[0]) is a and cache.stats["hits"] == 1 and cache.stats["loads"] == 2


def test_lru_by_count_deletes_adapters_explicitly(sd1, cache, lora_files, monkeypatch):
    pipe, _ = sd1
    deleted = []
    real = pipe.delete_adapters
    monkeypatch.setattr(pipe, "delete_adapters", lambda names: (deleted.append(names), real(names)))
    cache.set_limits(max_adapters=2)
    shas = [sha for sha, _ in lora_files[:3]]
    for sha, path in lora_files[:2]:
        cache.ensure(sha, path)
    cache.ensure(*lora_files[0])  # touch: 1 is now least recent
    cache.ensure(*lora_files[2])
    assert cache.resident() == [shas[0], shas[2]]
    assert deleted == [adapter_name(shas[1])]
    assert adapter_name(shas[1]) not in pipe.get_list_adapters().get("unet", [])
    assert cache.evict(shas[1]) is False  # already gone: idempotent, no second delete
    assert deleted == [adapter_name(shas[1])]


def test_byte_limit_and_protected_adapters(cache, lora_files):
    first = cache.ensure(*lora_files[0])
    cache.set_limits(max_bytes=int(first.nbytes * 1.5))
    cache.ensure(*lora_files[2])  # same size: the first must go
    assert cache.resident() == [lora_files[2][0]] and cache.total_bytes <= cache.max_bytes
    with pytest.raises(LoraCacheFull):  # the request's other LoRA may not be evicted to make room
        cache.ensure(*lora_files[0], protect=[lora_files[2][0]])
    cache.set_limits(max_bytes=first.nbytes // 2)
    with pytest.raises(LoraCacheFull) as err:
        cache.ensure(*lora_files[0])
    assert err.value.code == "lora_too_large"


class Blocks:
    def __init__(self, blocked):
        self.blocked = set(blocked)

    def check(self, src):
        return {"person": "someone"} if hashlib.sha256(src.read_bytes()).hexdigest() in self.blocked else None


def test_blocklisted_lora_is_refused_before_loading(sd1, lora_files):
    pipe, _ = sd1
    sha, path = lora_files[0]
    cache = LoraCache(pipe, Blocks({sha}), max_adapters=4, max_bytes=1 << 30)
    with pytest.raises(LikenessBlocked) as err:
        cache.ensure(sha, path)
    assert err.value.code == "likeness_blocked" and err.value.http_status == 403
    assert len(cache) == 0 and _adapters(pipe) == set()


def test_resident_lora_blocklisted_later_is_evicted_on_recheck(sd1, lora_files):
    pipe, _ = sd1
    sha, path = lora_files[0]
    blocklist = Blocks(set())
    cache = LoraCache(pipe, blocklist, max_adapters=4, max_bytes=1 << 30, recheck_s=0.0)
    cache.ensure(sha, path)
    blocklist.blocked.add(sha)
    with pytest.raises(LikenessBlocked):
        cache.ensure(sha, path)
    assert sha not in cache and _adapters(pipe) == set()


def test_real_likeness_blocklist_refuses_the_file(sd1, lora_files, db, tmp_path):
    from safety.likeness import LikenessBlocklist

    pipe, _ = sd1
    blocklist = LikenessBlocklist(db.session)
    sha, path = lora_files[1]
    blocklist.add(path, person="A Person", reason="likeness", source="test")
    cache = LoraCache(pipe, blocklist, max_adapters=4, max_bytes=1 << 30)
    with pytest.raises(LikenessBlocked) as err:
        cache.ensure(sha, path)
    assert err.value.details["person"] == "A Person"
    other_sha, other_path = lora_files[3]
    assert cache.ensure(other_sha, other_path).name == adapter_name(other_sha)
    cache.clear()


def test_failing_blocklist_refuses(sd1, lora_files):
    class Broken:
        def check(self, src):
            raise ConnectionError("database down")

    cache = LoraCache(sd1[0], Broken(), max_adapters=4, max_bytes=1 << 30)
    with pytest.raises(LikenessCheckFailed) as err:
        cache.ensure(*lora_files[0])
    assert err.value.code == "likeness_check_failed" and len(cache) == 0


def test_invalid_and_incompatible_files(sd1, cache, tmp_path):
    pipe, _ = sd1
    not_lora = write_lora(tmp_path / "ckpt.safetensors", {"model.diffusion_model.weight": torch.zeros(2, 2)})
    with pytest.raises(LoraInvalid):
        cache.ensure("1" * 64, not_lora)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraInvalid):
        cache.ensure("2" * 64, garbage)
    wrong = {k: torch.zeros(v.shape[0] + 3, *v.shape[1:]) if "lora_up" in k else v
             for k, v in make_lora(pipe, seed=1).items()}
    with pytest.raises(LoraIncompatible):
        cache.ensure("3" * 64, write_lora(tmp_path / "wrong.safetensors", wrong))
    assert len(cache) == 0 and adapter_name("3" * 64) not in pipe.get_list_adapters().get("unet", [])


def test_peft_header_alpha_is_applied(sd1, cache, tmp_path):
    """A PEFT file whose alpha lives only in the header runs at alpha/r, not at 1.0."""
    import json

    pipe, _ = sd1
    state = make_lora(pipe, seed=5, fmt="peft", text_encoder=False, rank=4)
    plain = write_lora(tmp_path / "plain.safetensors", state)
    halved = {k: (v * 0.5 if ".lora_B." in k else v) for k, v in state.items()}
    baked = write_lora(tmp_path / "baked.safetensors", halved)
    header = write_lora(tmp_path / "header.safetensors", state,
                        {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.r": 4})})
    images = {}
    for label, path in {"plain": plain, "baked": baked, "header": header}.items():
        adapter = cache.ensure(hashlib.sha256(path.read_bytes()).hexdigest(), path)
        cache.activate([(adapter.name, 1.0)])
        images[label] = _image(sd1)
    assert differ(images["header"], images["baked"]) < 0.05 < differ(images["header"], images["plain"])
