"""Merging one child block into the parent, and where new parent blocks go.

The order of one block's writes: the child's sector runs (straight from its
mapping; the parent's data is never read to be copied back), then the
parent's bitmap (ORed); a block the parent lacks goes to fresh space past
the file's end, reserved for a whole batch at once (one fsync), and is
written sparsely.  The BAT entries and the checkpoint that follow a batch
are :mod:`vhdcore.ops.coalesce`'s.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import kernels
from ..vhd.file import VhdFile
from ..vhd.format import DISK_DYNAMIC, FOOTER_SIZE, SECTOR

#: new parent blocks are placed so that their data starts on a page
_PAGE = 4096


def _new_block_stride(pvhd: VhdFile) -> int:
    """The distance between new parent blocks: bitmap + data, rounded up to
    a page, so that every new block's data starts on a page boundary (a 4 KiB
    child write then dirties one page of the parent, not two)."""
    return -(-(pvhd.bitmap_size + pvhd.block_size) // _PAGE) * _PAGE


def _reserve_batch(cvhd: VhdFile, pvhd: VhdFile, blocks: Sequence[int],
                   cbm: bytearray) -> dict[int, int]:
    """Reserve the parent blocks that merging ``blocks`` will allocate (as
    :func:`_merge_one` decides) at once; returns block -> offset.

    The new blocks lie wholly past the file's current end (its old footer
    included), page-aligned: fresh space that reads as zeros (a filesystem
    hole), so a new block is written sparsely, only the child's sectors and
    its bitmap (:meth:`VhdFile.write_block_runs`), and a block whose bitmap
    write did not survive a power cut reads as an empty block.  The old
    footer's sector, left behind in the gap, is zeroed once the new footer
    is in force (durable: :meth:`VhdFile.reserve`)."""
    need = []
    for blk in blocks:
        if pvhd.block_offset(blk) is not None:
            continue
        views = cvhd.block_views(blk)
        assert views is not None
        n = min(cvhd.block_sectors(blk), pvhd.block_sectors(blk))
        if n <= 0:
            continue
        cbm[:] = views[0]
        if kernels.bitmap_count(cbm, n) == 0:
            continue
        if pvhd.disk_type == DISK_DYNAMIC and kernels.clear_zero_sectors(cbm, views[1], n) == 0:
            continue
        need.append(blk)
    if not need:
        return {}
    astride = _new_block_stride(pvhd)
    base = _reserve_fresh(pvhd, len(need))
    return {blk: base + k * astride for k, blk in enumerate(need)}


def _reserve_fresh(pvhd: VhdFile, count: int) -> int:
    """Reserve ``count`` new blocks past the file's current end (its old
    footer included), the first one's data on a page boundary, the others
    :func:`_new_block_stride` apart; returns the first one's offset.  The old
    footer's sector left behind in the gap is zeroed (after the new footer
    is in force)."""
    stride = pvhd.bitmap_size + pvhd.block_size
    old_footer = pvhd.footer_offset
    start = max(os.fstat(pvhd._fd).st_size, pvhd._next_block)
    first = -(-(start + pvhd.bitmap_size) // _PAGE) * _PAGE - pvhd.bitmap_size
    off = pvhd._next_block
    base = pvhd.reserve(first - off + (count - 1) * _new_block_stride(pvhd) + stride)
    base += first - off
    if off <= old_footer and old_footer + FOOTER_SIZE <= first:
        pvhd._pwrite(bytes(FOOTER_SIZE), old_footer)
    return base


def _resident_sectors(vhd: VhdFile, offset: int, nsectors: int) -> bytearray | None:
    """A sector bitmap (MSB first) of the ``nsectors`` sectors at file
    ``offset`` whose pages are in the page cache (``mincore``): comparing
    those costs no I/O.  None when it cannot be told (then nothing is
    compared)."""
    if vhd._mm is None:
        return None
    length = nsectors * SECTOR
    p0 = offset // _PAGE
    p1 = -(-(offset + length) // _PAGE)
    if p1 * _PAGE > len(vhd._mm) + _PAGE - 1:
        return None
    pages = _resident_pages(vhd._mm, p0, p1)
    if pages is None:
        return None
    sec = (offset + np.arange(nsectors, dtype=np.int64) * SECTOR) // _PAGE - p0
    return bytearray(np.packbits(pages[sec].astype(bool)).tobytes())


def _resident_pages(mm: Any, p0: int, p1: int) -> np.ndarray | None:
    """1 for each page ``[p0, p1)`` of the mapping ``mm`` that is in the
    page cache, else 0 (``mincore``); None when it cannot be told."""
    fn = _mincore()
    if fn is None:
        return None
    import ctypes

    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    vec = np.zeros(p1 - p0, dtype=np.uint8)
    if fn(ctypes.c_void_p(base + p0 * _PAGE), ctypes.c_size_t((p1 - p0) * _PAGE),
          ctypes.c_void_p(vec.ctypes.data)) != 0:
        return None
    return vec & 1


_MINCORE: list[Any] = []


def _mincore() -> Any:
    if not _MINCORE:
        fn = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.mincore
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _MINCORE.append(fn)
    return _MINCORE[0]


def _drop_equal_cached(cbm: bytearray, cdata: memoryview, pbm: bytes | bytearray,
                       pvhd: VhdFile, pdata: memoryview, poff: int, n: int) -> int:
    """Clear the child bits of sectors whose parent copy (bit set in
    ``pbm``) is equal, comparing only parent sectors already in the page
    cache: a parent read from the disk would cost as much as the write it
    might save (measured: cold, it made a coalesce several times slower),
    so a sector that is not cached is written without looking."""
    nb = (n + 7) // 8
    both = np.frombuffer(cbm, np.uint8, count=nb) & np.frombuffer(pbm, np.uint8, count=nb)
    if not both.any():
        return 0
    res = _resident_sectors(pvhd, poff, n)
    if res is None:
        return 0
    ref = bytearray(len(cbm))
    ref[:nb] = (both & np.frombuffer(res, np.uint8, count=nb)).tobytes()
    if not any(ref):
        return 0
    return kernels.drop_equal_sectors(cbm, cdata, ref, pdata, n)




def _merge_one(cvhd: VhdFile, pvhd: VhdFile, blk: int, cbm: bytearray, runs: np.ndarray,
               offset: int | None = None) -> tuple[int, int, int]:
    """Merge one child block into the parent.  Returns (sectors written,
    sectors skipped as equal, blocks allocated).

    Only the child's sector runs are written, straight from its mapping;
    the parent's data is never read to be copied back, and compared (to skip
    equal sectors) only where it is in the page cache.  A new parent block
    is written sparsely into reserved fresh space (``offset``)."""
    views = cvhd.block_views(blk)
    assert views is not None
    cbm_view, cdata = views
    if pvhd.is_fixed:
        # a fixed parent has no blocks: index it by the child's block size
        base = blk * cvhd.block_size
        n = min(cvhd.block_sectors(blk), max(0, (pvhd.virtual_size - base) // SECTOR))
    else:
        n = min(cvhd.block_sectors(blk), pvhd.block_sectors(blk))
    if n <= 0:
        return 0, 0, 0
    cbm[:] = cbm_view
    if kernels.bitmap_count(cbm, n) == 0:
        return 0, 0, 0
    if pvhd.is_fixed:
        return _merge_into_fixed(pvhd, base, cbm, cdata, runs, n)
    off = pvhd.block_offset(blk)
    if off is None:
        return _merge_into_new(pvhd, blk, cbm, cdata, runs, n, offset)
    return _merge_into_existing(pvhd, off, cbm, cdata, runs, n)


def _write_runs(pvhd: VhdFile, cbm: bytearray, cdata: memoryview, runs: np.ndarray, n: int,
                dstart: int) -> int:
    """Write the child's sector runs (set bits of ``cbm``) at ``dstart``;
    returns the sectors written."""
    cnt = kernels.find_runs(cbm, n, runs)  # type: ignore[arg-type]  # numpy: Buffer on 3.12+
    w = 0
    flat = runs[: 2 * cnt].tolist()
    for k in range(0, 2 * cnt, 2):
        s, ln = flat[k], flat[k + 1]
        pvhd._pwrite(cdata[s * SECTOR : (s + ln) * SECTOR], dstart + s * SECTOR)
        w += ln
    return w


def _merge_into_fixed(pvhd: VhdFile, base: int, cbm: bytearray, cdata: memoryview,
                      runs: np.ndarray, n: int) -> tuple[int, int, int]:
    """A fixed parent: the child's runs at their place in the disk."""
    pview = pvhd.fixed_view(base, n * SECTOR)
    full = b"\xff" * ((n + 7) // 8)
    skipped = _drop_equal_cached(cbm, cdata, full, pvhd, pview, base, n)
    return _write_runs(pvhd, cbm, cdata, runs, n, base), skipped, 0


def _merge_into_new(pvhd: VhdFile, blk: int, cbm: bytearray, cdata: memoryview,
                    runs: np.ndarray, n: int, offset: int | None) -> tuple[int, int, int]:
    """A block the parent lacks: the child's sectors only, into fresh space
    that reads as zeros elsewhere (:meth:`VhdFile.write_block_runs`; its
    BAT entry is written with the batch's)."""
    skipped = 0
    if pvhd.disk_type == DISK_DYNAMIC:
        # sectors the child wrote with zeros over a parent that reads zero
        before = kernels.bitmap_count(cbm, n)
        after = kernels.clear_zero_sectors(cbm, cdata, n)
        skipped = before - after
        if after == 0:
            return 0, skipped, 0
    if offset is None:
        # not reserved with its batch (a caller of its own): reserve it now
        offset = _reserve_fresh(pvhd, 1)
    cnt = kernels.find_runs(cbm, n, runs)  # type: ignore[arg-type]  # numpy: Buffer on 3.12+
    w = pvhd.write_block_runs(blk, bytes(cbm).ljust(pvhd.bitmap_size, b"\0"), cdata,
                              runs, cnt, offset)
    return w, skipped, 1


def _merge_into_existing(pvhd: VhdFile, off: int, cbm: bytearray, cdata: memoryview,
                         runs: np.ndarray, n: int) -> tuple[int, int, int]:
    """A block the parent has: the child's runs over its data, then its
    bitmap ORed with the child's (new sectors before the bits that show
    them)."""
    pbm = bytes(pvhd.mv[off : off + pvhd.bitmap_size])
    dstart = off + pvhd.bitmap_size
    pdata = pvhd.mv[dstart : dstart + n * SECTOR]
    skipped = _drop_equal_cached(cbm, cdata, pbm, pvhd, pdata, dstart, n)
    if pvhd.disk_type == DISK_DYNAMIC:
        # a zero child sector over a clear parent bit (reads zero) changes nothing
        before = kernels.bitmap_count(cbm, n)
        zmask = bytearray(cbm)
        kernels.clear_zero_sectors(zmask, cdata, n)
        # keep a zero sector only where the parent bit is set (it overrides data)
        keep = np.frombuffer(zmask, np.uint8) | (np.frombuffer(cbm, np.uint8)
                                                 & np.frombuffer(pbm, np.uint8))
        cbm[:] = keep.tobytes()
        skipped += before - kernels.bitmap_count(cbm, n)
    w = _write_runs(pvhd, cbm, cdata, runs, n, dstart)
    if w == 0:
        return 0, skipped, 0
    nb = (n + 7) // 8
    newbm = bytearray(pbm)
    kernels.bitmap_or(cbm, newbm, nb)
    if newbm != pbm:
        pvhd._pwrite(newbm, off)
    return w, skipped, 0
