"""Publishing into the object store and the verified, LRU-by-bytes local resource cache."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from genserve.core.storage import LocalObjectStore
from genserve.resources.cache import (
    MANIFEST_NAME,
    ResourceCache,
    ResourceIntegrityError,
    publish_file,
    publish_folder,
)


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    s = LocalObjectStore(tmp_path / "objects")
    s.ensure_bucket()
    return s


def _file(path: Path, size: int, fill: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((fill * size)[:size])
    return path


def _folder(root: Path) -> Path:
    _file(root / "model_index.json", 10, b"{")
    _file(root / "unet" / "diffusion_pytorch_model.safetensors", 300, b"u")
    _file(root / "unet" / "config.json", 20, b"c")
    return root


def test_publish_file_is_content_addressed(store, tmp_path):
    path = _file(tmp_path / "lora.safetensors", 100)
    pub = publish_file(store, path, "resources/lora")
    assert pub.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pub.storage_key == f"resources/lora/{pub.sha256}/lora.safetensors"
    assert pub.size == 100
    assert store.get_bytes(pub.storage_key) == path.read_bytes()
    assert publish_file(store, path, "resources/lora") == pub  # idempotent


def test_publish_folder_manifest_names_the_folder(store, tmp_path):
    folder = _folder(tmp_path / "ckpt")
    pub = publish_folder(store, folder, "resources/checkpoint")
    raw = store.get_bytes(f"{pub.storage_key}/{MANIFEST_NAME}")
    assert hashlib.sha256(raw).hexdigest() == pub.sha256
    files = json.loads(raw)["files"]
    assert set(files) == {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json"}
    assert pub.size == 330
    assert store.get_bytes(f"{pub.storage_key}/unet/config.json") == (folder / "unet/config.json").read_bytes()


def test_fetch_file_and_folder_verifies_and_reuses(store, tmp_path):
    f = publish_file(store, _file(tmp_path / "a.safetensors", 50), "r")
    d = publish_folder(store, _folder(tmp_path / "ckpt"), "r")
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    path = cache.fetch(f.storage_key, f.sha256, "file")
    assert path.name == "a.safetensors" and path.read_bytes() == b"x" * 50
    folder = cache.fetch(d.storage_key, d.sha256, "folder")
    assert (folder / "unet" / "config.json").read_bytes() == b"c" * 20
    # a second fetch is a hit, even when the store lost the object
    store.delete(f.storage_key)
    assert cache.fetch(f.storage_key, f.sha256, "file") == path
    assert cache.entries() == {f.sha256: 50, d.sha256: 330}


def test_corrupt_download_is_refused_and_nothing_kept(store, tmp_path):
    f = publish_file(store, _file(tmp_path / "a.safetensors", 50), "r")
    store.put_bytes(f.storage_key, b"y" * 50)  # the object changed under its content address
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    with pytest.raises(ResourceIntegrityError) as err:
        cache.fetch(f.storage_key, f.sha256, "file")
    assert err.value.code == "resource_integrity_failed"
    assert f.sha256 not in cache
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_folder_member_and_manifest_are_refused(store, tmp_path):
    d = publish_folder(store, _folder(tmp_path / "ckpt"), "r")
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    store.put_bytes(f"{d.storage_key}/unet/config.json", b"tampered")
    with pytest.raises(ResourceIntegrityError):
        cache.fetch(d.storage_key, d.sha256, "folder")
    # a manifest that is not the one the registry recorded
    with pytest.raises(ResourceIntegrityError):
        cache.fetch(d.storage_key, "0" * 64, "folder")
    assert cache.entries() == {}
    assert list((tmp_path / "cache").iterdir()) == []


def test_manifest_paths_cannot_escape_the_entry(store, tmp_path):
    body = json.dumps({"version": 1, "files": {"../evil": {"sha256": "0" * 64, "size": 1}}},
                      sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha256(body).hexdigest()
    store.put_bytes(f"r/{sha}/{MANIFEST_NAME}", body)
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    with pytest.raises(ResourceIntegrityError):
        cache.fetch(f"r/{sha}", sha, "folder")
    assert not (tmp_path / "evil").exists()


def test_lru_eviction_by_bytes_skips_pinned_entries(store, tmp_path):
    pubs = [publish_file(store, _file(tmp_path / f"{i}.safetensors", 100, bytes([65 + i])), "r") for i in range(4)]
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=250)
    cache.fetch(pubs[0].storage_key, pubs[0].sha256, "file")
    cache.pin(pubs[0].sha256)  # oldest, but in use
    cache.fetch(pubs[1].storage_key, pubs[1].sha256, "file")
    cache.fetch(pubs[2].storage_key, pubs[2].sha256, "file")  # 300 > 250: evicts 1, not pinned 0
    assert set(cache.entries()) == {pubs[0].sha256, pubs[2].sha256}
    assert not (tmp_path / "cache" / pubs[1].sha256).exists()
    cache.unpin(pubs[0].sha256)
    cache.fetch(pubs[2].storage_key, pubs[2].sha256, "file")  # touch 2: 0 is now least recent
    with cache.use(pubs[3].storage_key, pubs[3].sha256, "file") as path:
        assert path.read_bytes() == b"D" * 100
        assert set(cache.entries()) == {pubs[2].sha256, pubs[3].sha256}
        assert cache.total_bytes <= 250


def test_index_survives_restart_and_drops_partial_downloads(store, tmp_path):
    f = publish_file(store, _file(tmp_path / "a.safetensors", 50), "r")
    d = publish_folder(store, _folder(tmp_path / "ckpt"), "r")
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    fpath = cache.fetch(f.storage_key, f.sha256, "file")
    dpath = cache.fetch(d.storage_key, d.sha256, "folder")
    (tmp_path / "cache" / ".tmp-crashed").mkdir()
    store.delete(f.storage_key)
    again = ResourceCache(store, tmp_path / "cache", max_bytes=10_000)
    assert again.entries() == {f.sha256: 50, d.sha256: 330}
    assert again.fetch(f.storage_key, f.sha256, "file") == fpath
    assert again.fetch(d.storage_key, d.sha256, "folder") == dpath
    assert not (tmp_path / "cache" / ".tmp-crashed").exists()


def test_concurrent_fetches_download_once(store, tmp_path, monkeypatch):
    f = publish_file(store, _file(tmp_path / "a.safetensors", 5000), "r")
    cache = ResourceCache(store, tmp_path / "cache", max_bytes=100_000)
    calls = []
    real = store.download_file

    def counting(key, dest):
        calls.append(key)
        return real(key, dest)

    monkeypatch.setattr(store, "download_file", counting)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cache.fetch(f.storage_key, f.sha256, "file")))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 6
