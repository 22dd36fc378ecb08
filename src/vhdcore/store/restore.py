"""Restore an image from a store: download, verify, decompress, write."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import _io
from ..chain import vhd_to_raw
from ..errors import IntegrityError, OutputExistsError, StoreError
from .base import META_CODEC, Manifest, SegmentInfo, Store, is_vhdcore_metadata
from .urls import open_store

__all__ = ["restore", "verify", "check_image_manifest"]

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")

#: ``progress(done_bytes, total_bytes)`` of the uncompressed stream, from the calling thread
RestoreProgress = Callable[[int, int], None]


def check_image_manifest(store: Store, manifest: Manifest) -> None:
    """Raise :class:`StoreError` unless ``manifest`` describes a vhdcore image this version reads."""
    from ..compress import CODEC

    meta = manifest.metadata
    if not is_vhdcore_metadata(meta):
        raise StoreError(f"{store.describe()} is not a vhdcore image: it has no vhdcore metadata")
    if meta[META_CODEC] != CODEC:
        raise StoreError(
            f"{store.describe()}: unsupported codec {meta[META_CODEC]!r} (this vhdcore reads {CODEC!r})"
        )
    if not manifest.sha256 or manifest.stream_size is None:
        raise StoreError(f"{store.describe()}: the image metadata lacks sha256 or stream-size")
    if not manifest.segments:
        raise StoreError(f"{store.describe()}: the image has no segments")


def _fetch(store: Store, seg: SegmentInfo) -> list[bytes]:
    from ..compress import decompress_frame_list

    data = store.get_segment(seg.index)
    if len(data) != seg.size:
        raise IntegrityError(
            f"{store.describe()}: segment {seg.index} has {len(data)} bytes, the manifest says {seg.size}"
        )
    if _MD5_RE.match(seg.etag):
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if md5 != seg.etag:
            raise IntegrityError(
                f"{store.describe()}: segment {seg.index} is damaged: MD5 {md5}, the manifest says {seg.etag}"
            )
    try:
        return decompress_frame_list(data)
    except IntegrityError as exc:
        raise IntegrityError(f"{store.describe()}: segment {seg.index}: {exc}") from None


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _download(
    store: Store,
    manifest: Manifest,
    concurrency: int,
    write: Callable[[bytes], object] | None,
    progress: RestoreProgress | None,
) -> str:
    """Fetch every segment (``concurrency`` threads, at most ``2 *
    concurrency`` in memory), check each MD5, decompress, hand the bytes to
    ``write`` in order; check the stream's size and SHA-256 against the
    metadata and return the digest."""
    total = manifest.stream_size or 0
    sha = hashlib.sha256()
    written = 0
    with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="vhdcore-restore") as pool:
        window: collections.deque[concurrent.futures.Future[list[bytes]]] = collections.deque()
        segments = iter(manifest.segments)
        try:
            for seg in segments:
                window.append(pool.submit(_fetch, store, seg))
                if len(window) >= 2 * concurrency:
                    break
            while window:
                parts = window.popleft().result()
                nxt = next(segments, None)
                if nxt is not None:
                    window.append(pool.submit(_fetch, store, nxt))
                for raw in parts:
                    sha.update(raw)
                    if write is not None:
                        write(raw)
                    written += len(raw)
                if progress is not None:
                    progress(written, total)
        finally:
            for fut in window:
                fut.cancel()
    if written != manifest.stream_size:
        raise IntegrityError(
            f"{store.describe()}: the stream has {written} bytes, the metadata says {manifest.stream_size}"
        )
    digest = sha.hexdigest()
    if digest != manifest.sha256:
        raise IntegrityError(
            f"{store.describe()}: SHA-256 of the restored stream is {digest}, the metadata says {manifest.sha256}"
        )
    return digest


def verify(
    url: str | Store,
    concurrency: int = 4,
    *,
    options: Mapping[str, Any] | None = None,
    progress: RestoreProgress | None = None,
) -> Manifest:
    """Read every segment of the image at ``url`` and check it as
    :func:`restore` does (each segment's MD5, the lz4 frames, the stream's
    size and SHA-256) without writing anything.  Returns the manifest;
    raises :class:`IntegrityError` for damaged data and
    :class:`StoreNotFoundError` for a missing or incomplete image."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    own = isinstance(url, str)
    store = open_store(url, **(options or {})) if isinstance(url, str) else url
    try:
        manifest = store.get_manifest()
        check_image_manifest(store, manifest)
        _download(store, manifest, concurrency, None, progress)
        return manifest
    finally:
        if own:
            store.close()


