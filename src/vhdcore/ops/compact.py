"""``compact``: one VHD rewritten without the blocks that hold nothing (a
differencing disk stays differencing over the same parent)."""
from __future__ import annotations

import os
from typing import Any

from .. import _io, kernels
from ..chain import Chain
from ..vhd.create import parent_locator_blobs
from ..vhd.file import PathLike, VhdFile
from ..errors import CoalesceError, VhdError
from ..vhd.format import DISK_DIFFERENCING, FOOTER_SIZE, DynamicHeader
from ..vhd.layout import DynamicLayout
from .flatten import flatten
from .flatwrite import FlattenResult, Progress, _fsync_dir, _refuse_existing, _unlink_quiet

__all__ = ["compact"]


def compact(vhd: PathLike, out: PathLike, *, threads: int = 2,
            progress: Progress | None = None,
            chain_options: dict[str, Any] | None = None,
            overwrite: bool = False) -> FlattenResult:
    """Rewrite one VHD without the blocks that hold nothing.

    A fixed or dynamic disk becomes a sparse dynamic VHD without all-zero
    blocks (as :func:`~vhdcore.ops.flatten.flatten` of a one-disk chain).  A
    differencing disk stays differencing over the same parent: blocks whose
    bitmap is empty are dropped (a zero sector it holds still overrides its
    parent, so it stays).  Its parent is resolved (``chain_options`` as for
    :meth:`Chain.open`, ``parent`` included) and the copy's locators name it
    from the output's directory; when the parent cannot be found the copy is
    refused, unless it goes to the input's own directory (then the locators
    are kept as they are).  An existing ``out`` is refused unless
    ``overwrite``.
    """
    vhd = os.fspath(vhd)
    out = os.fspath(out)
    with VhdFile.open(vhd) as src:
        if not src.is_differencing:
            return flatten(vhd, out, "vhd", threads=threads, progress=progress, fs_aware=False,
                           overwrite=overwrite)
        if os.path.exists(out) and os.path.samefile(out, vhd):
            raise CoalesceError(f"{out}: compact cannot write over its input")
        _refuse_existing(out, overwrite)
        parent_path = _parent_of(vhd, out, chain_options)
        tmp = out + ".part"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, _io.FILE_MODE)
        os.close(fd)
        try:
            stored, n_sectors = _write_copy(src, tmp, out, parent_path, progress)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        _io.replace(tmp, out)
        _fsync_dir(out)
        return FlattenResult(out, "vhd", src.virtual_size, stored, n_sectors,
                             os.path.getsize(out))


def _parent_of(vhd: str, out: str, chain_options: dict[str, Any] | None) -> str | None:
    """The differencing disk's parent, or None when it cannot be found and
    the copy goes to the input's own directory (its locators still work
    there); refused otherwise."""
    try:
        with Chain.open(vhd, **(chain_options or {})) as ch:
            return ch.layers[1].path
    except VhdError as exc:
        same_dir = (os.path.realpath(os.path.dirname(os.path.abspath(out)))
                    == os.path.realpath(os.path.dirname(os.path.abspath(vhd))))
        if not same_dir:
            raise CoalesceError(
                f"{vhd}: its parent cannot be found ({exc}), so the copy in another "
                "directory could not name it; name it with --parent, or compact into "
                f"{os.path.dirname(os.path.abspath(vhd))}") from None
    return None


def _locators(src: VhdFile, h: DynamicHeader, out: str, parent_path: str | None
              ) -> tuple[DynamicHeader, list[tuple[bytes, bytes]]]:
    """The copy's header (parent name) and locator data: the same parent,
    named from where the copy lives, or the input's locators as they are."""
    if parent_path is not None:
        return (h.with_(parent_name=os.path.basename(parent_path)),
                parent_locator_blobs(out, parent_path))
    return h, [(loc.code, bytes(src.mv[loc.data_offset : loc.data_offset + loc.data_length]))
               for loc in h.locators if loc.used]


def _write_copy(src: VhdFile, tmp: str, out: str, parent_path: str | None,
                progress: Progress | None) -> tuple[int, int]:
    """Write the compacted copy of ``src`` into ``tmp``: locator data, the
    blocks with a set bit, then the head and the footer, and fsync it.
    Returns (blocks stored, sectors stored)."""
    assert src.header is not None and src.bat is not None
    h, locs_blobs = _locators(src, src.header, out, parent_path)
    # placement (BAT, locator data, blocks) from the one layout of a new
    # dynamic disk; the footer and header are the source's, re-pointed
    layout = DynamicLayout(src.virtual_size, src.block_size, locators=locs_blobs)
    layout.footer = src.footer.with_(unique_id=os.urandom(16), disk_type=DISK_DIFFERENCING,
                                     data_offset=FOOTER_SIZE)
    layout.header = h.with_(table_offset=layout.bat_offset, max_table_entries=src.nblocks,
                            data_offset=0xFFFFFFFFFFFFFFFF, locators=layout.locators)
    layout.check_capacity(int(src.allocated_blocks().size))
    stored: list[int] = []
    n_sectors = 0
    with open(tmp, "r+b") as f:
        fdn = f.fileno()
        for off, padded in layout.locator_data:
            _io.pwrite_all(fdn, padded, off)
        for blk in src.iter_allocated():
            bm, data = src.block_views(blk)  # type: ignore[misc]
            c = kernels.bitmap_count(bm, src.block_sectors(blk))
            if c == 0:
                continue
            off = layout.block_offset(len(stored))
            _io.pwrite_all(fdn, bm, off)
            _io.pwrite_all(fdn, bytes(data).ljust(src.block_size, b"\0"),
                           off + layout.bitmap_size)
            stored.append(blk)
            n_sectors += c
            if progress is not None:
                progress(blk + 1, src.nblocks)
        _io.pwrite_all(fdn, layout.head(stored), 0)
        _io.pwrite_all(fdn, layout.tail(), layout.block_offset_unchecked(len(stored)))
        _io.fsync(fdn)
    return len(stored), n_sectors
