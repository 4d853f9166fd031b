"""One behavioural suite for both object stores: a local folder and S3 (moto's real HTTP server)."""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid
from pathlib import Path

import pytest
import requests

from genserve.core.config import load_settings
from genserve.core.errors import InvalidKey, InvalidRequest, NotFound, StorageError
from genserve.core.storage import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    object_store_from_settings,
    sha256_file,
    validate_key,
)

MiB = 1024 * 1024
BAD_KEYS = ["", "../x", "a/../../x", "/abs", "a//b", "a\\b", "a/", "./a", "a/./b", "a\x00b", "a\nb", "k" * 1025]


def make_s3_store(endpoint: str, **kw) -> S3ObjectStore:
    store = S3ObjectStore(
        f"gs-test-{uuid.uuid4().hex[:16]}",
        endpoint_url=endpoint,
        access_key_id="test",
        secret_access_key="test",
        **kw,
    )
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_server")
    return make_s3_store(endpoint, multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB)


def test_put_get_head_roundtrip(store: ObjectStore):
    info = store.put_bytes(
        "images/job1/0.png", b"\x89PNG-bytes", content_type="image/png", metadata={"Job-Id": "job1", "seed": "42"}
    )
    assert info.size == 10
    assert store.get_bytes("images/job1/0.png") == b"\x89PNG-bytes"
    head = store.head("images/job1/0.png")
    assert head.key == "images/job1/0.png"
    assert head.size == 10
    assert head.content_type == "image/png"
    assert head.metadata == {"job-id": "job1", "seed": "42"}  # names lower-cased, as S3 does
    assert head.etag
    assert store.exists("images/job1/0.png")


def test_content_type_guessed_from_key_when_not_given(store: ObjectStore):
    store.put_bytes("a/b.json", b"{}")
    store.put_bytes("a/blob", b"x")
    assert store.head("a/b.json").content_type == "application/json"
    assert store.head("a/blob").content_type == "application/octet-stream"


def test_overwrite_replaces_content_and_metadata(store: ObjectStore):
    store.put_bytes("k", b"old", metadata={"v": "1"})
    store.put_bytes("k", b"new!", metadata={"v": "2"})
    assert store.get_bytes("k") == b"new!"
    head = store.head("k")
    assert head.size == 4
    assert head.metadata == {"v": "2"}


def test_list_with_prefix_is_sorted_and_string_prefixed(store: ObjectStore):
    for key in ["loras/u2/b.safetensors", "loras/u1/a.safetensors", "loras/u10/c.safetensors", "images/x.png", "top"]:
        store.put_bytes(key, b"x")
    assert list(store.list("loras/")) == [
        "loras/u1/a.safetensors",
        "loras/u10/c.safetensors",
        "loras/u2/b.safetensors",
    ]
    assert list(store.list("loras/u1")) == ["loras/u1/a.safetensors", "loras/u10/c.safetensors"]
    assert list(store.list("nothing/")) == []
    assert list(store.list()) == [
        "images/x.png",
        "loras/u1/a.safetensors",
        "loras/u10/c.safetensors",
        "loras/u2/b.safetensors",
        "top",
    ]


def test_delete_and_exists(store: ObjectStore):
    store.put_bytes("d/x", b"1")
    store.put_bytes("d/y", b"2")
    store.delete("d/x")
    assert not store.exists("d/x")
    assert store.exists("d/y")
    assert list(store.list("d/")) == ["d/y"]
    store.delete("d/x")  # deleting again is not an error


def test_missing_object_is_not_found_everywhere(store: ObjectStore, tmp_path: Path):
    calls = [
        lambda: store.get_bytes("no/such"),
        lambda: store.head("no/such"),
        lambda: store.open_read("no/such"),
        lambda: store.download_file("no/such", tmp_path / "out.bin"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as exc_info:
            call()
        assert exc_info.value.code == "object_not_found"
        assert exc_info.value.http_status == 404
    assert not store.exists("no/such")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_refused_by_every_method(store: ObjectStore, key: str, tmp_path: Path):
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.head(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.download_file(key, tmp_path / "out"),
        lambda: store.presigned_get_url(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey) as exc_info:
            call()
        assert exc_info.value.code == "invalid_object_key"
        assert exc_info.value.http_status == 422
    with pytest.raises(InvalidKey):
        list(store.list("../"))


def test_validate_key_accepts_ordinary_keys():
    for key in ["a", "datasets/u1/job-7/dataset.zip", "images/ü/ß.png", "x.y/z_1", "k" * 1024, "..a/b.."]:
        assert validate_key(key) == key
    with pytest.raises(InvalidKey):
        validate_key("é" * 513)  # 1026 bytes in UTF-8


def test_invalid_metadata_refused_and_nothing_written(store: ObjectStore):
    with pytest.raises(InvalidRequest) as exc_info:
        store.put_bytes("m", b"x", metadata={"note": "caf\u00e9"})
    assert exc_info.value.code == "invalid_object_metadata"
    with pytest.raises(InvalidRequest):
        store.put_bytes("m", b"x", metadata={"bad name": "v"})
    assert not store.exists("m")


def test_multipart_upload_of_large_file(store: ObjectStore, tmp_path: Path):
    src = tmp_path / "big.safetensors"
    src.write_bytes(os.urandom(12 * MiB))
    info = store.put_file("loras/big.safetensors", src, metadata={"sha256": sha256_file(src)})
    assert info.size == 12 * MiB
    if isinstance(store, S3ObjectStore):
        # 12 MiB in 5 MiB parts: S3 names a multipart object's ETag "<md5-of-md5s>-<parts>".
        assert info.etag and info.etag.endswith("-3"), info.etag
    dest = tmp_path / "back" / "big.safetensors"
    assert store.download_file("loras/big.safetensors", dest) == dest
    assert sha256_file(dest) == sha256_file(src) == store.head("loras/big.safetensors").metadata["sha256"]


def test_small_file_is_a_single_part(store: ObjectStore, tmp_path: Path):
    src = tmp_path / "small.bin"
    src.write_bytes(b"s" * 1000)
    info = store.put_file("small.bin", src, content_type="application/x-test")
    assert info.content_type == "application/x-test"
    if isinstance(store, S3ObjectStore):
        assert info.etag == hashlib.md5(b"s" * 1000).hexdigest()


def test_put_file_missing_source_writes_nothing(store: ObjectStore, tmp_path: Path):
    with pytest.raises(StorageError):
        store.put_file("x", tmp_path / "absent.bin")
    assert not store.exists("x")


def test_open_read_streams(store: ObjectStore):
    data = os.urandom(3 * MiB + 17)
    store.put_bytes("stream/blob", data)
    chunks = []
    with store.open_read("stream/blob") as f:
        while block := f.read(64 * 1024):
            chunks.append(block)
    assert len(chunks) > 1
    assert b"".join(chunks) == data


def test_download_is_atomic(store: ObjectStore, tmp_path: Path):
    dest = tmp_path / "dl" / "model.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(b"previous version")
    with pytest.raises(NotFound):
        store.download_file("no/such", dest)
    assert dest.read_bytes() == b"previous version"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors"]

    store.put_bytes("m/model.safetensors", b"new version")
    store.download_file("m/model.safetensors", dest)
    assert dest.read_bytes() == b"new version"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors"]  # no temp file left


def test_presigned_get_url_fetches_the_object(store: ObjectStore):
    store.put_bytes("images/p.png", b"presigned body", content_type="image/png")
    url = store.presigned_get_url("images/p.png", expires_s=60)
    if isinstance(store, LocalObjectStore):
        assert url.startswith("file://")
        assert Path(url.removeprefix("file://")).read_bytes() == b"presigned body"
    else:
        resp = requests.get(url, timeout=10)
        assert resp.status_code == 200
        assert resp.content == b"presigned body"
        assert resp.headers["Content-Type"] == "image/png"
        # Without the signature the bucket refuses anonymous reads.
        assert requests.get(url.split("?", 1)[0], timeout=10).status_code == 403
    with pytest.raises(InvalidRequest):
        store.presigned_get_url("images/p.png", expires_s=0)


def test_local_store_stays_inside_its_root(tmp_path: Path):
    root = tmp_path / "objects"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalObjectStore(root)
    store.ensure_bucket()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey):
        store.get_bytes("link/secret")
    with pytest.raises(InvalidKey):
        store.put_bytes("link/planted", b"x")
    assert not (outside / "planted").exists()
    with pytest.raises(InvalidKey):
        store.put_bytes(".objstore/meta/x.json", b"{}")  # the sidecar area is reserved


def test_local_store_keeps_plain_files_and_no_temp_leftovers(tmp_path: Path):
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("a/b.txt", b"hello")
    assert (tmp_path / "objects" / "a" / "b.txt").read_bytes() == b"hello"
    assert list((tmp_path / "objects" / ".objstore" / "tmp").iterdir()) == []
    # A file an operator drops in by hand is an object too, with a guessed content type.
    (tmp_path / "objects" / "a" / "manual.png").write_bytes(b"png")
    head = store.head("a/manual.png")
    assert (head.size, head.content_type, head.metadata, head.etag) == (3, "image/png", {}, None)


def test_local_failed_write_keeps_previous_object(tmp_path: Path):
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("k", b"v1")

    with pytest.raises(TypeError):
        store.put_bytes("k", "text is not bytes")  # fails half-way through the write
    assert store.get_bytes("k") == b"v1"
    assert list((tmp_path / "objects" / ".objstore" / "tmp").iterdir()) == []


def test_s3_missing_bucket_created_and_failures_are_storage_errors(s3_server: str):
    store = S3ObjectStore(
        f"gs-new-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server, access_key_id="test", secret_access_key="test"
    )
    with pytest.raises(StorageError) as exc_info:
        store.put_bytes("k", b"x")  # bucket does not exist yet
    assert exc_info.value.code == "storage_error"
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    store.put_bytes("k", b"x")
    assert store.get_bytes("k") == b"x"

    dead = S3ObjectStore("gs-dead", endpoint_url="http://127.0.0.1:9", access_key_id="t", secret_access_key="t")
    with pytest.raises(StorageError):
        dead.get_bytes("k")


def test_s3_store_pickles_without_its_client(s3_server: str):
    store = make_s3_store(s3_server)
    store.put_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))  # house-rule-ok: our own object, pickled as Ray does
    assert clone.get_bytes("k") == b"v"


