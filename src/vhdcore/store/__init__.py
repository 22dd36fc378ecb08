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
    ImageEntry,
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
from .restore import restore, verify
from .retry import RetryPolicy
from .upload import SegmentPacker, SegmentUploader, UploadStats, pack_segments, upload_frames

__all__ = [
    "MiB",
    "GiB",
    "ImageEntry",
    "Manifest",
    "RetryPolicy",
    "SegmentInfo",
    "SegmentLimits",
    "SegmentPacker",
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
    "verify",
    "upload_frames",
    "SCHEMES",
    "URL_FORMS",
    "parse_url",
    "list_images",
]

#: the URL schemes vhdcore stores images under
SCHEMES = ("file", "swift", "s3")
#: how each scheme's URL is written, for messages
URL_FORMS = "file:///dir/name, swift://container/name or s3://bucket/key"


def parse_url(url: str, *, prefix: bool = False) -> tuple[str, str, str]:
    """Split a store URL into ``(scheme, location, name)``: the directory, the
    Swift container or the S3 bucket, and the image name (for ``prefix=True``,
    a listing prefix that may be empty).  A plain path is a ``file`` URL.

    Raises :class:`StoreError` for an unknown scheme (listing the supported
    ones) or a URL without a location or name.  Nothing is contacted.
    """
    if "://" not in url:
        path = os.path.abspath(url)
        if prefix and (url.endswith("/") or os.path.isdir(path)):
            return "file", path, ""
        return "file", os.path.dirname(path), os.path.basename(path)
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in SCHEMES:
        raise StoreError(f"unknown store URL scheme {parsed.scheme!r} in {url!r}; supported: {URL_FORMS}")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{url!r}: file URLs must be local (file:///dir/name)")
        path = urllib.parse.unquote(parsed.path)
        if prefix and (path.endswith("/") or os.path.isdir(path)):
            return "file", path.rstrip("/") or "/", ""
        directory, name = os.path.split(path.rstrip("/"))
        if not name:
            raise StoreError(f"{url!r}: expected file:///dir/name")
        return "file", directory or "/", name
    what = "container/name" if scheme == "swift" else "bucket/key"
    first = urllib.parse.unquote(parsed.netloc)
    rest = urllib.parse.unquote(parsed.path).lstrip("/")
    if not first or (not rest and not prefix):
        raise StoreError(f"{url!r}: expected {scheme}://{what}")
    return scheme, first, rest


def open_store(url: str, **options: Any) -> Store:
    """Open the image at ``url``; ``options`` go to the target's constructor.

    Raises :class:`StoreError` for a URL it cannot use (unknown scheme, no
    name).  Nothing is contacted until the first operation.
    """
    scheme, first, rest = parse_url(url)
    if scheme == "file":
        if "://" not in url:
            return DirectoryStore(first, rest, **options)
        return DirectoryStore(first, rest, url=url, **options)
    if scheme == "swift":
        from .swift import SwiftStore

        return SwiftStore(first, rest, url=url, **options)
    from .s3 import S3Store

    return S3Store(first, rest, url=url, **options)


def list_images(url: str, **options: Any) -> list[ImageEntry]:
    """The images under ``url`` -- a directory (``file:///dir/`` or a plain
    path), a Swift container or an S3 bucket, optionally followed by a name
    prefix (``swift://container/web``) -- complete or not, by name.
    ``options`` go to the target's constructor."""
    scheme, location, prefix = parse_url(url, prefix=True)
    if scheme == "file":
        store: Store = DirectoryStore(location, "_", **options)
    elif scheme == "swift":
        from .swift import SwiftStore

        store = SwiftStore(location, "_", **options)
    else:
        from .s3 import S3Store

        store = S3Store(location, "_", **options)
    try:
        return store.list_images(prefix)
    finally:
        store.close()
