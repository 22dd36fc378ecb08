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

from .base import (
    FrameList,
    SpillSegment,
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
from .urls import SCHEMES, URL_FORMS, list_images, open_store, parse_url

__all__ = [
    "MiB",
    "GiB",
    "FrameList",
    "SpillSegment",
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