def test_object_store_from_settings(tmp_path: Path, s3_server: str):
    local = object_store_from_settings(load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path / "data")}))
    assert isinstance(local, LocalObjectStore)
    assert local.root == (tmp_path / "data" / "objects").resolve()

    bucket = f"gs-cfg-{uuid.uuid4().hex[:12]}"
    settings = load_settings(
        env={
            "GENSERVE_DATA_DIR": str(tmp_path / "data"),
            "GENSERVE_STORAGE_BACKEND": "s3",
            "GENSERVE_S3_ENDPOINT_URL": s3_server,
            "GENSERVE_S3_BUCKET": bucket,
            "GENSERVE_S3_ACCESS_KEY_ID": "test",
            "GENSERVE_S3_SECRET_ACCESS_KEY": "test",
            "GENSERVE_STORAGE__MULTIPART_THRESHOLD_BYTES": str(5 * MiB),
        }
    )
    s3 = object_store_from_settings(settings)
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.endpoint_url, s3.multipart_threshold_bytes) == (bucket, s3_server, 5 * MiB)
    s3.ensure_bucket()
    s3.put_bytes("hello", b"world")
    assert s3.get_bytes("hello") == b"world"


def test_object_not_found_is_a_not_found():
    assert issubclass(ObjectNotFound, NotFound)
    assert ObjectNotFound("x").code == "object_not_found"
