"""Create new VHD files: fixed, dynamic and differencing, each written
whole under a temporary name, fsynced, then linked or renamed into place and
the directory fsynced (complete or absent)."""
from __future__ import annotations

import errno
import os
from typing import Any

from .. import _io
from ..errors import VhdError
from .file import PathLike, VhdFile
from .format import (
    DEFAULT_BLOCK_SIZE,
    DISK_FIXED,
    SECTOR,
    Footer,
    check_virtual_size,
    encode_locator_path,
    vhd_timestamp,
)
from .layout import DynamicLayout

__all__ = ["create_fixed", "create_dynamic", "create_differencing", "parent_locator_blobs",
           "vhd_timestamp_of_file", "LOCATOR_CODES"]

#: locator codes written into new differencing disks, in this order
LOCATOR_CODES = (b"W2ku", b"W2ru", b"MacX")


def _check_new_size(size: int, block_size: int) -> None:
    check_virtual_size(size)
    if block_size < SECTOR * 8 or block_size & (block_size - 1) or block_size > 256 * 1024 * 1024:
        raise VhdError(f"block size {block_size} must be a power of two from 4 KiB to 256 MiB")


def _create_complete(path: str, exclusive: bool, fill: Any) -> int:
    """Create ``path`` whole or not at all: ``fill(fd)`` writes a temporary
    file beside it, which is fsynced, then linked (``exclusive``: an existing
    ``path`` is an error, as with ``O_EXCL``) or renamed to ``path``, and the
    directory fsynced.  Returns the open descriptor of the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    if exclusive and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _io.FILE_MODE)
    try:
        fill(fd)
        _io.fsync(fd)
        if exclusive:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
                _io.replace(tmp, path)
            else:
                _io.unlink(tmp)
        else:
            _io.replace(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _io.fsync_dir(directory)
    return fd

def _write_new_dynamic(path: str, layout: DynamicLayout, exclusive: bool) -> VhdFile:
    """Write an empty dynamic or differencing file laid out by ``layout``:
    footer copy, header, BAT (every entry unused), the parent locators, and
    the footer where the first block would go."""
    def fill(fd: int) -> None:
        _io.pwrite_all(fd, layout.head(()), 0)
        for off, data in layout.locator_data:
            _io.pwrite_all(fd, data, off)
        _io.pwrite_all(fd, layout.tail(), layout.data_start)

    fd = _create_complete(path, exclusive, fill)
    return VhdFile(path, writable=True, _fd=fd)


def create_fixed(path: PathLike, size: int, *, exclusive: bool = False) -> VhdFile:
    """Create a fixed VHD of ``size`` bytes (sparse on the host filesystem)."""
    path = os.fspath(path)
    _check_new_size(size, DEFAULT_BLOCK_SIZE)
    footer = Footer.new(DISK_FIXED, size)

    def fill(fd: int) -> None:
        _io.ftruncate(fd, size)
        _io.pwrite_all(fd, footer.pack(), size)

    fd = _create_complete(path, exclusive, fill)
    return VhdFile(path, writable=True, _fd=fd)


def create_dynamic(path: PathLike, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                   exclusive: bool = False) -> VhdFile:
    """Create an empty dynamic VHD of ``size`` virtual bytes."""
    path = os.fspath(path)
    _check_new_size(size, block_size)
    return _write_new_dynamic(path, DynamicLayout(size, block_size), exclusive)


def create_differencing(path: PathLike, parent: PathLike, *, size: int | None = None,
                        block_size: int | None = None, exclusive: bool = False) -> VhdFile:
    """Create a differencing VHD whose parent is ``parent``.

    The parent is recorded by UUID, modification time, UTF-16BE name and
    locators (see :func:`parent_locator_blobs`).
    """
    path = os.fspath(path)
    parent = os.fspath(parent)
    with VhdFile.open(parent) as p:
        psize = p.virtual_size
        pblock = p.block_size
        puuid = p.footer.unique_id
        if p.is_fixed:
            pblock = block_size or DEFAULT_BLOCK_SIZE
    if block_size is not None and block_size != pblock:
        raise VhdError(f"block size {block_size} differs from the parent's {pblock}")
    size = size or psize
    if size < psize:
        raise VhdError(f"a child ({size} bytes) cannot be smaller than its parent ({psize} bytes)")
    _check_new_size(size, pblock)
    blobs = parent_locator_blobs(path, parent)
    layout = DynamicLayout(size, pblock, locators=blobs,
                           parent=(puuid, vhd_timestamp_of_file(parent), os.path.basename(parent)))
    return _write_new_dynamic(path, layout, exclusive)


def parent_locator_blobs(child: PathLike, parent: PathLike) -> list[tuple[bytes, bytes]]:
    """(code, data) of the parent locators vhdcore writes for ``child`` over
    ``parent``: ``W2ku`` the parent's absolute path (as the specification
    says), ``W2ru`` and ``MacX`` its path relative to the child's directory
    (what vhdcore itself follows first)."""
    ap = os.path.abspath(os.fspath(parent))
    rel = os.path.relpath(ap, os.path.dirname(os.path.abspath(os.fspath(child))))
    out = []
    for code in LOCATOR_CODES:
        out.append((code, encode_locator_path(code, ap if code == b"W2ku" else rel)))
    return out


def vhd_timestamp_of_file(path: PathLike) -> int:
    """A file's modification time as a VHD timestamp (what blktap records as
    the parent time stamp)."""
    import datetime as _dt

    mtime = os.stat(path).st_mtime
    return vhd_timestamp(_dt.datetime.fromtimestamp(mtime, _dt.timezone.utc))
