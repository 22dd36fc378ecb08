"""Object store targets behind one small interface, with upload, resume and restore.

``open_store(url, **options)`` picks the target from the URL:

* ``file:///dir/name`` (or a plain path): a local directory
  (:class:`~vhdcore.store.directory.DirectoryStore`);
* ``swift://container/name``: OpenStack Swift / Rackspace Cloud Files, as a
  Static Large Object (:class:`~vhdcore.store.swift.SwiftStore`);
* ``s3://bucket/key``: S3 or an S3-compatible store, as a multipart upload
  (:class:`~vhdcore.store.s3.S3Store`).
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from ..errors import StoreError
from .base import (
    GiB,
    MiB,
    Manifest,
    SegmentInfo,
    SegmentLimits,
    Store,
    choose_segment_size,
    image_metadata,
    md5_hex,
)
from .directory import DirectoryStore
from .restore import restore
from .retry import RetryPolicy
from .upload import SegmentUploader, UploadStats, pack_segments, upload_frames

__all__ = [
    "MiB",
    "GiB",
    "Manifest",
    "RetryPolicy",
    "SegmentInfo",
    "SegmentLimits",
    "SegmentUploader",
    "Store",
    "UploadStats",
    "DirectoryStore",
    "choose_segment_size",
    "image_metadata",
    "md5_hex",
    "open_store",
    "pack_segments",
    "restore",
    "upload_frames",
]


def _split(parsed: urllib.parse.ParseResult, url: str, what: str) -> tuple[str, str]:
    first = urllib.parse.unquote(parsed.netloc)
    rest = urllib.parse.unquote(parsed.path).lstrip("/")
    if not first or not rest:
        raise StoreError(f"{url!r}: expected {parsed.scheme}://{what}")
    return first, rest


def open_store(url: str, **options: Any) -> Store:
    """Open the image at ``url``; ``options`` go to the target's constructor.

    Raises :class:`StoreError` for a URL it cannot use (unknown scheme, no
    name).  Nothing is contacted until the first operation.
    """
    if "://" not in url:
        path = os.path.abspath(url)
        return DirectoryStore(os.path.dirname(path), os.path.basename(path), **options)
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{url!r}: file URLs must be local (file:///dir/name)")
        path = urllib.parse.unquote(parsed.path)
        directory, name = os.path.split(path.rstrip("/"))
        if not name:
            raise StoreError(f"{url!r}: expected file:///dir/name")
        return DirectoryStore(directory or "/", name, url=url, **options)
    if scheme == "swift":
        from .swift import SwiftStore

        container, name = _split(parsed, url, "container/name")
        return SwiftStore(container, name, url=url, **options)
    if scheme == "s3":
        from .s3 import S3Store

        bucket, key = _split(parsed, url, "bucket/key")
        return S3Store(bucket, key, url=url, **options)
    raise StoreError(
        f"unknown store URL scheme {parsed.scheme!r} in {url!r}: use file:///dir/name, "
        "swift://container/name or s3://bucket/key"
    )
