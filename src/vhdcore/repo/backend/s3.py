"""Repository objects under a prefix of an S3 bucket (``s3://bucket[/prefix]``):
write-once is ``If-None-Match: *`` where the server honours it, else a HEAD first
(the object's name is its content ID, so a racing duplicate holds the same bytes)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ...errors import StoreError, StoreNotFoundError
from ...store.retry import RetryExhausted, RetryPolicy, call_with_retry, is_transient_status
from ...store.s3_client import new_s3_client, s3_error_code
from .base import Backend, Data, T, _joined


class S3Backend(Backend):
    """Objects under a prefix of an S3 bucket."""

    def __init__(self, bucket: str, prefix: str = "", *, retry: RetryPolicy | None = None,
                 endpoint_url: str | None = None, env: Mapping[str, str] | None = None,
                 url: str | None = None, timeout: float = 60.0) -> None:
        env = os.environ if env is None else env
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self.retry = retry or RetryPolicy()
        self._client, _ = new_s3_client(endpoint_url, env, timeout=timeout,
                                        missing="s3:// repositories need boto3")
        self._conditional: bool | None = None

    _code = staticmethod(s3_error_code)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, ClientError):
                return is_transient_status(self._code(exc)[1])
            return isinstance(exc, (BotoCoreError, OSError))

        try:
            return call_with_retry(fn, self.retry, transient)
        except RetryExhausted as exc:
            raise StoreError(f"{self.url}: {what} failed: {exc}") from exc.last
        except ClientError as exc:
            code, status = self._code(exc)
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise StoreNotFoundError(f"{self.url}: {what}: not found ({code})") from exc
            raise StoreError(f"{self.url}: {what} failed: {code} (HTTP {status})") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (at ``init``)."""
        try:
            self._call("checking the bucket", lambda: self._client.head_bucket(Bucket=self.bucket))
        except StoreNotFoundError:
            self._call("creating the bucket",
                       lambda: self._client.create_bucket(Bucket=self.bucket))

    def put_once(self, key: str, data: Data) -> bool:
        from botocore.exceptions import ClientError

        k = self.prefix + key
        body = _joined(data)
        if self._conditional is not False:
            def put() -> bool:
                try:
                    self._client.put_object(Bucket=self.bucket, Key=k, Body=body,
                                            IfNoneMatch="*")
                except ClientError as exc:
                    code, status = self._code(exc)
                    if status == 412 or code == "PreconditionFailed":
                        return False
                    if status in (400, 501) or code in ("NotImplemented", "InvalidArgument"):
                        raise _NoConditional() from exc
                    raise
                return True
            try:
                wrote = self._call(f"writing {key}", put)
                if self._conditional is None and wrote:
                    self._conditional = True
                if not wrote:
                    self._touch(k)
                return wrote
            except _NoConditional:
                self._conditional = False
        # the server ignores conditional writes: look first (same name, same bytes)
        if self.exists(key):
            self._touch(k)
            return False
        self._call(f"writing {key}",
                   lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=body))
        return True

    def _touch(self, k: str) -> None:
        try:
            self._call("touching", lambda: self._client.copy_object(
                Bucket=self.bucket, Key=k, CopySource={"Bucket": self.bucket, "Key": k},
                MetadataDirective="REPLACE", Metadata={"touched": str(int(time.time()))}))
        except StoreError:
            pass

    def put(self, key: str, data: Data) -> None:
        body = _joined(data)
        self._call(f"writing {key}", lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=body))

    def get(self, key: str) -> bytes:
        def get() -> bytes:
            r = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return bytes(r["Body"].read())
        return self._call(f"reading {key}", get)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"checking {key}", lambda: self._client.head_object(
                Bucket=self.bucket, Key=self.prefix + key))
        except StoreNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing", lambda: self._client.list_objects_v2(**kw))
            for o in page.get("Contents", []):
                yield o["Key"][len(self.prefix):], o["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self.prefix + key))


class _NoConditional(Exception):
    pass