def restore(
    url: str | Store,
    out: str | os.PathLike[str],
    format: str = "vhd",
    concurrency: int = 4,
    *,
    options: Mapping[str, Any] | None = None,
    progress: RestoreProgress | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Download the image at ``url`` and write it to ``out``.

    Segments are fetched on ``concurrency`` threads (at most ``2 *
    concurrency`` held in memory), each checked against the MD5 in the
    manifest and decompressed; the SHA-256 of the whole uncompressed stream is
    checked against the image metadata.  The output is written to a temporary
    file beside ``out`` and renamed only when everything matched; on any error
    it is removed.  Every write, fsync and rename goes through
    :mod:`vhdcore._io`; the file gets mode 0666 less the umask.  An existing
    ``out`` is refused (:class:`~vhdcore.errors.OutputExistsError`) unless
    ``overwrite``.  ``format="raw"`` converts the VHD to a raw disk image
    (:func:`vhdcore.chain.vhd_to_raw`).  ``options`` go to
    :func:`~vhdcore.store.open_store`.  Returns the manifest.

    Raises :class:`IntegrityError` for damaged data,
    :class:`StoreNotFoundError` for a missing image, and :class:`StoreError`
    for an object that is not a vhdcore image.
    """
    if format not in ("vhd", "raw"):
        raise ValueError(f"format must be 'vhd' or 'raw', got {format!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    out_path = Path(out)
    if not overwrite and os.path.lexists(out_path):
        raise OutputExistsError(f"{out_path} already exists; pass --force (overwrite=True) to replace it")
    own = isinstance(url, str)
    store = open_store(url, **(options or {})) if isinstance(url, str) else url
    tmp_vhd: str | None = None
    try:
        manifest = store.get_manifest()
        check_image_manifest(store, manifest)
        out_dir = os.path.dirname(os.path.abspath(out_path))
        fd, tmp_vhd = _io.create_temp(out_dir, f".{out_path.name}.", ".partial")
        _download_to(fd, store, manifest, concurrency, progress)
        if not overwrite and os.path.lexists(out_path):
            raise OutputExistsError(f"{out_path} appeared while restoring; it was left alone")
        if format == "vhd":
            _io.replace(tmp_vhd, os.fspath(out_path))
            tmp_vhd = None
            _io.fsync_dir(out_dir)
        else:
            _install_raw(tmp_vhd, out_path, out_dir)
        return manifest
    finally:
        _remove(tmp_vhd)
        if own:
            store.close()


def _download_to(fd: int, store: Store, manifest: Manifest, concurrency: int,
                 progress: RestoreProgress | None) -> None:
    """Write the image's stream into ``fd`` from its start, make it durable and
    close ``fd``."""
    pos = 0

    def write(raw: bytes) -> None:
        nonlocal pos
        _io.pwrite_all(fd, raw, pos)
        pos += len(raw)

    try:
        _download(store, manifest, concurrency, write, progress)
        _io.fsync(fd)
    finally:
        os.close(fd)


def _install_raw(tmp_vhd: str, out_path: Path, out_dir: str) -> None:
    """Convert the downloaded VHD to a raw disk under a temporary name and
    rename it to ``out_path``."""
    tmp_raw: str | None = None
    try:
        fd, tmp_raw = _io.create_temp(out_dir, f".{out_path.name}.", ".raw-partial")
        os.close(fd)
        vhd_to_raw(tmp_vhd, tmp_raw)
        _io.replace(tmp_raw, os.fspath(out_path))
        tmp_raw = None
        _io.fsync_dir(out_dir)
    finally:
        _remove(tmp_raw)
