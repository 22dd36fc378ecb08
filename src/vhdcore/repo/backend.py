"""Plain key/value object access for a repository, over a directory, Swift or S3.

A repository needs a handful of operations on named objects: write-once
create, overwrite (leases, verify state), read, list with modification
times, delete.  Keys are ``/``-separated relative names (``config``,
``chunks/ab12/<64 hex>``, ``images/web/<id>.json``).

* ``file:///dir`` (or a plain path): one file per key under ``dir``.  A
  write-once create writes a temporary file, fsyncs it, and links it to its
  name (``link`` fails when the name exists, so an existing object is never
  rewritten), then removes the temporary name.
* ``swift://container[/prefix]``: chunks go to 16 containers
  ``<container>_chunks_<0-f>`` (by the first hex digit of their ID), so no
  single container database grows without bound; everything else lives in
  ``<container>``.  Write-once is ``If-None-Match: *`` (HTTP 412 when the
  object exists).
* ``s3://bucket[/prefix]``: keys under ``prefix``; write-once is
  ``If-None-Match: *`` where the server honours it, else a HEAD first (the
  object's name is its content ID, so a racing duplicate holds the same
  bytes).

Every request goes through the store retry policy (:mod:`vhdcore.store.retry`).
"""
from __future__ import annotations

import os
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .. import _io
from ..errors import StoreError, StoreNotFoundError, UploadError, VhdError
from ..store.retry import RetryExhausted, RetryPolicy, call_with_retry, is_transient_status
from ..store.swift import LISTING_PAGE, drop_connection, iter_listing, swift_auth_options

__all__ = ["Backend", "DirectoryBackend", "SwiftBackend", "S3Backend", "open_backend",
           "Buffer"]

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
#: what a write takes: one buffer, or several written one after the other
Data = Buffer | tuple[Buffer, ...]


def _joined(data: Data) -> bytes:
    return b"".join(data) if isinstance(data, tuple) else bytes(data)


class Backend(ABC):
    """Named objects of one repository."""

    url: str = ""

    @abstractmethod
    def put_once(self, key: str, data: Data) -> bool:
        """Create ``key`` with ``data`` unless it exists; True if this call wrote it.
        An existing object is never rewritten (its modification time is refreshed,
        so that a concurrent ``gc`` sees it as fresh)."""

    @abstractmethod
    def put(self, key: str, data: Data) -> None:
        """Create or replace ``key`` at once (readers see the old or the new bytes)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`StoreNotFoundError` when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, modification time)`` of every key under ``prefix`` (any order)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error when absent)."""

    def mtime(self, key: str) -> float | None:
        """Modification time of ``key`` (None when absent)."""
        for k, t in self.list(key):
            if k == key:
                return t
        return None

    def close(self) -> None:
        """Release connections."""

    def describe(self) -> str:
        return self.url


