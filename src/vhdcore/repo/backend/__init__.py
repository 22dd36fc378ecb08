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

import urllib.parse
from typing import Any

from ...errors import StoreError, VhdError
from .base import Backend, Buffer
from .directory import DirectoryBackend
from .s3 import S3Backend
from .swift import SwiftBackend

__all__ = ["Backend", "DirectoryBackend", "SwiftBackend", "S3Backend", "open_backend",
           "Buffer"]


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
