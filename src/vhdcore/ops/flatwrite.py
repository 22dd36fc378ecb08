"""Writing a chain's virtual disk as one new image file: a sparse dynamic VHD,
a fixed VHD or raw (:func:`write_flat`), the writing half of
:func:`vhdcore.ops.flatten.flatten` and of ``cat -o``
(:meth:`vhdcore.chain.Chain.copy_to_raw`).

The output goes to ``out + ".part"``, is fsynced, renamed into place and its
directory fsynced.  Zero pages are never written (the new file reads zero
there: holes), and a writeback thread starts the device writing every
:data:`WRITEBACK_CHUNK` bytes.  It sits at the chain's layer, since the chain
uses it for ``cat -o``.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import _io, kernels
from ..errors import OutputExistsError, VhdError
from ..vhd.format import DISK_FIXED, FOOTER_SIZE, SECTOR, Footer, check_virtual_size
from ..vhd.layout import DynamicLayout
from .stream import PREFETCH_BLOCKS, BlockSource, FreeMap, iter_image_blocks

__all__ = ["FlattenResult", "Progress", "write_flat", "WRITEBACK_CHUNK"]

#: called with (bytes done, bytes total)
Progress = Callable[[int, int], None]

#: bytes written between two requests to start writeback
WRITEBACK_CHUNK = 32 * 1024 * 1024
#: a file page: a gap between two runs is left as a hole when it spans one
PAGE = 4096

#: the output formats
FORMATS = ("vhd", "fixed", "raw")


@dataclass
class FlattenResult:
    """What :func:`~vhdcore.ops.flatten.flatten` (or
    :func:`~vhdcore.ops.compact.compact`) wrote.

    ``path`` and ``format`` (``"vhd"``, ``"fixed"`` or ``"raw"``) of the
    output; the disk's ``virtual_size`` in bytes; ``blocks_stored``, the
    blocks that hold data (a dynamic output stores only these);
    ``sectors_stored``, the 512-byte sectors with data in them; and
    ``bytes_written``, every byte written into the output file: block data,
    and for a VHD its metadata too (bitmaps, header, BAT, parent locators,
    footers).  Holes left for all-zero blocks of a raw or fixed output are
    not written, so they do not count.  For a dynamic VHD output this is its
    file size.
    """

    path: str
    format: str
    virtual_size: int
    blocks_stored: int
    sectors_stored: int
    bytes_written: int



class _SparseWriter:
    """Writes a merged block's data without its zero pages: only the runs of
    set bitmap bits (after zero elision every non-zero sector has its bit
    set), joined across gaps that do not span a whole file page.  The output
    file is new and every byte is written at most once, so what is left out
    reads as zero (a hole).  Asks the kernel to start writeback every
    :data:`WRITEBACK_CHUNK` bytes, so that the final fsync has little left."""

    def __init__(self, fd: int, sectors_per_block: int) -> None:
        self.fd = fd
        self.runs = np.zeros(2 * (sectors_per_block // 2 + 1), dtype=np.uint32)
        self.wb_from = 0
        self.wb_to = 0
        # the requests go to a thread of their own: starting writeback waits
        # for room in the device's queue, which must not stall the merge
        self._wbq: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._wbt: threading.Thread | None = None

    def _writeback(self) -> None:
        while True:
            item = self._wbq.get()
            if item is None:
                return
            _io.start_writeback(self.fd, item[0], item[1])

    def close(self) -> None:
        """Wait for the writeback requests (before the file is fsynced or
        closed)."""
        if self._wbt is not None:
            self._wbq.put(None)
            self._wbt.join()
            self._wbt = None

    def write(self, data: memoryview, bitmap: memoryview, nsectors: int, limit: int,
              file_off: int) -> None:
        """Write ``data[:limit]`` (``nsectors`` sectors, bitmap ``bitmap``)
        at ``file_off``, leaving out whole zero pages."""
        k = kernels.find_runs(bitmap, nsectors, self.runs)  # type: ignore[arg-type]  # numpy: Buffer on 3.12+
        if k == 0:
            return
        r = self.runs[: 2 * k].astype(np.int64)
        starts = r[0::2] * SECTOR
        ends = np.minimum((r[0::2] + r[1::2]) * SECTOR, limit)
        if k > 1:
            # a gap is left out only when it holds a whole page of the file
            gap_lo = file_off + ends[:-1]
            gap_hi = file_off + starts[1:]
            hole = (-(-gap_lo // PAGE) + 1) * PAGE <= gap_hi
            cut = np.nonzero(hole)[0]
            starts = np.concatenate((starts[:1], starts[cut + 1]))
            ends = np.concatenate((ends[cut], ends[-1:]))
        fd = self.fd
        for a, b in zip(starts.tolist(), ends.tolist()):
            if b > a:
                _io.pwrite_all(fd, data[a:b], file_off + a)
        self.wb_to = max(self.wb_to, file_off + int(ends[-1]))
        if self.wb_to - self.wb_from >= WRITEBACK_CHUNK:
            if self._wbt is None:
                self._wbt = threading.Thread(target=self._writeback, daemon=True,
                                             name="vhdcore-writeback")
                self._wbt.start()
            self._wbq.put((self.wb_from, self.wb_to - self.wb_from))
            self.wb_from = self.wb_to


def write_flat(chain: BlockSource, out: str, format: str = "vhd", *, threads: int = 2,
               progress: Progress | None = None, free_map: FreeMap | None = None,
               durable: bool = True, prefetch: int = PREFETCH_BLOCKS) -> FlattenResult:
    """The writing half of :func:`~vhdcore.ops.flatten.flatten` (and of
    ``cat -o``) for an open chain: ``out + ".part"``, fsynced (unless
    ``durable`` is False), renamed to ``out``, the directory fsynced.  Zero
    pages are never written (holes); a helper thread reads ``prefetch``
    blocks ahead of the merge."""
    if format not in FORMATS:
        raise VhdError(f"unknown output format {format!r} (vhd, fixed or raw)")
    tmp = out + ".part"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, _io.FILE_MODE)
    try:
        stored, sectors, written = _write_image(fd, chain, format, threads, progress,
                                                free_map, prefetch)
        if durable:
            _io.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    _io.replace(tmp, out)
    _fsync_dir(out)
    total = chain.virtual_size
    if progress is not None:
        progress(total, total)
    return FlattenResult(out, format, total, stored, sectors, written)


def _write_image(fd: int, chain: BlockSource, format: str, threads: int,
                 progress: Progress | None, free_map: FreeMap | None,
                 prefetch: int) -> tuple[int, int, int]:
    """Write the image into the new file ``fd``: the blocks, then (a dynamic
    VHD) the head that lists them and the footer, or (fixed) the footer.
    Returns (blocks stored, sectors stored, bytes written)."""
    vsize = chain.virtual_size
    if format != "raw":
        check_virtual_size(vsize)
    layout = DynamicLayout(vsize, chain.block_size) if format == "vhd" else None
    if layout is not None:
        # the most blocks it can store must all be addressable
        layout.check_capacity(int(chain.allocated_blocks().size))
        _io.ftruncate(fd, layout.data_start)
    else:
        _io.ftruncate(fd, vsize)
    stored, sectors, written = _write_blocks(fd, chain, layout, threads, progress, free_map,
                                             prefetch)
    if layout is not None:
        head = layout.head(stored)
        _io.pwrite_all(fd, head, 0)
        _io.pwrite_all(fd, layout.tail(), layout.block_offset_unchecked(len(stored)))
        written += len(head) + FOOTER_SIZE
    elif format == "fixed":
        _io.pwrite_all(fd, Footer.new(DISK_FIXED, vsize).pack(), vsize)
        written += FOOTER_SIZE
    return len(stored), sectors, written


def _write_blocks(fd: int, chain: BlockSource, layout: DynamicLayout | None, threads: int,
                  progress: Progress | None, free_map: FreeMap | None,
                  prefetch: int) -> tuple[list[int], int, int]:
    """Write every block of the stream that holds data: packed one after the
    other (dynamic ``layout``) or at its place in the disk (raw, fixed).
    Returns (the blocks stored, sectors stored, bytes written)."""
    vsize = chain.virtual_size
    bs = chain.block_size
    stored: list[int] = []
    sectors = written = 0
    sw = _SparseWriter(fd, chain.sectors_per_block)
    try:
        for blk in iter_image_blocks(chain, threads=threads, free_map=free_map,
                                     prefetch=prefetch):
            if layout is not None:
                off = layout.block_offset(len(stored))
                _io.pwrite_all(fd, blk.bitmap[: layout.bitmap_size], off)
                sw.write(blk.data, blk.bitmap, blk.nsectors, blk.nsectors * SECTOR,
                         off + layout.bitmap_size)
                written += layout.block_stride
            else:
                n = min(blk.nsectors * SECTOR, vsize - blk.index * bs)
                sw.write(blk.data, blk.bitmap, blk.nsectors, n, blk.index * bs)
                written += n
            stored.append(blk.index)
            sectors += blk.sectors_set
            if progress is not None:
                progress(min(vsize, (blk.index + 1) * bs), vsize)
    finally:
        sw.close()
    return stored, sectors, written


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``."""
    if not overwrite and os.path.lexists(out):
        raise OutputExistsError(f"{out} already exists; pass --force (overwrite=True) to replace it")


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    """Make the rename of the file ``path`` durable."""
    _io.fsync_dir(os.path.dirname(os.path.abspath(path)))