# ------------------------------------------------------------------ directory
class DirectoryBackend(Backend):
    """Objects as files under a directory."""

    def __init__(self, root: str, *, durable: bool = True, url: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.durable = durable
        self.url = url or f"file://{self.root}"

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
            raise StoreError(f"{self.url}: invalid object name {key!r}")
        return os.path.join(self.root, *parts)

    def _tmp(self, path: str) -> str:
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{threading.get_ident()}.{time.monotonic_ns()}.tmp")

    def _write_tmp(self, tmp: str, data: Data) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pos = 0
            for part in (data if isinstance(data, tuple) else (data,)):
                _io.pwrite_all(fd, part, pos)
                pos += memoryview(part).nbytes
            if self.durable:
                _io.fsync(fd)
        finally:
            os.close(fd)

    def put_once(self, key: str, data: Data) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            _touch(path)
            return False
        try:
            tmp = self._tmp(path)
            try:
                self._write_tmp(tmp, data)
                try:
                    os.link(tmp, path)  # exclusive: fails if the name exists
                except FileExistsError:
                    _touch(path)
                    return False
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if self.durable:
                _io.fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise UploadError(f"{self.url}: writing {key} failed: {exc}") from exc
        return True

    def put(self, key: str, data: Data) -> None:
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _io.atomic_write(path, _joined(data) if isinstance(data, tuple) else data,
                             durable=self.durable)
        except OSError as exc:
            raise UploadError(f"{self.url}: writing {key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreNotFoundError(f"{self.url}: {key} does not exist") from None
        except OSError as exc:
            raise StoreError(f"{self.url}: reading {key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def mtime(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self.root
        start = prefix.rstrip("/")
        top = os.path.join(base, *start.split("/")) if start else base
        if os.path.isfile(top):
            yield start, os.stat(top).st_mtime
            return
        if not os.path.isdir(top):
            return
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = os.path.relpath(dirpath, base)
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                try:
                    t = os.stat(os.path.join(dirpath, fn)).st_mtime
                except FileNotFoundError:
                    continue
                yield (fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"), t

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"{self.url}: deleting {key} failed: {exc}") from exc


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


# ------------------------------------------------------------------ swift
class SwiftBackend(Backend):
    """Objects in Swift containers (chunks spread over 16 containers)."""

    def __init__(self, container: str, prefix: str = "", *, retry: RetryPolicy | None = None,
                 timeout: float = 60.0, env: Mapping[str, str] | None = None,
                 url: str | None = None, **auth: Any) -> None:
        try:
            import swiftclient.client  # noqa: F401
        except ImportError as exc:  # pragma: no cover
            raise StoreError("swift:// repositories need python-swiftclient") from exc
        if not container or "/" in container:
            raise StoreError(f"invalid Swift container name {container!r}")
        self.container = container
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url or f"swift://{container}/{self.prefix}"
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._kw = swift_auth_options(auth, os.environ if env is None else env)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._ready: set[str] = set()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            from swiftclient.client import Connection

            conn = Connection(retries=0, timeout=self.timeout, retry_on_ratelimit=False,
                              **self._kw)
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def _where(self, key: str) -> tuple[str, str]:
        if key.startswith("chunks/") and len(key) > 12:
            return f"{self.container}_chunks_{key[12]}", self.prefix + key
        return self.container, self.prefix + key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from swiftclient.exceptions import ClientException

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, ClientException):
                if exc.http_status is None:
                    return True
                return is_transient_status(exc.http_status)
            return isinstance(exc, OSError)

        def on_retry(exc: BaseException, n: int, d: float) -> None:
            drop_connection(self._local)

        try:
            return call_with_retry(fn, self.retry, transient, on_retry=on_retry)
        except RetryExhausted as exc:
            raise StoreError(f"{self.url}: {what} failed: {exc}") from exc.last
        except ClientException as exc:
            if exc.http_status == 404:
                raise StoreNotFoundError(f"{self.url}: {what}: not found") from exc
            raise StoreError(f"{self.url}: {what} failed: HTTP {exc.http_status}") from exc

    def _ensure(self, container: str) -> None:
        if container in self._ready:
            return
        self._call(f"creating container {container}", lambda: self._conn().put_container(container))
        self._ready.add(container)

    def ensure_containers(self) -> None:
        """Create the repository's containers (at ``init``)."""
        self._ensure(self.container)
        for d in "0123456789abcdef":
            self._ensure(f"{self.container}_chunks_{d}")

    def put_once(self, key: str, data: Data) -> bool:
        from swiftclient.exceptions import ClientException

        c, name = self._where(key)
        body = _joined(data)

        def put() -> bool:
            try:
                self._conn().put_object(c, name, body, headers={"If-None-Match": "*"})
            except ClientException as exc:
                if exc.http_status == 412:
                    return False
                raise
            return True

        wrote = self._call(f"writing {key}", put)
        if not wrote:
            # refresh its time for a concurrent gc (POST updates last-modified)
            try:
                self._call(f"touching {key}", lambda: self._conn().post_object(
                    c, name, headers={"X-Object-Meta-Touched": str(int(time.time()))}))
            except StoreError:
                pass
        return wrote

    def put(self, key: str, data: Data) -> None:
        c, name = self._where(key)
        body = _joined(data)
        self._call(f"writing {key}", lambda: self._conn().put_object(c, name, body))

    def get(self, key: str) -> bytes:
        c, name = self._where(key)
        _, body = self._call(f"reading {key}", lambda: self._conn().get_object(c, name))
        return bytes(body)

    def exists(self, key: str) -> bool:
        c, name = self._where(key)
        try:
            self._call(f"checking {key}", lambda: self._conn().head_object(c, name))
        except StoreNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        import datetime

        if prefix.startswith("chunks"):
            containers = [f"{self.container}_chunks_{d}" for d in "0123456789abcdef"]
        else:
            containers = [self.container]
        for c in containers:
            def page(marker: str, c: str = c) -> list[dict[str, Any]]:
                _, objs = self._call(f"listing {c}", lambda: self._conn().get_container(
                    c, prefix=self.prefix + prefix, marker=marker, limit=LISTING_PAGE))
                found: list[dict[str, Any]] = objs
                return found

            try:  # a page at a time: never the whole listing in memory
                for o in iter_listing(page):
                    t = datetime.datetime.fromisoformat(o["last_modified"]).replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                    yield o["name"][len(self.prefix):], t
            except StoreNotFoundError:
                continue

    def delete(self, key: str) -> None:
        c, name = self._where(key)
        try:
            self._call(f"deleting {key}", lambda: self._conn().delete_object(c, name))
        except StoreNotFoundError:
            pass

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()


# ------------------------------------------------------------------ s3
class S3Backend(Backend):
    """Objects under a prefix of an S3 bucket."""

    def __init__(self, bucket: str, prefix: str = "", *, retry: RetryPolicy | None = None,
                 endpoint_url: str | None = None, env: Mapping[str, str] | None = None,
                 url: str | None = None, timeout: float = 60.0) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover
            raise StoreError("s3:// repositories need boto3") from exc
        env = os.environ if env is None else env
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self.retry = retry or RetryPolicy()
        config = Config(s3={"addressing_style": "path"},
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"max_attempts": 1, "mode": "standard"},
                        connect_timeout=min(timeout, 20.0), read_timeout=timeout,
                        max_pool_connections=16)
        endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        self._client = boto3.session.Session(
            region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"
        ).client("s3", endpoint_url=endpoint or None, config=config)
        self._conditional: bool | None = None

    def _code(self, exc: BaseException) -> tuple[str, int | None]:
        resp = getattr(exc, "response", None) or {}
        return (str((resp.get("Error") or {}).get("Code", "")),
                (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode"))

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


def open_backend(url: str, *, durable: bool = True, **options: Any) -> Backend:
    """The backend for a repository URL: ``file:///dir`` or a path,
    ``swift://container[/prefix]``, ``s3://bucket[/prefix]``."""
    if not url:
        raise VhdError("no repository given (use --repo URL or set VHDCORE_REPO)")
    if "://" not in url:
        return DirectoryBackend(url, durable=durable)
    p = urllib.parse.urlparse(url)
    scheme = p.scheme.lower()
    if scheme == "file":
        if p.netloc not in ("", "localhost"):
            raise StoreError(f"{url!r}: file URLs must be local (file:///dir)")
        return DirectoryBackend(urllib.parse.unquote(p.path), durable=durable, url=url)
    first = urllib.parse.unquote(p.netloc)
    rest = urllib.parse.unquote(p.path).strip("/")
    if not first:
        raise StoreError(f"{url!r}: expected {scheme}://container-or-bucket[/prefix]")
    if scheme == "swift":
        return SwiftBackend(first, rest, url=url, **options)
    if scheme == "s3":
        return S3Backend(first, rest, url=url, **options)
    raise StoreError(f"unknown repository URL scheme {p.scheme!r} in {url!r}: use file:///dir, "
                     "swift://container[/prefix] or s3://bucket[/prefix]")
