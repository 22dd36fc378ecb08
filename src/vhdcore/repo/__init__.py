"""A content-addressed repository of VHD chain images: incremental and deduplicated.

Each image is a list of fixed-size chunks of the virtual disk, named by a
keyed BLAKE3 ID; a chunk is stored once however many images hold it.  The
chain's differencing layers tell which chunks can have changed since the
previous image of the same name, so the rest are reused without reading.
See ``docs/repository.md``.

Public API::

    init_repo(url, chunk_size=2 MiB, codec="lz4") -> Repository
    open_repo(url) -> Repository
    create_image(leaf, repo_url, name, *, progress=None, timeout=None, fs_aware=True,
                 rehash=False, ...) -> RepoImage           # str() is "NAME@ID"
    list_images(repo_url, name=None) -> list[dict]
    restore(repo_url, "NAME[@ID]", out, format="vhd"|"raw") -> manifest dict
    export(repo_url, "NAME[@ID]", to_url) -> stream metadata
    forget(repo_url, "NAME@ID" | None, keep_last=..., keep_daily=...) -> list[str]
    gc(repo_url, grace="24h") -> GcResult
    verify(repo_url, "NAME[@ID]" | None, read_data=False, subset=None) -> VerifyResult

``repo_url`` may be None: ``$VHDCORE_REPO`` is used.
"""
from __future__ import annotations

from .core import ImageRef, Lease, Repository, init_repo, open_repo
from .format import RepoFormatError
from .maint import GcResult, VerifyResult, forget, gc, list_images, parse_duration, verify
from .reader import export, restore
from .writer import RepoImage, create_image

__all__ = [
    "ImageRef",
    "Lease",
    "Repository",
    "RepoImage",
    "RepoFormatError",
    "GcResult",
    "VerifyResult",
    "create_image",
    "export",
    "forget",
    "gc",
    "init_repo",
    "list_images",
    "open_repo",
    "parse_duration",
    "restore",
    "verify",
]
