"""OpenStack Swift (and Rackspace Cloud Files) as a target: ``swift://container/name``.

Segments go to the container ``<container>_segments`` as ``<name>/00000000``,
``<name>/00000001``, ... (the primary generation; a re-image over an image
stored there writes ``<name>/g<hex>/00000000``... instead, see
:mod:`vhdcore.store.base`), each PUT with its MD5 as ``ETag`` so that Swift
verifies it.  The image itself is a Static Large Object manifest PUT with
``?multipart-manifest=put`` (Swift checks every segment's size and ETag
again); the image metadata rides on it as ``X-Object-Meta-Vhdcore-*``
headers.  A GET of ``swift://container/name`` therefore returns the whole
compressed stream, which ``lz4 -d`` decompresses.

Credentials: see :mod:`vhdcore.store.swift_client`.

Requests are retried by :mod:`vhdcore.store.retry` (swiftclient's own retries
are off; it still re-authenticates once when a token expires).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import StoreAuthError, StoreError, StoreNotFoundError, UploadError, VhdError
from .base import (
    ImageEntry, Manifest, SegmentData, SegmentInfo, SegmentLimits, Store, check_metadata, decode_meta_value, encode_meta_value, is_vhdcore_metadata, segment_body)
from .retry import RetryPolicy, is_transient_status
from .swift_client import (
    DEFAULT_SWIFT_LIMITS,
    LISTING_PAGE,
    drop_connection,
    iter_listing,
    limits_from_info,
    swift_auth_options,
    swift_time,
)

__all__ = ["SwiftStore", "swift_auth_options", "DEFAULT_SWIFT_LIMITS"]

_META_PREFIX = "x-object-meta-vhdcore-"
_CONTENT_TYPE = "application/x-lz4"
#: a segment object's name after ``<name>/``: ``00000000`` or ``g<hex>/00000000``
_SEGMENT_REST_RE = re.compile(r"^(?:(g[0-9a-f]{12})/)?(\d{8})$")


class SwiftStore(Store):
    """An image as a Swift Static Large Object.

    Options: credentials (see the module doc), ``timeout`` (seconds per
    request, default 60), ``retry`` (:class:`RetryPolicy`),
    ``segment_container`` (default ``<container>_segments``),
    ``create_container`` (create the image container if missing; default
    False: a missing container is a :class:`StoreNotFoundError`;
    :meth:`prepare_write`, which the imaging job calls, creates it as
    ``swift upload`` does).
    """

    scheme = "swift"

    def __init__(
        self,
        container: str,
        name: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        segment_container: str | None = None,
        create_container: bool = False,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
        **auth: Any,
    ) -> None:
        try:
            import swiftclient.client  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StoreError(
                "swift:// targets need python-swiftclient, a dependency of vhdcore: "
                "pip install python-swiftclient"
            ) from exc
        if not container or "/" in container:
            raise StoreError(f"invalid Swift container name {container!r}")
        if not name:
            raise StoreError(f"swift://{container}/ needs an object name")
        super().__init__(url or f"swift://{container}/{name}", retry)
        self.container = container
        self.name = name
        self.segment_container = segment_container or f"{container}_segments"
        self.create_container = create_container
        self.timeout = timeout
        self._conn_kwargs = swift_auth_options(auth, os.environ if env is None else env)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._shared_auth: tuple[str, str] | None = None
        self._container_headers: dict[str, str] | None = None
        self._setup_lock = threading.Lock()
        self._segment_container_ready = False
        self._limits: SegmentLimits | None = None
        self._manifest_paths: dict[int, tuple[str, str]] = {}

    # -- connections and errors --------------------------------------------
    def describe(self) -> str:
        return f"swift://{self.container}/{self.name}"

    def _new_connection(self) -> Any:
        from swiftclient.client import Connection

        kw = dict(self._conn_kwargs)
        if self._shared_auth is not None and "preauthtoken" not in kw:
            kw["preauthurl"], kw["preauthtoken"] = self._shared_auth
        return Connection(retries=0, timeout=self.timeout, retry_on_ratelimit=False, **kw)

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._shared_auth is None and "preauthtoken" not in self._conn_kwargs:
                    first = self._new_connection()
                    self._shared_auth = self._call("authentication", first.get_auth)
                    first.close()
                conn = self._new_connection()
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def _on_retry(self, exc: BaseException, retry: int, delay: float) -> None:
        drop_connection(self._local)

    def _listing(self, what: str, container: str, prefix: str | None) -> list[dict[str, Any]]:
        """The objects of ``container`` under ``prefix`` (StoreNotFoundError
        when the container does not exist)."""
        return list(iter_listing(lambda marker: self._call(what, lambda: self._conn().get_container(
            container, prefix=prefix, marker=marker, limit=LISTING_PAGE))[1]))

    def _is_transient(self, exc: BaseException) -> bool:
        from swiftclient.exceptions import ClientException

        if isinstance(exc, ClientException):
            if exc.http_status is None:
                # connection-level failures that swiftclient wraps
                return isinstance(exc.__cause__ or exc.__context__, OSError)
            return is_transient_status(exc.http_status)
        if isinstance(exc, OSError):
            return "certificate verify" not in str(exc)
        return isinstance(exc, http.client.HTTPException)

    def _translate(self, exc: BaseException, what: str, upload: bool) -> VhdError:
        from swiftclient.exceptions import ClientException

        where = self.describe()
        if isinstance(exc, ClientException):
            status = exc.http_status
            body = exc.http_response_content
            detail = (
                f" ({body.decode('utf-8', 'replace')[:500] if isinstance(body, bytes) else str(body)[:500]})"
                if body
                else ""
            )
            if status in (401, 403):
                target = self._conn_kwargs.get("authurl") or self._conn_kwargs.get("preauthurl")
                return StoreAuthError(f"{where}: {what}: credentials rejected (HTTP {status}) by {target}")
            if status == 404:
                return StoreNotFoundError(f"{where}: {what}: not found (HTTP 404){detail}")
            msg = f"{where}: {what} failed: {exc.msg} (HTTP {status}){detail}"
        else:
            msg = f"{where}: {what} failed: {type(exc).__name__}: {exc}"
        return UploadError(msg) if upload else StoreError(msg)

    # -- containers and limits ----------------------------------------------
    def _check_container(self) -> dict[str, str]:
        """HEAD the image container (once); create it if asked to."""
        if self._container_headers is not None:
            return self._container_headers
        try:
            headers = self._call(
                f"checking container {self.container!r}",
                lambda: self._conn().head_container(self.container),
            )
        except StoreNotFoundError:
            if not self.create_container:
                raise StoreNotFoundError(
                    f"{self.describe()}: container {self.container!r} does not exist "
                    "(create it first, or pass create_container=True)"
                ) from None
            self._call(
                f"creating container {self.container!r}",
                lambda: self._conn().put_container(self.container),
                upload=True,
            )
            headers = {}
        self._container_headers = dict(headers)
        return self._container_headers

    def prepare_write(self, *, create: bool = True) -> None:
        if create:
            self.create_container = True
        self._ensure_segment_container()

    def list_images(self, prefix: str) -> list[ImageEntry]:
        try:
            listing = self._listing(f"listing container {self.container!r}", self.container, prefix or None)
        except StoreNotFoundError:
            raise StoreNotFoundError(f"swift://{self.container}: container {self.container!r} does not exist") from None
        found: dict[str, ImageEntry] = {}
        for item in listing:
            name = str(item.get("name", ""))
            if item.get("content_type", "").split(";")[0] != _CONTENT_TYPE:
                continue
            img = SwiftStore.__new__(SwiftStore)
            img.__dict__.update(self.__dict__)
            img.name = name
            img.url = f"swift://{self.container}/{name}"
            img._manifest_paths = {}
            try:
                man = img.get_manifest()
            except StoreError:
                continue
            vs = man.metadata.get("virtual-size")
            found[name] = ImageEntry(
                name, img.url, man.compressed_size, len(man.segments),
                swift_time(item.get("last_modified")), True, int(vs) if vs and vs.isdigit() else None,
            )
        try:
            segs = self._listing(f"listing container {self.segment_container!r}",
                                 self.segment_container, prefix or None)
        except StoreNotFoundError:
            segs = []
        partial: dict[str, list[dict[str, Any]]] = {}
        for item in segs:
            name, _, tail = str(item.get("name", "")).rpartition("/")
            if name and len(tail) == 8 and tail.isdigit() and name not in found:
                partial.setdefault(name, []).append(item)
        for name, items in partial.items():
            times = [t for t in (swift_time(i.get("last_modified")) for i in items) if t is not None]
            found[name] = ImageEntry(
                name, f"swift://{self.container}/{name}", sum(int(i.get("bytes", 0)) for i in items),
                len(items), max(times) if times else None, False,
            )
        return [found[k] for k in sorted(found)]

    def _ensure_segment_container(self) -> None:
        if self._segment_container_ready:
            return
        with self._setup_lock:
            if self._segment_container_ready:
                return
            headers = self._check_container()
            try:
                self._call(
                    f"checking container {self.segment_container!r}",
                    lambda: self._conn().head_container(self.segment_container),
                )
            except StoreNotFoundError:
                policy = headers.get("x-storage-policy")
                put_headers = {"X-Storage-Policy": policy} if policy else {}
                self._call(
                    f"creating container {self.segment_container!r}",
                    lambda: self._conn().put_container(self.segment_container, headers=put_headers),
                    upload=True,
                )
            self._segment_container_ready = True

    def segment_limits(self) -> SegmentLimits:
        if self._limits is not None:
            return self._limits
        try:
            info = self._call("reading cluster capabilities (GET /info)", self._get_info)
        except StoreAuthError:
            raise
        except StoreError:
            info = {}
        segment = f"/{self.segment_container}/{self.name}/00000000"
        self._limits = limits_from_info(info, segment)
        return self._limits

    def _get_info(self) -> dict[str, Any]:
        conn = self._conn()
        from swiftclient.client import Connection

        probe = Connection(retries=0, timeout=self.timeout, preauthurl=conn.url, preauthtoken=conn.token)
        try:
            info: dict[str, Any] = probe.get_capabilities()
            return info
        finally:
            probe.close()

    # -- segments -------------------------------------------------------------
    def _segment_object(self, index: int, generation: str | None = None) -> str:
        if index < 0 or index > 99_999_999:
            raise ValueError(f"segment index {index} out of range")
        gen = self.generation if generation is None else generation
        return f"{self.name}/{gen}/{index:08d}" if gen else f"{self.name}/{index:08d}"

    def put_segment(self, index: int, data: SegmentData, md5_hex: str) -> str:
        self._ensure_segment_container()
        obj = self._segment_object(index)
        size = len(data)

        def put() -> str:
            # frames go out as a file (swiftclient sends any other iterable
            # with chunked transfer encoding): read in pieces, never joined
            etag: str = self._conn().put_object(
                self.segment_container,
                obj,
                contents=segment_body(data),
                content_length=size,
                etag=md5_hex,
                content_type=_CONTENT_TYPE,
            )
            return etag

        etag = self._call(f"uploading segment {index} ({size} bytes)", put, upload=True)
        etag = (etag or "").strip('"')
        if etag and etag != md5_hex:
            raise UploadError(
                f"{self.describe()}: segment {index}: server stored ETag {etag}, expected {md5_hex}"
            )
        return etag or md5_hex

    def list_segments(self) -> dict[int, SegmentInfo]:
        self._check_container()
        prefix = f"{self.name}/{self.generation}/" if self.generation else f"{self.name}/"
        try:
            listing = self._listing(f"listing segments in {self.segment_container!r}", self.segment_container, prefix)
        except StoreNotFoundError:
            return {}
        found: dict[int, SegmentInfo] = {}
        for item in listing:
            rest = item.get("name", "")[len(prefix) :]
            if len(rest) == 8 and rest.isdigit():
                index = int(rest)
                found[index] = SegmentInfo(index, int(item["bytes"]), str(item["hash"]))
        return found

    def get_segment(self, index: int) -> bytes:
        container, obj = self._manifest_paths.get(index) or (
            self.segment_container,
            self._segment_object(index),
        )
        _, body = self._call(
            f"downloading segment {index} ({container}/{obj})",
            lambda: self._conn().get_object(container, obj),
        )
        data: bytes = body
        return data

    # -- manifest ----------------------------------------------------------------
    def put_manifest(self, segments: list[SegmentInfo], metadata: Mapping[str, str]) -> None:
        meta = check_metadata(metadata)
        doc = [
            {
                "path": f"/{self.segment_container}/{self._segment_object(s.index)}",
                "etag": s.etag,
                "size_bytes": s.size,
            }
            for s in segments
        ]
        body = json.dumps(doc).encode()
        headers = {f"X-Object-Meta-Vhdcore-{k}": encode_meta_value(v) for k, v in meta.items()}

        def put() -> str:
            etag: str = self._conn().put_object(
                self.container,
                self.name,
                contents=body,
                content_length=len(body),
                content_type=_CONTENT_TYPE,
                headers=headers,
                query_string="multipart-manifest=put",
            )
            return etag

        self._call(f"writing the manifest ({len(segments)} segments)", put, upload=True)

    def get_manifest(self) -> Manifest:
        try:
            headers = self._call(
                "reading the image", lambda: self._conn().head_object(self.container, self.name)
            )
        except StoreNotFoundError:
            raise StoreNotFoundError(
                f"{self.describe()}: no such image (container {self.container!r} or object "
                f"{self.name!r} does not exist, or the upload did not finish)"
            ) from None
        metadata = {
            k[len(_META_PREFIX) :]: decode_meta_value(v)
            for k, v in headers.items()
            if k.lower().startswith(_META_PREFIX)
        }
        if not is_vhdcore_metadata(metadata):
            raise StoreError(
                f"{self.describe()} is not a vhdcore image: it has no X-Object-Meta-Vhdcore-* metadata"
            )
        if str(headers.get("x-static-large-object", "")).lower() != "true":
            raise StoreError(f"{self.describe()} is not a vhdcore image: not a Static Large Object")
        _, body = self._call(
            "reading the manifest",
            lambda: self._conn().get_object(self.container, self.name, query_string="multipart-manifest=get"),
        )
        try:
            entries = json.loads(body)
            segments = []
            paths = {}
            generation = ""
            for pos, entry in enumerate(entries):
                path = entry.get("name") or entry["path"]
                container, _, obj = path.lstrip("/").partition("/")
                etag = entry.get("hash") or entry["etag"]
                size = entry["bytes"] if "bytes" in entry else entry["size_bytes"]
                segments.append(SegmentInfo(pos, int(size), str(etag)))
                paths[pos] = (container, obj)
                m = _SEGMENT_REST_RE.match(obj[len(self.name) + 1 :]) if obj.startswith(
                    f"{self.name}/") else None
                if pos == 0 and m:
                    generation = m.group(1) or ""
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{self.describe()}: damaged SLO manifest ({exc})") from exc
        self._manifest_paths = paths
        return Manifest(segments, metadata, generation)

    def delete(self) -> None:
        try:
            self._call(
                "deleting the image and its segments",
                lambda: self._conn().delete_object(
                    self.container, self.name, query_string="multipart-manifest=delete"
                ),
            )
        except StoreNotFoundError:
            pass
        prefix = f"{self.name}/"
        try:
            self._check_container()
            listing = self._listing(f"listing segments in {self.segment_container!r}", self.segment_container, prefix)
        except StoreNotFoundError:
            return
        leftovers = sorted(
            item.get("name", "") for item in listing if _SEGMENT_REST_RE.match(item.get("name", "")[len(prefix) :])
        )
        for obj in leftovers:
            try:
                self._call(
                    f"deleting segment {obj!r}",
                    functools.partial(self._delete_segment_object, obj),
                )
            except StoreNotFoundError:
                pass

    def prune(self) -> int:
        self.get_manifest()
        used = set(self._manifest_paths.values())
        prefix = f"{self.name}/"
        try:
            listing = self._listing(f"listing segments in {self.segment_container!r}", self.segment_container, prefix)
        except StoreNotFoundError:
            return 0
        removed = 0
        for item in listing:
            obj = item.get("name", "")
            if not _SEGMENT_REST_RE.match(obj[len(prefix) :]) or (self.segment_container, obj) in used:
                continue
            try:
                self._call(f"deleting {obj!r}", functools.partial(self._delete_segment_object, obj))
                removed += 1
            except StoreNotFoundError:
                pass
        return removed

    def _delete_segment_object(self, obj: str) -> None:
        self._conn().delete_object(self.segment_container, obj)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        self._local = threading.local()

