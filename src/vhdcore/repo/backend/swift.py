"""Repository objects in Swift (``swift://container[/prefix]``): chunks go to 16
containers ``<container>_chunks_<0-f>`` (by the first hex digit of their ID), so no
single container database grows without bound; everything else lives in
``<container>``.  Write-once is ``If-None-Match: *`` (HTTP 412 when the object
exists)."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ...errors import StoreError, StoreNotFoundError
from ...store.retry import RetryExhausted, RetryPolicy, call_with_retry, is_transient_status
from ...store.swift_client import LISTING_PAGE, drop_connection, iter_listing, swift_auth_options
from .base import Backend, Data, T, _joined


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
