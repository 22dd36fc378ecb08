"""S3 (and S3-compatible stores, such as Swift's s3api) as a target: ``s3://bucket/key``.

Segment ``i`` is part ``i + 1`` of a multipart upload of ``key``, sent with
its ``Content-MD5`` so the server verifies it.  Completing the multipart
upload is the manifest step; then a small JSON record ``<key>.vhdcore.json``
is written beside the object with the segment table and the image metadata.
S3 fixes an object's user metadata when the multipart upload *starts*, but the
image's SHA-256 is only known at the end, so the record holds it; the object
carries ``vhdcore-version`` and ``codec`` as user metadata.

Generations (see :mod:`vhdcore.store.base`): the primary generation's
object is ``key`` itself; a re-image over an image stored there uploads to
``<key>.vhdcore-g<hex>`` instead, the record names the generation, and
writing the record is the switch.  Completing the new multipart upload
therefore never replaces the object the current record points at.

Resume: an unfinished multipart upload of the generation's object is found
with ``ListMultipartUploads`` and its parts with ``ListParts``.

Endpoint from the ``endpoint_url`` option or ``AWS_ENDPOINT_URL``; credentials
as boto3 finds them (``AWS_ACCESS_KEY_ID``...), or options
``access_key``/``secret_key``/``region``.  Path-style addressing; checksums
only where required (S3-compatible servers reject the newer CRC trailers).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any

from .._version import __version__
from ..errors import StoreAuthError, StoreError, StoreNotFoundError, UploadError, VhdError
from .base import (
    GiB, MiB, ImageEntry, Manifest, SegmentData, SegmentInfo, SegmentLimits, Store, check_metadata, _GENERATION_RE, md5_base64, segment_body)
from .retry import RetryPolicy
from .s3_client import (
    AUTH_CODES,
    NOT_FOUND_CODES,
    is_transient_s3,
    multipart_etag,
    new_s3_client,
    s3_error_code,
)
from .s3_record import RECORD_SUFFIX, decode_record, encode_record

__all__ = ["S3Store", "AWS_S3_LIMITS", "multipart_etag"]

#: AWS S3's multipart limits
AWS_S3_LIMITS = SegmentLimits(5 * MiB, 5 * GiB, 10_000)
_GENERATION_INFIX = ".vhdcore-"
_CONTENT_TYPE = "application/x-lz4"


class S3Store(Store):
    """An image as an S3 multipart object.

    Options: ``endpoint_url``, ``access_key``, ``secret_key``, ``region``,
    ``max_parts`` (default: the server's if it tells -- Swift's s3api does via
    ``GET /info`` -- else 10,000), ``timeout``, ``retry``, ``max_connections``.
    """

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        max_parts: int | None = None,
        timeout: float = 60.0,
        max_connections: int = 16,
        retry: RetryPolicy | None = None,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
    ) -> None:
        if not bucket or not key:
            raise StoreError(f"s3 URL needs a bucket and a key, got bucket={bucket!r} key={key!r}")
        super().__init__(url or f"s3://{bucket}/{key}", retry)
        env = os.environ if env is None else env
        self.bucket = bucket
        self.key = key
        self.record_key = key + RECORD_SUFFIX
        self._max_parts = max_parts
        self._client, self.endpoint_url = new_s3_client(
            endpoint_url, env, access_key=access_key, secret_key=secret_key, region=region,
            timeout=timeout, max_connections=max_connections,
            missing="s3:// targets need boto3, which is not installed: pip install 'vhdcore[s3]'")
        self._lock = threading.Lock()
        self._upload_id: str | None = None
        self._bucket_checked = False
        self._limits: SegmentLimits | None = None
        self._offsets: dict[int, tuple[int, int]] | None = None
        self._read_key = key

    # -- generations ------------------------------------------------------------
    def data_key(self, generation: str | None = None) -> str:
        """The object holding the stream of ``generation`` (default: the upload's)."""
        gen = self.generation if generation is None else generation
        return f"{self.key}{_GENERATION_INFIX}{gen}" if gen else self.key

    def set_generation(self, generation: str) -> None:
        super().set_generation(generation)
        with self._lock:
            self._upload_id = None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    # -- errors ---------------------------------------------------------------
    _error_code = staticmethod(s3_error_code)

    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient_s3(exc)

    def _translate(self, exc: BaseException, what: str, upload: bool) -> VhdError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = self.describe()
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAuthError(
                f"{where}: {what}: no S3 credentials ({exc}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, ClientError):
            code, status = self._error_code(exc)
            if code in AUTH_CODES or status in (401, 403):
                return StoreAuthError(
                    f"{where}: {what}: credentials rejected by {self.endpoint_url or 'AWS'} ({code}, HTTP {status})"
                )
            if code in NOT_FOUND_CODES or status == 404:
                return StoreNotFoundError(f"{where}: {what}: not found ({code or 'HTTP 404'})")
            msg = f"{where}: {what} failed: {code} (HTTP {status}): {exc}"
        else:
            msg = f"{where}: {what} failed: {type(exc).__name__}: {exc}"
        return UploadError(msg) if upload else StoreError(msg)

    # -- bucket, limits, upload id ----------------------------------------------
    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        try:
            self._call(
                f"checking bucket {self.bucket!r}", lambda: self._client.head_bucket(Bucket=self.bucket)
            )
        except StoreNotFoundError:
            raise StoreNotFoundError(f"{self.describe()}: bucket {self.bucket!r} does not exist") from None
        self._bucket_checked = True

    def prepare_write(self, *, create: bool = True) -> None:
        self._check_bucket()

    def list_images(self, prefix: str) -> list[ImageEntry]:
        self._check_bucket()
        found: dict[str, ImageEntry] = {}
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        objects: dict[str, dict[str, Any]] = {}
        while True:
            resp = self._call("listing objects", lambda: self._client.list_objects_v2(**kwargs))
            for obj in resp.get("Contents", []):
                objects[str(obj["Key"])] = obj
            if not resp.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = resp.get("NextContinuationToken")
        for key, obj in objects.items():
            if not key.endswith(RECORD_SUFFIX) or key[: -len(RECORD_SUFFIX)] not in objects:
                continue
            name = key[: -len(RECORD_SUFFIX)]
            img = S3Store.__new__(S3Store)
            img.__dict__.update(self.__dict__)
            img.key, img.record_key, img.url = name, key, f"s3://{self.bucket}/{name}"
            img._offsets = None
            try:
                man = img.get_manifest()
            except StoreError:
                continue
            vs = man.metadata.get("virtual-size")
            modified = objects[name].get("LastModified")
            found[name] = ImageEntry(
                name, img.url, man.compressed_size, len(man.segments),
                modified.timestamp() if modified is not None else None, True,
                int(vs) if vs and vs.isdigit() else None,
            )
        resp = self._call(
            "listing multipart uploads",
            lambda: self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix),
        )
        for upload in resp.get("Uploads", []):
            name = str(upload.get("Key", ""))
            if not name or name in found:
                continue
            img = S3Store.__new__(S3Store)
            img.__dict__.update(self.__dict__)
            img.key, img.record_key, img.url = name, name + RECORD_SUFFIX, f"s3://{self.bucket}/{name}"
            img._upload_id = str(upload["UploadId"])
            segs = img.list_segments()
            initiated = upload.get("Initiated")
            found[name] = ImageEntry(
                name, img.url, sum(s.size for s in segs.values()), len(segs),
                initiated.timestamp() if initiated is not None else None, False,
            )
        return [found[k] for k in sorted(found)]

    def segment_limits(self) -> SegmentLimits:
        if self._limits is None:
            min_size, max_parts = AWS_S3_LIMITS.min_segment_size, AWS_S3_LIMITS.max_segments
            info = self._server_info().get("s3api") or {}
            max_parts = int(info.get("max_upload_part_num", max_parts))
            min_size = int(info.get("min_segment_size", min_size))
            if self._max_parts is not None:
                max_parts = self._max_parts
            self._limits = SegmentLimits(min_size, AWS_S3_LIMITS.max_segment_size, max_parts)
        return self._limits

    def _server_info(self) -> dict[str, Any]:
        """Swift's ``/info`` if the endpoint is a Swift proxy with s3api, else ``{}``."""
        if not self.endpoint_url:
            return {}
        try:
            with urllib.request.urlopen(self.endpoint_url.rstrip("/") + "/info", timeout=5) as resp:
                info = json.loads(resp.read(1 << 20))
            return info if isinstance(info, dict) else {}
        except Exception:
            return {}

    def _find_upload(self) -> str | None:
        """The newest unfinished multipart upload of this key, if any."""
        uploads: list[dict[str, Any]] = []
        key = self.data_key()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            resp = self._call(
                "listing multipart uploads", lambda: self._client.list_multipart_uploads(**kwargs)
            )
            uploads += [u for u in resp.get("Uploads", []) if u.get("Key") == key]
            if not resp.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=resp.get("NextKeyMarker"), UploadIdMarker=resp.get("NextUploadIdMarker"))
        if not uploads:
            return None
        uploads.sort(key=lambda u: u.get("Initiated") or 0)
        return str(uploads[-1]["UploadId"])

    def _ensure_upload(self) -> str:
        with self._lock:
            if self._upload_id is None:
                self._check_bucket()
                upload_id = self._find_upload()
                if upload_id is None:
                    resp = self._call(
                        "starting the multipart upload",
                        lambda: self._client.create_multipart_upload(
                            Bucket=self.bucket,
                            Key=self.data_key(),
                            ContentType=_CONTENT_TYPE,
                            Metadata={"vhdcore-version": __version__, "codec": "lz4-frames"},
                        ),
                        upload=True,
                    )
                    upload_id = str(resp["UploadId"])
                self._upload_id = upload_id
            return self._upload_id

    # -- segments ----------------------------------------------------------------
    def put_segment(self, index: int, data: SegmentData, md5_hex: str) -> str:
        limit = self.segment_limits().max_segments
        if not 0 <= index < limit:
            raise UploadError(f"{self.describe()}: segment {index} is beyond the server's {limit} parts")
        upload_id = self._ensure_upload()
        size = len(data)
        resp = self._call(
            f"uploading segment {index} ({size} bytes)",
            # frames go out as a file that botocore reads (and rewinds to
            # sign), never joined; a fresh one per attempt
            lambda: self._client.upload_part(
                Bucket=self.bucket,
                Key=self.data_key(),
                UploadId=upload_id,
                PartNumber=index + 1,
                Body=segment_body(data),
                ContentLength=size,
                ContentMD5=md5_base64(md5_hex),
            ),
            upload=True,
        )
        etag = str(resp.get("ETag", "")).strip('"')
        if etag and etag != md5_hex:
            raise UploadError(
                f"{self.describe()}: segment {index}: server stored ETag {etag}, expected {md5_hex}"
            )
        return etag or md5_hex

    def list_segments(self) -> dict[int, SegmentInfo]:
        self._check_bucket()
        with self._lock:
            if self._upload_id is None:
                self._upload_id = self._find_upload()
            upload_id = self._upload_id
        found: dict[int, SegmentInfo] = {}
        if upload_id is None:
            return found
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.data_key(), "UploadId": upload_id}
        while True:
            resp = self._call("listing uploaded parts", lambda: self._client.list_parts(**kwargs))
            for part in resp.get("Parts", []):
                index = int(part["PartNumber"]) - 1
                found[index] = SegmentInfo(index, int(part["Size"]), str(part["ETag"]).strip('"'))
            if not resp.get("IsTruncated"):
                break
            kwargs["PartNumberMarker"] = resp.get("NextPartNumberMarker")
        return found

    def get_segment(self, index: int) -> bytes:
        if self._offsets is None:
            self.get_manifest()
        assert self._offsets is not None
        try:
            start, size = self._offsets[index]
        except KeyError:
            raise StoreNotFoundError(f"{self.describe()}: the image has no segment {index}") from None
        if size == 0:
            return b""

        def get() -> bytes:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=self._read_key, Range=f"bytes={start}-{start + size - 1}"
            )
            data: bytes = resp["Body"].read()
            return data

        return self._call(f"downloading segment {index}", get)

    # -- manifest ------------------------------------------------------------------
    def put_manifest(self, segments: list[SegmentInfo], metadata: Mapping[str, str]) -> None:
        meta = check_metadata(metadata)
        upload_id = self._ensure_upload()
        key = self.data_key()
        parts = [{"PartNumber": s.index + 1, "ETag": f'"{s.etag}"'} for s in segments]
        try:
            self._call(
                f"completing the multipart upload ({len(parts)} parts)",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
                upload=True,
            )
        except StoreNotFoundError:
            # a retried completion whose first try went through answers
            # NoSuchUpload: accept the object only if it is made of exactly
            # these parts (size, and the multipart ETag that S3 computes from
            # the parts' MD5s in order)
            head = self._call(
                "checking the object", lambda: self._client.head_object(Bucket=self.bucket, Key=key)
            )
            size = int(head.get("ContentLength", -1))
            etag = str(head.get("ETag", "")).strip('"')
            want_size = sum(s.size for s in segments)
            want_etag = multipart_etag([s.etag for s in segments])
            if size != want_size or etag != want_etag:
                raise UploadError(
                    f"{self.describe()}: the multipart upload is gone (NoSuchUpload) and {key!r} is not "
                    f"the object it would have made ({size} bytes, ETag {etag}; expected {want_size} "
                    f"bytes, ETag {want_etag}); run the upload again"
                ) from None
        with self._lock:
            self._upload_id = None
        body = encode_record(self.generation, meta, segments)
        self._call(
            "writing the manifest record",
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=self.record_key, Body=body, ContentType="application/json"
            ),
            upload=True,
        )

    def get_manifest(self) -> Manifest:
        self._check_bucket()
        try:
            resp = self._call(
                "reading the manifest record",
                lambda: self._client.get_object(Bucket=self.bucket, Key=self.record_key),
            )
            raw = resp["Body"].read()
        except StoreNotFoundError:
            try:
                self._call(
                    "reading the object", lambda: self._client.head_object(Bucket=self.bucket, Key=self.key)
                )
            except StoreNotFoundError:
                raise StoreNotFoundError(
                    f"{self.describe()}: no such image (or the upload did not finish)"
                ) from None
            raise StoreError(
                f"{self.describe()} is not a vhdcore image: it has no {self.record_key!r} manifest record"
            ) from None
        try:
            segments, metadata, generation = decode_record(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(
                f"{self.describe()}: damaged manifest record {self.record_key!r} ({exc})"
            ) from exc
        key = self.data_key(generation)
        try:
            head = self._call(
                "reading the object", lambda: self._client.head_object(Bucket=self.bucket, Key=key)
            )
        except StoreNotFoundError:
            raise StoreError(
                f"{self.describe()}: the manifest record names {key!r}, which does not exist"
            ) from None
        total = sum(s.size for s in segments)
        if int(head.get("ContentLength", -1)) != total:
            raise StoreError(
                f"{self.describe()}: the object has {head.get('ContentLength')} bytes but its manifest "
                f"record lists {total}: it was overwritten after the upload"
            )
        offsets, pos = {}, 0
        for s in segments:
            offsets[s.index] = (pos, s.size)
            pos += s.size
        self._offsets = offsets
        self._read_key = key
        return Manifest(segments, metadata, generation)

    def _family(self) -> tuple[list[str], list[tuple[str, str]]]:
        """The objects and unfinished uploads (key, upload id) of every
        generation of this image."""
        prefix = self.key + _GENERATION_INFIX

        def ours(k: str) -> bool:
            return k == self.key or (k.startswith(prefix) and bool(_GENERATION_RE.match(k[len(prefix) :])))

        keys: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key}
        while True:
            resp = self._call("listing objects", lambda: self._client.list_objects_v2(**kwargs))
            keys += [str(o["Key"]) for o in resp.get("Contents", []) if ours(str(o.get("Key", "")))]
            if not resp.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = resp.get("NextContinuationToken")
        uploads: list[tuple[str, str]] = []
        kwargs = {"Bucket": self.bucket, "Prefix": self.key}
        while True:
            resp = self._call("listing multipart uploads", lambda: self._client.list_multipart_uploads(**kwargs))
            uploads += [
                (str(u["Key"]), str(u["UploadId"])) for u in resp.get("Uploads", []) if ours(str(u.get("Key", "")))
            ]
            if not resp.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=resp.get("NextKeyMarker"), UploadIdMarker=resp.get("NextUploadIdMarker"))
        return keys, uploads

    def _remove(self, keys: list[str], uploads: list[tuple[str, str]]) -> int:
        removed = 0
        for key, upload_id in uploads:
            try:
                self._call(
                    "aborting a multipart upload",
                    functools.partial(
                        self._client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
                    ),
                )
                removed += 1
            except StoreNotFoundError:
                pass
        for key in keys:
            try:
                self._call(
                    f"deleting {key!r}", functools.partial(self._client.delete_object, Bucket=self.bucket, Key=key)
                )
                removed += 1
            except StoreNotFoundError:
                pass
        return removed

    def prune(self) -> int:
        keep = self.data_key(self.get_manifest().generation)
        keys, uploads = self._family()
        with self._lock:
            self._upload_id = None
        return self._remove([k for k in keys if k != keep], uploads)

    def delete(self) -> None:
        self._check_bucket()
        keys, uploads = self._family()
        self._remove([self.record_key] + keys, uploads)
        with self._lock:
            self._upload_id = None
            self._offsets = None
        self._read_key = self.key

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass
