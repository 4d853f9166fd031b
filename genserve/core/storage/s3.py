"""The S3 object store: any S3-protocol server through boto3."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from genserve.core.errors import StorageError

if TYPE_CHECKING:
    from genserve.core.config import StorageConfig

from genserve.core.storage.base import (  # the contract both backends share
    _COPY_CHUNK,
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    _atomic_destination,
    _check_expiry,
    _content_type,
    _normalize_metadata,
    _validate_prefix,
    validate_key,
)


class _StreamingBodyReader(io.RawIOBase):
    """Adapts botocore's StreamingBody to a raw stream, so callers get a normal buffered reader."""

    def __init__(self, body: Any, key: str):
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except Exception as exc:  # noqa: BLE001 - any transport failure mid-stream
            raise StorageError(f"reading object {self._key!r} failed: {exc}", details={"key": self._key}) from exc
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket (or any S3-protocol store) through boto3.

    The client is created lazily and dropped when pickled, so a store can be handed to a Ray
    actor; each process then opens its own connection pool.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "path",
        multipart_threshold_bytes: int = 8 * 1024 * 1024,
        multipart_chunk_bytes: int = 8 * 1024 * 1024,
        presign_expiry_s: int = 3600,
    ):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self.addressing_style = addressing_style
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_chunk_bytes = multipart_chunk_bytes
        self.presign_expiry_s = presign_expiry_s
        self._client: Any = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> S3ObjectStore:
        return cls(
            cfg.s3_bucket,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            access_key_id=cfg.s3_access_key_id.get_secret_value() if cfg.s3_access_key_id else None,
            secret_access_key=cfg.s3_secret_access_key.get_secret_value() if cfg.s3_secret_access_key else None,
            addressing_style=cfg.s3_addressing_style,
            multipart_threshold_bytes=cfg.multipart_threshold_bytes,
            multipart_chunk_bytes=cfg.multipart_chunk_bytes,
            presign_expiry_s=cfg.presign_expiry_s,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret_access_key,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": self.addressing_style},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold_bytes, multipart_chunksize=self.multipart_chunk_bytes
        )

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Map boto3 failures to ObjectNotFound / StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        details = {"bucket": self.bucket, **({"key": key} if key else {})}
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"no object {key!r}", details=details) from exc
            raise StorageError(f"S3 {action} failed: {code} {err.get('Message', '')}".strip(), details=details) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageError(f"S3 {action} failed: {exc}", details=details) from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors("head_bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with self._errors("create_bucket"):
            try:
                self.client.create_bucket(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key, data, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        validate_key(key)
        meta = _normalize_metadata(metadata)
        with self._errors("put_object", key):
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=bytes(data), ContentType=_content_type(key, content_type), Metadata=meta
            )
        return self.head(key)

    def put_file(self, key, path, content_type=None, metadata=None) -> ObjectInfo:  # noqa: ANN001
        validate_key(key)
        meta = _normalize_metadata(metadata)
        if not Path(path).is_file():
            raise StorageError(f"cannot read {path}: not a file", details={"path": str(path)})
        with self._errors("upload", key):
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": _content_type(key, content_type), "Metadata": meta},
                Config=self._transfer_config(),
            )
        return self.head(key)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key: str) -> BinaryIO:
        validate_key(key)
        with self._errors("get_object", key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return io.BufferedReader(_StreamingBodyReader(body, key), buffer_size=_COPY_CHUNK)  # type: ignore[return-value]

    def download_file(self, key: str, dest_path: str | Path) -> Path:
        validate_key(key)
        dest = Path(dest_path)
        with self._errors("download", key), _atomic_destination(dest) as tmp:
            self.client.download_file(self.bucket, key, str(tmp), Config=self._transfer_config())
        return dest

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def head(self, key: str) -> ObjectInfo:
        validate_key(key)
        with self._errors("head_object", key):
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            content_type=resp.get("ContentType") or DEFAULT_CONTENT_TYPE,
            metadata=dict(resp.get("Metadata") or {}),
            etag=(resp.get("ETag") or "").strip('"') or None,
        )

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._errors("delete_object", key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def list(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)  # here, not in the generator, so a bad prefix fails at the call
        return self._iter_keys(prefix)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list_objects_v2"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"]

    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        validate_key(key)
        expiry = _check_expiry(self.presign_expiry_s if expires_s is None else expires_s)
        with self._errors("presign", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expiry
            )
