"""Coalesce in place, flatten, compact, relink and repair.

* :func:`flatten` reads a chain once, youngest layer first per block, and
  writes one standalone image (sparse dynamic VHD, fixed VHD or raw).  A
  dynamic output omits every block whose visible content is all zeros and
  sets bitmap bits only for sectors that carry data.
* :func:`coalesce` merges a differencing child into its immediate parent in
  place, per sector (bitmaps ORed, child data wins), block-batched, with
  checkpoints that make it resumable after a crash, a deadline or Ctrl-C.
* :func:`relink` re-points grandchildren at the parent afterwards.
* :func:`compact` rewrites one VHD without its empty blocks; :func:`repair`
  restores a damaged primary footer from the copy at offset 0.

Inputs are never modified except the parent of a coalesce (and relinked
grandchildren's headers); outputs are written to a temporary file beside the
target and renamed into place only when complete.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from . import _io, kernels
from ._version import __version__
from .chain import Chain, _drop_pages, aligned_buffer
from .vhd.file import PathLike, VhdFile
from .vhd.layout import DynamicLayout
from .errors import (
    OutputExistsError,
    CheckpointError,
    CoalesceError,
    FormatError,
    NoSpaceError,
    VhdError,
    VhdTimeoutError,
)
from .vhd.format import (
    BAT_UNUSED,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR,
    Footer,
    ParentLocator,
    check_block_offset,
    check_virtual_size,
    encode_bat,
)

__all__ = [
    "FsFreeMap",
    "fs_free_map",
    "ImageBlock",
    "iter_image_blocks",
    "DynamicLayout",
    "flatten",
    "write_flat",
    "FlattenResult",
    "coalesce",
    "CoalesceResult",
    "relink",
    "RelinkResult",
    "compact",
    "repair",
    "checkpoint_path",
]

#: called with (bytes done, bytes total)
Progress = Callable[[int, int], None]
#: free-sector map for filesystem-aware imaging: (block, nsectors) -> bitmap
#: of FREE sectors (MSB first) or None when nothing in the block is free
FreeMap = Callable[[int, int], "bytes | None"]


# --------------------------------------------------------------------------
# merged block stream
@dataclass
class ImageBlock:
    """One merged block with data.  ``bitmap`` and ``data`` are views of
    reused buffers: valid until the iterator advances."""

    index: int
    nsectors: int
    sectors_set: int
    bitmap: memoryview
    data: memoryview


class FsFreeMap:
    """A :data:`FreeMap` from a filesystem map (:func:`vhdcore.fsmap.map_disk`):
    blocks that are entirely free are never read (``skip_blocks``); in partly
    free blocks the free sectors are dropped from the bitmap and zeroed."""

    def __init__(self, disk_map: object, block_size: int) -> None:
        self.disk_map = disk_map
        self.block_size = block_size
        states = disk_map.block_states(block_size)  # type: ignore[attr-defined]
        self.skip_blocks = set(np.nonzero(states == 2)[0].tolist())
        self._partial = set(np.nonzero(states == 1)[0].tolist())

    def __call__(self, block: int, nsectors: int) -> bytes | None:
        if block not in self._partial:
            return None
        return self.disk_map.free_bitmap_for_block(  # type: ignore[attr-defined,no-any-return]
            block, self.block_size)


def fs_free_map(chain: Chain) -> tuple[FsFreeMap, dict[str, Any]]:
    """Map the free space of the filesystems on the chain's virtual disk.
    Returns the free map and the JSON summary for metadata and reports."""
    from . import fsmap as _fsmap

    dmap = _fsmap.map_disk(lambda off, n: chain.read(off, n), chain.virtual_size)
    return FsFreeMap(dmap, chain.block_size), dmap.to_json()


def _clear_bitmap_tail(bitmap: memoryview, nsectors: int) -> None:
    """Clear every bit of ``bitmap`` past sector ``nsectors`` (bit 7 of byte
    0 is sector 0)."""
    full, rest = divmod(nsectors, 8)
    if rest:
        bitmap[full] &= (0xFF << (8 - rest)) & 0xFF
        full += 1
    if full < len(bitmap):
        bitmap[full:] = bytes(len(bitmap) - full)


def _apply_free(bitmap: memoryview, nsectors: int, free: bytes) -> None:
    nb = (nsectors + 7) // 8
    bm = np.frombuffer(bitmap, dtype=np.uint8, count=nb)
    fr = np.frombuffer(free, dtype=np.uint8, count=nb)
    np.bitwise_and(bm, np.bitwise_not(fr), out=bm)


def iter_image_blocks(chain: Chain, *, threads: int = 2, blocks: Iterable[int] | None = None,
                      free_map: FreeMap | None = None, window: int | None = None,
                      elide_zero: bool = True, prefetch: int = 0) -> Iterator[ImageBlock]:
    """Merge the chain's blocks in parallel threads, in block order, and yield
    those that carry data.  With ``elide_zero`` every all-zero sector's bit is
    cleared, so a block reads back the same with fewer sectors stored; a block
    left with no set sector is not yielded.  ``free_map`` clears (and zeroes)
    sectors a filesystem marks free.  At most ``window`` blocks are in memory.
    ``prefetch``: a helper thread asks the kernel to read this many blocks
    ahead of the merge (:meth:`Chain.prefetch_block`; for cold caches).
    """
    todo = [int(b) for b in (chain.allocated_blocks() if blocks is None else blocks)]
    skip = getattr(free_map, "skip_blocks", None)
    if skip:
        todo = [b for b in todo if b not in skip]
    if prefetch <= 0 or not todo:
        yield from _iter_merged(chain, todo, threads, free_map, window, elide_zero, None)
        return
    ahead = _Prefetcher(chain, todo, prefetch)
    try:
        yield from _iter_merged(chain, todo, threads, free_map, window, elide_zero, ahead)
    finally:
        ahead.stop()


class _Prefetcher:
    """A thread that runs :meth:`Chain.prefetch_block` up to ``distance``
    blocks ahead of the blocks the merge has started."""

    def __init__(self, chain: Chain, todo: Sequence[int], distance: int) -> None:
        self.chain = chain
        self.todo = todo
        self.distance = distance
        self.started = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="vhdcore-prefetch", daemon=True)
        self.thread.start()

    def advance(self) -> None:
        with self.cond:
            self.started += 1
            self.cond.notify()

    def _run(self) -> None:
        for i, blk in enumerate(self.todo):
            with self.cond:
                while i >= self.started + self.distance and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
            try:
                self.chain.prefetch_block(blk)
            except Exception:  # advice only: a damaged block fails in the merge
                return

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()


def _iter_merged(chain: Chain, todo: list[int], threads: int, free_map: FreeMap | None,
                 window: int | None, elide_zero: bool,
                 ahead: _Prefetcher | None) -> Iterator[ImageBlock]:
    threads = max(1, threads)
    # buffers for at most the blocks there are (a sparse disk with huge blocks
    # and nothing stored needs none)
    window = min(window or threads * 2, len(todo))
    bs = chain.block_size
    pool: list[tuple[memoryview, memoryview]] = [
        (aligned_buffer(chain.bitmap_size), aligned_buffer(bs)) for _ in range(window)
    ]
    free_bufs: deque[tuple[memoryview, memoryview]] = deque(pool)
    lock = threading.Lock()

    def work(blk: int) -> tuple[int, int, int, tuple[memoryview, memoryview]]:
        with lock:
            bufs = free_bufs.popleft()
        if ahead is not None:
            ahead.advance()
        bm, data = bufs
        n = chain.block_sectors(blk)
        filled = chain.merge_block(blk, data, bm)
        chain.release_block(blk)
        if filled and free_map is not None:
            free = free_map(blk, n)
            if free is not None:
                _apply_free(bm, n, free)
                kernels.fill_unset(bm, data, n)
        if filled and elide_zero:
            filled = kernels.clear_zero_sectors(bm, data, n)
        elif filled:
            filled = kernels.bitmap_count(bm, n)
        if n * SECTOR < bs:
            # a short last block: the pooled buffers still hold an earlier
            # block past its end; the bitmap's padding bits and the data
            # past the disk must be zero (the stream is then deterministic)
            _clear_bitmap_tail(bm, n)
            if filled:
                data[n * SECTOR :] = bytes(bs - n * SECTOR)
        return blk, n, filled, bufs

    def release(bufs: tuple[memoryview, memoryview]) -> None:
        with lock:
            free_bufs.append(bufs)

    if threads == 1:
        for blk in todo:
            b, n, filled, bufs = work(blk)
            try:
                if filled:
                    yield ImageBlock(b, n, filled, bufs[0], bufs[1])
            finally:
                release(bufs)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vhdcore-merge") as ex:
        pending: deque[Future[tuple[int, int, int, tuple[memoryview, memoryview]]]] = deque()
        it = iter(todo)
        try:
            for blk in it:
                pending.append(ex.submit(work, blk))
                if len(pending) >= window:
                    break
            while pending:
                b, n, filled, bufs = pending.popleft().result()
                try:
                    if filled:
                        yield ImageBlock(b, n, filled, bufs[0], bufs[1])
                finally:
                    release(bufs)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(ex.submit(work, nxt))
        finally:
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    try:
                        f.result()
                    except BaseException:
                        pass


# --------------------------------------------------------------------------
@dataclass
class FlattenResult:
    """What :func:`flatten` (or :func:`compact`) wrote.

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




def flatten(leaf: PathLike, out: PathLike, format: str = "vhd", *, threads: int = 2,
            progress: Progress | None = None, free_map: FreeMap | None = None,
            chain_options: dict[str, Any] | None = None, durable: bool = True,
            fs_aware: bool = True, overwrite: bool = False) -> FlattenResult:
    """Write the leaf's whole virtual disk, read once through its chain, as one
    standalone image: ``"vhd"`` (sparse dynamic VHD: no all-zero block, bitmap
    bits only for sectors with data), ``"fixed"`` (fixed VHD) or ``"raw"``.

    The output is written to ``out + ".part"`` and renamed when complete
    (after an fsync unless ``durable`` is False).

    ``fs_aware`` (the default, as for imaging): blocks that the guest's
    filesystems mark entirely free are not stored and free sectors of partly
    used blocks are written as zeros (see :mod:`vhdcore.fsmap`; filesystems
    it cannot trust are kept whole).  ``fs_aware=False`` keeps every sector.

    An existing ``out`` is refused (:class:`~vhdcore.errors.OutputExistsError`)
    unless ``overwrite``.
    """
    if format not in ("vhd", "fixed", "raw"):
        raise VhdError(f"unknown output format {format!r} (vhd, fixed or raw)")
    out = os.fspath(out)
    with Chain.open(leaf, **(chain_options or {})) as chain:
        if os.path.exists(out) and any(os.path.samefile(out, ly.path) for ly in chain.layers):
            raise CoalesceError(f"{out}: the output would overwrite a disk of the chain")
        _refuse_existing(out, overwrite)
        if fs_aware and free_map is None:
            free_map, _ = fs_free_map(chain)
        return write_flat(chain, out, format, threads=threads, progress=progress,
                          free_map=free_map, durable=durable)


#: blocks the prefetch thread reads ahead of the merge (cold caches)
PREFETCH_BLOCKS = 16
#: bytes written between two requests to start writeback
WRITEBACK_CHUNK = 32 * 1024 * 1024
_PAGE = 4096


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
            hole = (-(-gap_lo // _PAGE) + 1) * _PAGE <= gap_hi
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


def write_flat(chain: Chain, out: str, format: str = "vhd", *, threads: int = 2,
               progress: Progress | None = None, free_map: FreeMap | None = None,
               durable: bool = True, prefetch: int = PREFETCH_BLOCKS) -> FlattenResult:
    """The writing half of :func:`flatten` (and of ``cat -o``) for an open
    chain: ``out + ".part"``, fsynced (unless ``durable`` is False), renamed
    to ``out``, the directory fsynced.  Zero pages are never written (holes);
    a helper thread reads ``prefetch`` blocks ahead of the merge."""
    if format not in ("vhd", "fixed", "raw"):
        raise VhdError(f"unknown output format {format!r} (vhd, fixed or raw)")
    tmp = out + ".part"
    vsize = chain.virtual_size
    total = vsize
    bs = chain.block_size
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, _io.FILE_MODE)
    stored: list[int] = []
    sectors = 0
    written = 0
    try:
        if format != "raw":
            check_virtual_size(vsize)
        layout = DynamicLayout(vsize, bs) if format == "vhd" else None
        if layout is not None:
            # the most blocks it can store must all be addressable
            layout.check_capacity(int(chain.allocated_blocks().size))
            _io.ftruncate(fd, layout.data_start)
        else:
            _io.ftruncate(fd, vsize)
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
                    progress(min(total, (blk.index + 1) * bs), total)
        finally:
            sw.close()
        if layout is not None:
            head = layout.head(stored)
            _io.pwrite_all(fd, head, 0)
            _io.pwrite_all(fd, layout.tail(), layout.block_offset_unchecked(len(stored)))
            written += len(head) + FOOTER_SIZE
        elif format == "fixed":
            _io.pwrite_all(fd, Footer.new(DISK_FIXED, vsize).pack(), vsize)
            written += FOOTER_SIZE
        if durable:
            _io.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    _io.replace(tmp, out)
    _fsync_dir(out)
    if progress is not None:
        progress(total, total)
    return FlattenResult(out, format, vsize, len(stored), sectors, written)


def _refuse_existing(out: str, overwrite: bool) -> None:
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


# --------------------------------------------------------------------------
# coalesce in place
CHECKPOINT_VERSION = 1


def checkpoint_path(child: PathLike, checkpoint_dir: PathLike | None = None) -> str:
    """Where the checkpoint of coalescing ``child`` lives."""
    child = os.path.abspath(os.fspath(child))
    d = os.fspath(checkpoint_dir) if checkpoint_dir else os.path.dirname(child)
    return os.path.join(d, os.path.basename(child) + ".coalesce.json")


def _fingerprint_child(vhd: VhdFile) -> str:
    """xxh3 of the child's footer, header, BAT and every sector bitmap, with
    its size and modification time: a coalesce never modifies the child, so
    any change means someone else wrote to it."""
    h = xxhash.xxh3_64()
    h.update(vhd.footer.pack())
    if vhd.header is not None and vhd.bat is not None:
        h.update(vhd.header.pack())
        h.update(vhd.bat.tobytes())
        # ask for every bitmap at once (the disk then reads them in parallel)
        # rather than waiting for each on its own
        for blk in vhd.iter_allocated():
            off = vhd.block_offset(blk)
            assert off is not None
            _willneed(vhd._fd, off, vhd.bitmap_size)
        for blk in vhd.iter_allocated():
            off = vhd.block_offset(blk)
            assert off is not None
            h.update(vhd.mv[off : off + vhd.bitmap_size])
    st = os.fstat(vhd._fd)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _fingerprint_parent(vhd: VhdFile) -> str:
    """xxh3 of the parent's footer and header: the coalesce changes them only
    when it grows the parent, and records both states then."""
    h = xxhash.xxh3_64()
    h.update(vhd.footer.pack())
    if vhd.header is not None:
        h.update(vhd.header.pack())
    return h.hexdigest()


def _write_json_atomic(path: str, obj: dict[str, Any], durable: bool = True) -> None:
    _io.atomic_write(path, json.dumps(obj, indent=1).encode(), durable=durable, private=True)


@dataclass
class CoalesceResult:
    """What :func:`coalesce` did.

    ``child`` was merged into ``parent``: ``blocks_merged`` of the child's
    blocks, ``sectors_written`` sectors written into the parent,
    ``sectors_skipped_equal`` sectors skipped because the parent already held
    the same bytes, ``blocks_allocated`` new blocks in the parent.  ``grown``
    when the parent's virtual size was raised to the child's, ``resumed`` when
    the run continued from a checkpoint, ``relinked`` the grandchildren
    re-pointed at the parent, and ``seconds`` the run's wall time.
    """

    child: str
    parent: str
    blocks_merged: int
    sectors_written: int
    sectors_skipped_equal: int
    blocks_allocated: int
    grown: bool
    resumed: bool
    relinked: list[str]
    seconds: float


def _vhd_files_in(dirs: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for d in dirs:
        try:
            for e in os.scandir(d):
                if e.is_file(follow_symlinks=False) and e.name.lower().endswith((".vhd", ".avhd")):
                    out.add(e.path)
        except OSError:
            continue
    return sorted(out)


def _find_children(of: VhdFile, dirs: Iterable[str], extra: Sequence[PathLike],
                   exclude: Iterable[str]) -> list[str]:
    """Differencing disks whose parent UUID is ``of``'s UUID: among the
    ``.vhd``/``.avhd`` files of ``dirs`` and the files ``extra``."""
    uid = of.footer.unique_id
    skip = {os.path.realpath(x) for x in exclude}
    out = []
    seen: set[str] = set()
    for c in [os.fspath(e) for e in extra] + _vhd_files_in(dirs):
        real = os.path.realpath(c)
        if real in skip or real in seen:
            continue
        seen.add(real)
        try:
            if not os.path.isfile(c):
                continue
            with VhdFile.open(c) as v:
                if v.is_differencing and v.header is not None and v.header.parent_uuid == uid:
                    out.append(c)
        except (VhdError, OSError):
            continue
    return out


def _search_dirs(child_path: str, chain_options: dict[str, Any]) -> list[str]:
    """The directories a coalesce may search for other disks of the chain:
    the child's and every ``allowed_dirs`` one."""
    dirs = [os.path.dirname(os.path.abspath(child_path))]
    for d in chain_options.get("allowed_dirs") or ():
        d = os.path.abspath(os.fspath(d))
        if d not in dirs:
            dirs.append(d)
    return dirs


def _find_siblings(parent: VhdFile, child_path: str, extra: Sequence[PathLike],
                   dirs: Sequence[str] = ()) -> list[str]:
    """Other differencing disks whose parent UUID is the parent's (in the
    parent's and the child's directory, in ``dirs``, and among ``extra``)."""
    search = [os.path.dirname(os.path.abspath(parent.path)),
              os.path.dirname(os.path.abspath(child_path)), *dirs]
    return _find_children(parent, search, extra, [child_path, parent.path])


def _space_needed(child: VhdFile, parent: VhdFile, new_size: int) -> int:
    """Bytes the parent file grows by: a new block for every child block the
    parent lacks, a relocated BAT when it must grow, fixed-disk growth."""
    if parent.is_fixed:
        return max(0, new_size - parent.virtual_size)
    assert parent.bat is not None
    need = 0
    stride = _new_block_stride(parent)
    for blk in child.allocated_blocks():
        if parent.block_offset(int(blk)) is None:
            need += stride + _PAGE  # a page-aligned block, and a batch's gap
    assert parent.header is not None
    nblocks = -(-new_size // parent.block_size)
    if _bat_must_move(parent, nblocks):
        need += -(-nblocks * 4 // SECTOR) * SECTOR
    if _partial_last_block(parent, new_size) is not None:
        need += parent.bitmap_size + parent.block_size
    return need + FOOTER_SIZE


def _partial_last_block(parent: VhdFile, new_size: int) -> int | None:
    """The parent's last block when growing to ``new_size`` must renew it: it
    is allocated and only partly inside the old virtual size.  Such a block
    may be stored short (FreeBSD ``mkimg`` writes only the sectors the size
    needs, with the footer right after) and its bitmap may have bits set past
    the old end; growing would expose both."""
    if parent.is_fixed or new_size <= parent.virtual_size:
        return None
    if parent.virtual_size % parent.block_size == 0:
        return None
    last = parent.nblocks - 1
    return last if parent.block_offset(last) is not None else None


def _check_parent_offsets(child: VhdFile, parent: VhdFile, new_size: int) -> None:
    """Refuse (before anything is written) a coalesce whose new parent blocks
    would start past what a 32-bit BAT entry addresses (2 TiB)."""
    if parent.is_fixed:
        return
    assert parent.bat is not None
    stride = parent.bitmap_size + parent.block_size
    pos = parent._next_block
    if _partial_last_block(parent, new_size) is not None:
        check_block_offset(pos, parent.path)
        pos += stride
    # new blocks are page-aligned, after a gap of at most a page per batch
    # (an upper bound: every block in a batch of its own)
    stride = _new_block_stride(parent) + _PAGE
    nblocks = -(-new_size // parent.block_size)
    if _bat_must_move(parent, nblocks):
        pos += -(-nblocks * 4 // SECTOR) * SECTOR
    nnew = sum(1 for blk in child.allocated_blocks()
               if int(blk) < nblocks and parent.block_offset(int(blk)) is None)
    if nnew:
        check_block_offset(pos + (nnew - 1) * stride, parent.path)


def _renew_last_block(parent: VhdFile, last: int) -> None:
    """Copy the partial last block to a full-size block in fresh space (its
    bitmap cleared and its data zeroed past the old virtual size), then one
    BAT entry write switches to it.  Until then the old block is in force;
    both read the same within the old size."""
    off = parent.block_offset(last)
    assert off is not None
    n = parent.block_sectors(last)
    bm = bytearray(parent.mv[off : off + parent.bitmap_size])
    for s in range(n, parent.sectors_per_block):
        bm[s >> 3] &= ~(0x80 >> (s & 7)) & 0xFF
    data = bytes(parent.mv[off + parent.bitmap_size : off + parent.bitmap_size + n * SECTOR])
    new = parent.reserve(parent.bitmap_size + parent.block_size)
    check_block_offset(new, parent.path)
    parent._pwrite(data + bytes(parent.block_size - len(data)), new + parent.bitmap_size)
    parent._pwrite(bm, new)
    assert parent.bat is not None
    parent.bat[last] = new // SECTOR
    parent._bat_dirty.add(last)
    parent.flush(durable=True)


def _bat_must_move(parent: VhdFile, nblocks: int) -> bool:
    """True when a BAT of ``nblocks`` entries does not fit where the parent's
    is: more than its ``max table entries``, or the entries past the current
    ones would lie over a block or other metadata (a damaged file)."""
    h = parent.header
    assert h is not None and parent.bat is not None
    if nblocks > h.max_table_entries:
        return True
    if nblocks <= parent.nblocks:
        return False
    a = h.table_offset + parent.nblocks * 4
    b = h.table_offset + -(-nblocks * 4 // SECTOR) * SECTOR
    if b > parent.footer_offset:
        return True
    if any(r0 < b and r1 > a for r0, r1, _ in parent.metadata_regions() if r0 != h.table_offset):
        return True
    starts = parent.bat[parent.bat != BAT_UNUSED].astype(np.int64) * SECTOR
    return bool(np.any((starts < b) & (starts + parent.bitmap_size + parent.block_size > a)))


def _grow_parent(parent: VhdFile, new_size: int) -> None:
    """Grow the parent's virtual size, in an order that is safe at every step:
    whatever write a crash interrupts, the parent reads as before (the child
    never sees a byte it did not see) until one sector write switches it."""
    if parent.is_fixed:
        old = parent.virtual_size
        new_footer = parent.footer.with_(current_size=new_size, original_size=new_size)
        # 1. the footer at the new end, still saying the old size: the file
        #    holds more data than the disk shows; 2. zero the old footer's
        #    place, hidden past the size; 3. one sector write grows the size.
        #    (a resumed coalesce repeats the steps)
        parent._pwrite(parent.footer.pack(), new_size)
        parent._sync()
        parent._pwrite(bytes(FOOTER_SIZE), old)
        parent._sync()
        parent._pwrite(new_footer.pack(), new_size)
        parent._sync()
        parent.footer = new_footer
        parent.footer_offset = new_size
        parent.virtual_size = new_size
        parent._map()
        return
    last = _partial_last_block(parent, new_size)
    if last is not None:
        _renew_last_block(parent, last)
    h = parent.header
    assert h is not None and parent.bat is not None
    nblocks = -(-new_size // parent.block_size)
    bat = np.full(nblocks, BAT_UNUSED, dtype=np.uint32)
    bat[: parent.nblocks] = parent.bat
    new_footer = parent.footer.with_(current_size=new_size, original_size=new_size)
    if _bat_must_move(parent, nblocks):
        # a new BAT in fresh space, then the header points at it: only the
        # header's first sector changes, so even a torn write leaves a valid
        # header (the old or the new one); the size grows with the footer
        raw = encode_bat(bat)
        off = parent.reserve(len(raw))
        parent._pwrite(raw, off)
        parent._sync()
        parent.write_header(h.with_(table_offset=off, max_table_entries=nblocks))
    else:
        if nblocks > parent.nblocks:
            # the entries the new size brings into use must read "unused" on
            # disk before the footer says the disk is larger
            tail = np.full(nblocks - parent.nblocks, BAT_UNUSED, dtype=">u4").tobytes()
            parent._pwrite(tail, h.table_offset + parent.nblocks * 4)
            parent._sync()
    parent.write_footer(new_footer)
    parent.bat = bat
    parent.nblocks = nblocks
    parent.virtual_size = new_size
    parent._map()


def coalesce(child: PathLike, *, relink_children: Sequence[PathLike] = (),
             siblings: Sequence[PathLike] = (), deadline: float | None = None,
             timeout: float | None = None, checkpoint_dir: PathLike | None = None,
             progress: Progress | None = None, batch_blocks: int | None = None,
             chain_options: dict[str, Any] | None = None, skip_space_check: bool = False,
             durable: bool = True) -> CoalesceResult:
    """Merge the differencing disk ``child`` into its immediate parent, in place.

    Per sector: the parent's bitmap is ORed with the child's and the child's
    data wins.  Only the child's sector runs are written, straight from its
    mapping; the parent's data is never read to be copied back.  A parent
    block the parent lacks is placed in fresh space that reads as zeros and
    written sparsely (the child's sectors and its bitmap, no zeros).  Child
    sectors equal to the parent's are not written when the parent's copy is
    in the page cache (comparing costs no I/O then).  The BAT is written at
    checkpoints after the data: every ``batch_blocks`` blocks, or by default
    after every 256 MiB of child data (at most 4096 blocks), so that a child
    with little data in many blocks costs few fsyncs.

    Refuses (``CoalesceError``) when the child is not differencing or the
    parent has other children (in its directory, or among ``siblings``).
    Grows the parent first when the child is larger.  Checks free space up
    front (``NoSpaceError``).

    Resumable: progress is recorded in a checkpoint file (see
    :func:`checkpoint_path`); a ``deadline`` (``time.monotonic()`` value) or
    ``timeout`` (seconds) stops at the next block with a checkpoint and raises
    :class:`VhdTimeoutError`, and so does Ctrl-C.  Re-running continues from
    the checkpoint and refuses (``CheckpointError``) when either file changed
    meanwhile.  Afterwards the child's own children are re-pointed to the
    parent: those named in ``relink_children`` and every other one found in
    the directories it may search (the child's and ``chain_options``'
    ``allowed_dirs``); ``CoalesceResult.relinked`` lists them.  A named disk
    that is not a child of ``child`` is refused before anything is written.
    The child can then be deleted, unless it has children elsewhere.

    The parent is opened for writing after the chain was resolved: it must
    be the same file, and its UUID is checked again.

    ``durable=False`` skips the fsyncs at checkpoints: the write order still
    protects against the process dying, but not against losing power (for
    benchmarks in the page cache and scratch copies).
    """
    t0 = time.monotonic()
    if timeout is not None:
        deadline = min(deadline, t0 + timeout) if deadline is not None else t0 + timeout
    child = os.fspath(child)
    opts = dict(chain_options or {})
    with Chain.open(child, **opts) as chain:
        cvhd = chain.leaf
        if not cvhd.is_differencing:
            raise CoalesceError(f"{child}: a {cvhd.footer.type_name} disk has no parent to "
                                "coalesce into")
        parent_path = chain.layers[1].path
        keys = [(st.st_dev, st.st_ino) for st in (os.fstat(ly._fd) for ly in chain.layers[:2])]
        want_parent = cvhd.header.parent_uuid if cvhd.header is not None else b""
    cpath = checkpoint_path(child, checkpoint_dir)
    ck: dict[str, Any] | None = None
    if os.path.exists(cpath):
        try:
            with open(cpath) as f:
                ck = json.load(f)
            if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
                raise ValueError("unknown checkpoint version")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cpath}: unreadable checkpoint ({exc}); remove it to "
                                  "start over") from None
    # open the child read-only and its parent for writing: the same files the
    # chain resolved, and the parent's UUID checked again
    cvhd = VhdFile.open(child)
    try:
        pvhd = VhdFile.open(parent_path, writable=True)
    except BaseException:
        cvhd.close()
        raise
    pvhd.durable = durable
    # the parent is read a bitmap (and a compared cached sector) at a time:
    # without this, each page fault reads the device's whole read-ahead
    # window around it (8 MiB on some virtual disks), mostly data the child
    # replaces
    # The child too: its sectors are fetched ahead with posix_fadvise
    # (_Prefetch), so a fault waits for its own page at most.
    rnd = getattr(mmap, "MADV_RANDOM", None)
    if rnd is not None:
        for v in (pvhd, cvhd):
            v.map_advice = rnd
            v._map()
    try:
        from .errors import ParentMismatchError

        for v, key in ((cvhd, keys[0]), (pvhd, keys[1])):
            st = os.fstat(v._fd)
            if (st.st_dev, st.st_ino) != key:
                raise ParentMismatchError(f"{v.path} was replaced while the chain was opened; "
                                          "refusing to coalesce")
        if pvhd.footer.unique_id != want_parent:
            raise ParentMismatchError(
                f"{pvhd.path}: UUID is {pvhd.uuid}, not {cvhd.path}'s parent UUID "
                f"{_uuid_str(want_parent)}; refusing to coalesce")
        # the child's own children: those named, and those in the directories
        # a coalesce may search (the child's and --allow-dir ones)
        dirs = _search_dirs(child, opts)
        found = _find_children(cvhd, dirs, (), [cvhd.path, pvhd.path])
        named = []
        for g in relink_children:
            g = os.fspath(g)
            try:
                with VhdFile.open(g) as gv:
                    ok = (gv.is_differencing and gv.header is not None
                          and gv.header.parent_uuid in (cvhd.footer.unique_id,
                                                        pvhd.footer.unique_id))
            except VhdError as exc:
                raise CoalesceError(f"{g}: cannot relink it: {exc}") from None
            if not ok:
                raise CoalesceError(f"{g}: not a child of {cvhd.path}; refusing to relink it")
            named.append(g)
        reals = {os.path.realpath(g) for g in named}
        children = named + [g for g in found if os.path.realpath(g) not in reals]
        return _coalesce_open(cvhd, pvhd, ck, cpath, children, siblings, deadline,
                              progress, batch_blocks, t0, skip_space_check, durable, dirs)
    finally:
        pvhd.close()
        cvhd.close()


def _coalesce_open(cvhd: VhdFile, pvhd: VhdFile, ck: dict[str, Any] | None, cpath: str,
                   relink_children: Sequence[PathLike], siblings: Sequence[PathLike],
                   deadline: float | None, progress: Progress | None, batch_blocks: int | None,
                   t0: float, skip_space_check: bool, durable: bool = True,
                   dirs: Sequence[str] = ()) -> CoalesceResult:
    child_fp = _fingerprint_child(cvhd)
    assert cvhd.header is not None and cvhd.bat is not None
    resumed = ck is not None
    if ck is not None:
        if ck.get("child_uuid") != str(cvhd.uuid) or ck.get("parent_uuid") != str(pvhd.uuid):
            raise CheckpointError(
                f"{cpath}: checkpoint belongs to child {ck.get('child_uuid')} and parent "
                f"{ck.get('parent_uuid')}, not to {cvhd.path} ({cvhd.uuid}) and {pvhd.path} "
                f"({pvhd.uuid})")
        if ck.get("child_fingerprint") != child_fp:
            raise CheckpointError(f"{cvhd.path} changed since the checkpoint {cpath} was "
                                  "written; refusing to continue")
        growing = ck.get("stage") == "growing" and pvhd.virtual_size in (
            ck.get("grow_from"), ck.get("grow_to"))
        if _fingerprint_parent(pvhd) not in ck.get("parent_fingerprints", []) and not growing:
            raise CheckpointError(f"{pvhd.path} changed since the checkpoint {cpath} was "
                                  "written; refusing to continue")
    else:
        sib = _find_siblings(pvhd, cvhd.path, siblings, dirs)
        if sib:
            raise CoalesceError(
                f"{pvhd.path} has other children ({', '.join(sib)}); coalescing {cvhd.path} "
                "into it would change what they read")
    new_size = max(pvhd.virtual_size, cvhd.virtual_size)
    grow = new_size > pvhd.virtual_size
    resuming_fixed_growth = (ck is not None and ck.get("stage") == "growing"
                             and pvhd.footer_offset == ck.get("grow_to"))
    if (grow and pvhd.is_fixed and pvhd.footer_offset != pvhd.virtual_size
            and not resuming_fixed_growth):
        # growing writes the footer at the new size and zeroes the old one's
        # place: bytes between the virtual size and the footer would show
        raise CoalesceError(
            f"{pvhd.path}: fixed disk holds {pvhd.footer_offset} bytes of data but its footer "
            f"says {pvhd.virtual_size}; refusing to grow it ('vhdcore check' shows this)")
    if grow:
        check_virtual_size(new_size, f"{cvhd.path}: the parent would grow to a virtual size")
    _check_parent_offsets(cvhd, pvhd, new_size)
    if not skip_space_check:
        need = _space_needed(cvhd, pvhd, new_size)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(pvhd.path))).free
        if need > free:
            raise NoSpaceError(
                f"coalescing {cvhd.path} into {pvhd.path} needs up to {need} bytes of free "
                f"space; {free} are available", needed=need, available=free)
    state: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "tool": f"vhdcore {__version__}",
        "child": os.path.abspath(cvhd.path),
        "parent": os.path.abspath(pvhd.path),
        "child_uuid": str(cvhd.uuid),
        "parent_uuid": str(pvhd.uuid),
        "child_fingerprint": child_fp,
        "parent_fingerprints": [_fingerprint_parent(pvhd)],
        "stage": "merging",
        "next_block": int(ck.get("next_block", 0)) if ck else 0,
        "started": ck.get("started", time.time()) if ck else time.time(),
    }
    if ck and ck.get("stage") == "merged":
        state["stage"] = "merged"
    if grow or (ck and ck.get("stage") == "growing"):
        # announce the growth before making it, so that a crash in between is
        # recognised on resume (the parent then has either size)
        grow_from = int(ck["grow_from"]) if ck and ck.get("stage") == "growing" \
            else pvhd.virtual_size
        state.update(stage="growing", grow_from=grow_from, grow_to=new_size)
        _write_json_atomic(cpath, state, durable)
        if pvhd.virtual_size < new_size:
            _grow_parent(pvhd, new_size)
        elif pvhd.is_fixed:
            # the new footer was written, so the zeros over the old one's
            # place were durable before it (see _grow_parent); writing them
            # again costs nothing and needs no fsync of its own
            pvhd._pwrite(bytes(FOOTER_SIZE), grow_from)
        else:
            # the footer grew; its copy at offset 0 may not have
            pvhd.sync_footer_copy()
        state.update(stage="merging", parent_fingerprints=[_fingerprint_parent(pvhd)])
        state.pop("grow_from", None)
        state.pop("grow_to", None)
        _write_json_atomic(cpath, state, durable)
    else:
        _write_json_atomic(cpath, state, durable)
    blocks = [int(b) for b in cvhd.allocated_blocks()]
    total = len(blocks)
    merged = written = skipped = allocated = 0
    start = state["next_block"]
    todo = [b for b in blocks if b >= start] if state["stage"] == "merging" else []
    done_before = total - len(todo)
    runs = np.zeros(2 * (pvhd.sectors_per_block // 2 + 1), dtype=np.uint32)
    cbm = bytearray(cvhd.bitmap_size)
    batches = _batches(cvhd, todo, batch_blocks)
    kick = 0
    interrupted: BaseException | None = None

    def checkpoint(next_block: int) -> None:
        # no fsync between the batch's blocks and its BAT entries: until the
        # checkpoint below records the batch, a re-run merges its blocks
        # again (into a block a BAT entry already points at, too); one fsync
        # after the BAT makes the batch durable before the checkpoint says so
        pvhd.flush(durable=durable, barrier=False)
        state["next_block"] = next_block
        _write_json_atomic(cpath, state, durable)

    old_handler = None
    stop_flag = {"sig": False}
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum: int, frame: object) -> None:
            stop_flag["sig"] = True
        try:
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # pragma: no cover
            old_handler = None
    prefetch = _Prefetch(cvhd, todo, writeback_fd=pvhd._fd if durable else -1)
    try:
        place: dict[int, int] = {}
        ends = {e for _, e in batches}
        starts = {s: e for s, e in batches}
        for i, blk in enumerate(todo):
            if i in starts and not pvhd.is_fixed:
                # room for the batch's new parent blocks in one reserve: one
                # fsync makes the new end durable before anything is written
                # past the old footer (see VhdFile.reserve).  Deciding which
                # blocks are new reads the batch's child data: fetch it all
                prefetch.advance(i, through=starts[i])
                place = _reserve_batch(cvhd, pvhd, todo[i : starts[i]], cbm)
            if stop_flag["sig"]:
                interrupted = KeyboardInterrupt()
                checkpoint(blk)
                break
            if deadline is not None and time.monotonic() >= deadline:
                checkpoint(blk)
                interrupted = VhdTimeoutError(
                    f"coalesce of {cvhd.path} stopped at its deadline after "
                    f"{done_before + i}/{total} blocks; run it again to resume from {cpath}")
                break
            prefetch.advance(i)
            w, s, a = _merge_one(cvhd, pvhd, blk, cbm, runs, None, place.get(blk))
            _release_block_pages(cvhd, pvhd, blk)
            kick += w
            if kick * SECTOR >= _WRITEBACK_BYTES and durable:
                prefetch.kick_writeback()
                kick = 0
            written += w
            skipped += s
            allocated += a
            merged += 1
            if i + 1 in ends and i + 1 < len(todo):
                checkpoint(blk + 1)
            if progress is not None:
                progress(done_before + i + 1, total)
        else:
            pvhd.flush(durable=durable, barrier=False)
            state["stage"] = "merged"
            state["next_block"] = cvhd.nblocks
            _write_json_atomic(cpath, state, durable)
    finally:
        prefetch.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted is not None:
        if isinstance(interrupted, KeyboardInterrupt):
            raise VhdTimeoutError(f"coalesce of {cvhd.path} interrupted; run it again to resume "
                                  f"from {cpath}")
        raise interrupted
    relinked = [os.fspath(g) for g in relink_children]
    for g in relinked:
        _relink_unchecked(g, pvhd.path, expected_old_parent=cvhd.footer.unique_id,
                          expected_new_parent=pvhd.footer.unique_id,
                          expected_key=os.fstat(pvhd._fd))
    os.unlink(cpath)
    _fsync_dir(cpath)
    return CoalesceResult(cvhd.path, pvhd.path, merged, written, skipped, allocated, grow,
                          resumed, relinked, time.monotonic() - t0)


_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


def _willneed(fd: int, offset: int, length: int) -> None:
    """Start reading ``length`` bytes at ``offset`` into the page cache, without
    waiting (holes cost nothing)."""
    if _WILLNEED is not None and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, _WILLNEED)
        except OSError:  # pragma: no cover - advice only
            pass


class _Prefetch:
    """Keeps the child's sector runs of the next blocks being read ahead
    (``posix_fadvise(WILLNEED)``, about ``ahead`` bytes of them) from a
    thread of its own, so that the disk reads while the merge writes: the
    child is mapped ``MADV_RANDOM``, so without it each fault would wait for
    one page, and with the default advice each fault would read the device's
    whole read-ahead window.  A second job of the thread: start the parent's
    writeback (:func:`_start_writeback`) when asked, without waiting."""

    #: runs closer than this are fetched as one range
    GAP = 64 * 1024

    def __init__(self, cvhd: VhdFile, todo: Sequence[int], ahead: int = 64 * 1024 * 1024,
                 writeback_fd: int = -1) -> None:
        self.cvhd = cvhd
        self.todo = todo
        self.ahead = ahead
        self.j = 0
        self.want = 0          # fetch at least the blocks before this index
        self.queued: deque[tuple[int, int]] = deque()
        self.pending = 0
        self.stop = False
        self.writeback_fd = writeback_fd
        self.writeback = False
        self.runs = np.zeros(2 * (cvhd.sectors_per_block // 2 + 1), dtype=np.uint32)
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="vhdcore-prefetch", daemon=True)
        self.thread.start()

    def _fetch(self, blk: int) -> int:
        v = self.cvhd
        off = v.block_offset(blk)
        if off is None:
            return 0
        bm = v.mv[off : off + v.bitmap_size]
        n = v.block_sectors(blk)
        cnt = kernels.find_runs(bm, n, self.runs)  # type: ignore[arg-type]
        dstart = off + v.bitmap_size
        total = 0
        a = b = -1
        flat = self.runs[: 2 * cnt].tolist()
        for k in range(0, 2 * cnt, 2):
            s0 = dstart + flat[k] * SECTOR
            s1 = s0 + flat[k + 1] * SECTOR
            total += s1 - s0
            if a >= 0 and s0 - b <= self.GAP:
                b = s1
                continue
            if a >= 0:
                _willneed(v._fd, a, b - a)
            a, b = s0, s1
        if a >= 0:
            _willneed(v._fd, a, b - a)
        return total

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stop and not self.writeback and not (
                        self.j < len(self.todo)
                        and (self.j < self.want or self.pending < self.ahead)):
                    self.cond.wait()
                if self.stop:
                    return
                wb, self.writeback = self.writeback, False
                j = self.j if self.j < len(self.todo) and (
                    self.j < self.want or self.pending < self.ahead) else -1
            if wb:
                _start_writeback(self.writeback_fd)
            if j < 0:
                continue
            try:
                nb = self._fetch(self.todo[j])
            except Exception:  # pragma: no cover - advice only; the merge reads anyway
                nb = 0
            with self.cond:
                self.queued.append((j, nb))
                self.pending += nb
                self.j = j + 1
                self.cond.notify_all()

    def advance(self, i: int, through: int = 0) -> None:
        """Called before merging ``todo[i]``; with ``through``, returns once
        every block before that index has been asked for."""
        with self.cond:
            while self.queued and self.queued[0][0] < i:
                self.pending -= self.queued.popleft()[1]
            self.want = max(self.want, i + 1, through)
            self.cond.notify_all()
            if through:
                while self.j < through and not self.stop and self.thread.is_alive():
                    self.cond.wait(0.5)

    def kick_writeback(self) -> None:
        with self.cond:
            self.writeback = True
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages back without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the disk writes while the
    merge goes on, the final fsync has less left to do, and dirty pages do
    not pile up (they slowed later runs down when they did).  Advice only:
    ordering and durability still come from the fsyncs."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE


_SFR: list[Any] = []


def _sync_file_range() -> Any:
    if not _SFR:
        fn = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _SFR.append(fn)
    return _SFR[0]


def _release_block_pages(cvhd: VhdFile, pvhd: VhdFile, blk: int) -> None:
    """Drop the merged block's pages from our mappings (see Chain.release_block)."""
    for v in (cvhd, pvhd):
        if v.is_fixed:
            _drop_pages(v, blk * cvhd.block_size, cvhd.block_size)
        else:
            off = v.block_offset(blk)
            if off is not None:
                _drop_pages(v, off, v.bitmap_size + v.block_size)


#: new parent blocks are placed so that their data starts on a page
_PAGE = 4096
#: with ``batch_blocks=None``, a checkpoint after this much child data ...
_BATCH_BYTES = 256 * 1024 * 1024
#: ... or after this many blocks, whichever comes first
_BATCH_MAX_BLOCKS = 4096
#: start the parent's writeback after every this many bytes merged
_WRITEBACK_BYTES = 32 * 1024 * 1024


def _new_block_stride(pvhd: VhdFile) -> int:
    """The distance between new parent blocks: bitmap + data, rounded up to
    a page, so that every new block's data starts on a page boundary (a 4 KiB
    child write then dirties one page of the parent, not two)."""
    return -(-(pvhd.bitmap_size + pvhd.block_size) // _PAGE) * _PAGE


def _batches(cvhd: VhdFile, todo: Sequence[int], batch_blocks: int | None
             ) -> list[tuple[int, int]]:
    """Split ``todo`` into [start, end) index ranges, one checkpoint each:
    ``batch_blocks`` blocks each, or (None) as many blocks as hold
    ``_BATCH_BYTES`` of child data (at most ``_BATCH_MAX_BLOCKS``), so that a
    child with little data in many blocks pays few barriers."""
    if batch_blocks is not None:
        step = max(1, batch_blocks)
        return [(i, min(i + step, len(todo))) for i in range(0, len(todo), step)]
    out = []
    start = 0
    acc = 0
    for i, blk in enumerate(todo):
        views = cvhd.block_views(blk)
        if views is not None:
            acc += kernels.bitmap_count(views[0], cvhd.block_sectors(blk)) * SECTOR
        if acc >= _BATCH_BYTES or i + 1 - start >= _BATCH_MAX_BLOCKS:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(todo):
        out.append((start, len(todo)))
    return out


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
    fn = _mincore()
    if fn is None or vhd._mm is None:
        return None
    import ctypes

    length = nsectors * SECTOR
    p0 = offset // _PAGE
    p1 = -(-(offset + length) // _PAGE)
    if p1 * _PAGE > len(vhd._mm) + _PAGE - 1:
        return None
    base = np.frombuffer(vhd._mm, dtype=np.uint8).ctypes.data
    vec = np.zeros(p1 - p0, dtype=np.uint8)
    if fn(ctypes.c_void_p(base + p0 * _PAGE), ctypes.c_size_t((p1 - p0) * _PAGE),
          ctypes.c_void_p(vec.ctypes.data)) != 0:
        return None
    pages = vec & 1
    sec = (offset + np.arange(nsectors, dtype=np.int64) * SECTOR) // _PAGE - p0
    return bytearray(np.packbits(pages[sec].astype(bool)).tobytes())


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
               newblk: memoryview | None, offset: int | None = None) -> tuple[int, int, int]:
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
    have = kernels.bitmap_count(cbm, n)
    if have == 0:
        return 0, 0, 0
    if pvhd.is_fixed:
        pview = pvhd.fixed_view(base, n * SECTOR)
        full = b"\xff" * ((n + 7) // 8)
        skipped = _drop_equal_cached(cbm, cdata, full, pvhd, pview, base, n)
        cnt = kernels.find_runs(cbm, n, runs)  # type: ignore[arg-type]  # numpy: Buffer on 3.12+
        w = 0
        for k in range(cnt):
            s, ln = int(runs[2 * k]), int(runs[2 * k + 1])
            pvhd._pwrite(cdata[s * SECTOR : (s + ln) * SECTOR], base + s * SECTOR)
            w += ln
        return w, skipped, 0
    off = pvhd.block_offset(blk)
    if off is None:
        # a new parent block: the child's sectors only, into fresh space that
        # reads as zeros elsewhere
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
    cnt = kernels.find_runs(cbm, n, runs)  # type: ignore[arg-type]  # numpy: Buffer on 3.12+
    if cnt == 0:
        return 0, skipped, 0
    w = 0
    flat = runs[: 2 * cnt].tolist()
    for k in range(0, 2 * cnt, 2):
        s, ln = flat[k], flat[k + 1]
        pvhd._pwrite(cdata[s * SECTOR : (s + ln) * SECTOR], dstart + s * SECTOR)
        w += ln
    nb = (n + 7) // 8
    newbm = bytearray(pbm)
    kernels.bitmap_or(cbm, newbm, nb)
    if newbm != pbm:
        pvhd._pwrite(newbm, off)
    return w, skipped, 0


# --------------------------------------------------------------------------
@dataclass
class RelinkResult:
    """What :func:`relink` did: ``disk`` now names ``parent`` (UUID, time
    stamp, name, locators).  ``reason`` says why ``parent`` was accepted:
    ``"uuid"`` (it is the disk the child was made against, moved or renamed)
    or ``"content"`` (another disk, e.g. the result of a coalesce, whose
    virtual disk reads byte for byte like the child's current parent).
    ``written`` is False when the disk already said all this."""

    disk: str
    parent: str
    reason: str
    written: bool


def _same_virtual_disk(a: Chain, b: Chain, length: int, chunk: int = 4 * 1024 * 1024) -> bool:
    """True when ``a`` and ``b`` read the same over ``length`` bytes, each
    reading as zero past its own virtual size."""
    ba = aligned_buffer(chunk)
    bb = aligned_buffer(chunk)
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        for ch, buf in ((a, ba), (b, bb)):
            got = ch.read_into(pos, buf[:n]) if pos < ch.virtual_size else 0
            if got < n:
                buf[got:n] = bytes(n - got)
        if ba[:n] != bb[:n]:
            return False
        pos += n
    return True


def relink(disk: PathLike, new_parent: PathLike, *,
           allowed_dirs: Iterable[PathLike] | None = None, allow_absolute: bool = False,
           ) -> RelinkResult:
    """Re-point the differencing disk ``disk`` at ``new_parent`` (what
    ``vhd-util modify -p`` does): parent UUID, parent time stamp, UTF-16BE
    parent name and locators.

    Only after checking that ``new_parent``'s virtual disk is the one
    ``disk`` was made against, which means either:

    * ``new_parent``'s UUID is ``disk``'s parent UUID (the same disk, moved,
      renamed or copied), or
    * ``disk``'s current parent can still be found (through its locators,
      confined to ``allowed_dirs``, default ``disk``'s directory, and with the
      UUID check) and ``new_parent``'s whole virtual disk, read through its
      own chain, equals the current parent's byte for byte (each read as zero
      past its size): for instance the parent a coalesce of the current
      parent went into.

    Anything else is refused (``ParentMismatchError``) and nothing is
    written.  The block sizes must agree, and ``new_parent`` must not be
    larger than ``disk``.  The switch itself is crash-safe: see
    :func:`_relink_unchecked`."""
    from .errors import ParentMismatchError

    disk = os.fspath(disk)
    new_parent = os.fspath(new_parent)
    with VhdFile.open(disk) as d:
        if not d.is_differencing or d.header is None:
            raise CoalesceError(f"{disk}: not a differencing disk; nothing to relink")
        want = d.header.parent_uuid
        dsize = d.virtual_size
        dblock = d.block_size
    with VhdFile.open(new_parent) as p:
        puuid = p.footer.unique_id
        if not p.is_fixed and p.block_size != dblock:
            raise ParentMismatchError(f"{new_parent}: block size {p.block_size} differs from "
                                      f"{disk}'s {dblock}")
        if p.virtual_size > dsize:
            raise ParentMismatchError(f"{new_parent}: virtual size {p.virtual_size} is larger "
                                      f"than {disk}'s {dsize}")
        pkey = os.fstat(p._fd)
    opts: dict[str, Any] = {"allow_absolute": allow_absolute}
    if allowed_dirs is not None:
        opts["allowed_dirs"] = list(allowed_dirs)
    if puuid == want:
        reason = "uuid"
    else:
        try:
            cur = Chain.open(disk, **opts)
        except VhdError as exc:
            raise ParentMismatchError(
                f"{new_parent} has UUID {_uuid_str(puuid)}, not {disk}'s parent UUID "
                f"{_uuid_str(want)}, and the current parent cannot be opened to compare their "
                f"contents ({exc}); refusing to relink") from None
        try:
            with Chain.open(new_parent, **opts) as newc:
                old = Chain.from_layers(cur.layers[1:], owned=False)
                length = max(old.virtual_size, newc.virtual_size)
                if not _same_virtual_disk(old, newc, length):
                    raise ParentMismatchError(
                        f"{new_parent} (UUID {_uuid_str(puuid)}) does not read like {disk}'s "
                        f"parent {cur.layers[1].path} (UUID {_uuid_str(want)}); refusing to "
                        "relink: the child would read other data")
        finally:
            cur.close()
        reason = "content"
    written = _relink_unchecked(disk, new_parent, expected_old_parent=want,
                                expected_new_parent=puuid, expected_key=pkey)
    return RelinkResult(disk, new_parent, reason, written)


def _uuid_str(b: bytes) -> str:
    import uuid as _uuid

    return str(_uuid.UUID(bytes=b))


def _relink_unchecked(grandchild: PathLike, new_parent: PathLike, *,
                      expected_old_parent: bytes | None = None,
                      expected_new_parent: bytes | None = None,
                      expected_key: os.stat_result | None = None) -> bool:
    """Re-point a differencing disk at ``new_parent`` without checking the
    contents (the caller did).  The disk's parent UUID must be
    ``expected_old_parent`` or already the new one; ``new_parent`` is opened
    again and its UUID must be ``expected_new_parent`` (and the same file as
    ``expected_key``), so a file swapped in meanwhile is refused.

    Nothing the disk's current header refers to is overwritten: new locator
    data and a new header go to fresh space at the end of the file, and one
    footer write switches to them (see :meth:`VhdFile.relocate_header`), so
    a crash at any point leaves the disk pointing at its old parent or at
    the new one, never at a mix.  Running it again is harmless.  Returns
    True when it wrote."""
    from .vhd.create import parent_locator_blobs
    from .vhd.format import vhd_timestamp
    from .errors import ParentMismatchError

    grandchild = os.fspath(grandchild)
    new_parent = os.fspath(new_parent)
    with VhdFile.open(new_parent) as p:
        puuid = p.footer.unique_id
        st = os.fstat(p._fd)
        if expected_new_parent is not None and puuid != expected_new_parent:
            raise ParentMismatchError(
                f"{new_parent}: UUID is {_uuid_str(puuid)}, not {_uuid_str(expected_new_parent)} "
                "(the file changed since it was checked)")
        if expected_key is not None and (st.st_dev, st.st_ino) != (expected_key.st_dev,
                                                                   expected_key.st_ino):
            raise ParentMismatchError(f"{new_parent}: another file than the one checked")
        import datetime as _dt

        pstamp = vhd_timestamp(_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc))
    with VhdFile.open(grandchild, writable=True) as g:
        if not g.is_differencing or g.header is None:
            raise CoalesceError(f"{grandchild}: not a differencing disk; nothing to relink")
        h = g.header
        if expected_old_parent is not None and h.parent_uuid not in (expected_old_parent, puuid):
            raise CoalesceError(
                f"{grandchild}: its parent is {h.parent_uuid_obj}, not "
                f"{_uuid_str(expected_old_parent)}")
        old = {loc.code: loc for loc in h.locators if loc.used}
        locs: list[ParentLocator] = []
        blobs = parent_locator_blobs(grandchild, new_parent)
        fresh = []
        for code, blob in blobs:
            slot = old.get(code)
            if not (slot is not None and slot.data_length == len(blob)
                    and slot.data_offset + len(blob) <= g.file_size
                    and bytes(g.mv[slot.data_offset : slot.data_offset + len(blob)]) == blob):
                fresh.append(code)
        # the new locators and the new header in one reserve (one fsync of
        # the new end, see VhdFile.reserve)
        spaces = {code: max(SECTOR, -(-len(blob) // SECTOR) * SECTOR) for code, blob in blobs}
        pos = g.reserve(sum(spaces[c] for c in fresh) + HEADER_SIZE) if fresh else None
        wrote = False
        for code, blob in blobs:
            if code not in fresh:
                slot = old[code]
                locs.append(slot)  # already says this (a repeated relink)
                continue
            assert pos is not None
            space = spaces[code]
            g._pwrite(blob.ljust(space, b"\0"), pos)
            wrote = True
            locs.append(ParentLocator(code=code, data_space=space, data_length=len(blob),
                                      data_offset=pos))
            pos += space
        while len(locs) < 8:
            locs.append(ParentLocator(code=b"\0\0\0\0", data_space=0, data_length=0,
                                      data_offset=0))
        new_header = h.with_(parent_uuid=puuid, parent_timestamp=pstamp,
                             parent_name=os.path.basename(new_parent), locators=tuple(locs))
        if wrote or new_header.pack() != h.pack():
            g.relocate_header(new_header, offset=pos)
            return True
        g.sync_footer_copy()
        return False


# --------------------------------------------------------------------------
def compact(vhd: PathLike, out: PathLike, *, threads: int = 2,
            progress: Progress | None = None,
            chain_options: dict[str, Any] | None = None,
            overwrite: bool = False) -> FlattenResult:
    """Rewrite one VHD without the blocks that hold nothing.

    A fixed or dynamic disk becomes a sparse dynamic VHD without all-zero
    blocks (as :func:`flatten` of a one-disk chain).  A differencing disk
    stays differencing over the same parent: blocks whose bitmap is empty are
    dropped (a zero sector it holds still overrides its parent, so it stays).
    Its parent is resolved (``chain_options`` as for :meth:`Chain.open`,
    ``parent`` included) and the copy's locators name it from the output's
    directory; when the parent cannot be found the copy is refused, unless it
    goes to the input's own directory (then the locators are kept as they are).
    An existing ``out`` is refused unless ``overwrite``.
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
        h = src.header
        assert h is not None and src.bat is not None
        from .vhd.create import parent_locator_blobs

        parent_path: str | None = None
        try:
            with Chain.open(vhd, **(chain_options or {})) as ch:
                parent_path = ch.layers[1].path
        except VhdError as exc:
            same_dir = (os.path.realpath(os.path.dirname(os.path.abspath(out)))
                        == os.path.realpath(os.path.dirname(os.path.abspath(vhd))))
            if not same_dir:
                raise CoalesceError(
                    f"{vhd}: its parent cannot be found ({exc}), so the copy in another "
                    "directory could not name it; name it with --parent, or compact into "
                    f"{os.path.dirname(os.path.abspath(vhd))}") from None
        tmp = out + ".part"
        # copy the header's parent identity and locators (paths stay relative
        # only when the output sits in the same directory)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, _io.FILE_MODE)
        os.close(fd)
        try:
            layout = DynamicLayout(src.virtual_size, src.block_size)
            locs_blobs: list[tuple[bytes, bytes]] = []
            if parent_path is not None:
                # the same parent, named from where the copy lives
                locs_blobs = parent_locator_blobs(out, parent_path)
                h = h.with_(parent_name=os.path.basename(parent_path))
            else:
                for loc in h.locators:
                    if loc.used:
                        locs_blobs.append((loc.code, bytes(
                            src.mv[loc.data_offset : loc.data_offset + loc.data_length])))
            pos = layout.data_start
            new_locs = []
            for code, blob in locs_blobs:
                space = max(SECTOR, -(-len(blob) // SECTOR) * SECTOR)
                new_locs.append(ParentLocator(code, space, len(blob), pos))
                pos += space
            data_start = pos
            nalloc = int(src.allocated_blocks().size)
            if nalloc:
                check_block_offset(data_start + (nalloc - 1) * layout.block_stride, out)
            stored: list[int] = []
            n_sectors = 0
            with open(tmp, "r+b") as f:
                fdn = f.fileno()
                for (_, blob), nl in zip(locs_blobs, new_locs):
                    _io.pwrite_all(fdn, blob.ljust(nl.space_bytes, b"\0"), nl.data_offset)
                total = src.nblocks
                for blk in src.iter_allocated():
                    bm, data = src.block_views(blk)  # type: ignore[misc]
                    n = src.block_sectors(blk)
                    c = kernels.bitmap_count(bm, n)
                    if c == 0:
                        continue
                    off = data_start + len(stored) * layout.block_stride
                    check_block_offset(off, out)
                    _io.pwrite_all(fdn, bm, off)
                    _io.pwrite_all(fdn, bytes(data).ljust(src.block_size, b"\0"),
                                off + layout.bitmap_size)
                    stored.append(blk)
                    n_sectors += c
                    if progress is not None:
                        progress(blk + 1, total)
                bat = np.full(src.nblocks, BAT_UNUSED, dtype=np.uint32)
                if stored:
                    bat[np.asarray(stored)] = (data_start + np.arange(len(stored))
                                               * layout.block_stride) // SECTOR
                footer = src.footer.with_(unique_id=os.urandom(16), disk_type=DISK_DIFFERENCING,
                                          data_offset=FOOTER_SIZE)
                header = h.with_(table_offset=layout.bat_offset, max_table_entries=src.nblocks,
                                 data_offset=0xFFFFFFFFFFFFFFFF,
                                 locators=tuple(new_locs) + tuple(
                                     ParentLocator(b"\0\0\0\0", 0, 0, 0)
                                     for _ in range(8 - len(new_locs))))
                _io.pwrite_all(fdn, footer.pack() + header.pack() + encode_bat(bat), 0)
                _io.pwrite_all(fdn, footer.pack(), data_start + len(stored) * layout.block_stride)
                _io.fsync(fdn)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        _io.replace(tmp, out)
        _fsync_dir(out)
        return FlattenResult(out, "vhd", src.virtual_size, len(stored), n_sectors,
                             os.path.getsize(out))


def repair(vhd: PathLike) -> bool:
    """Restore a missing or damaged primary footer from the copy at offset 0,
    or a copy at offset 0 that an interrupted update left stale from a good
    primary footer.  Returns False when both were fine (nothing written)."""
    vhd = os.fspath(vhd)
    with VhdFile.open(vhd) as v:
        primary_ok = v.primary_footer_ok
        stale_copy = primary_ok and not v.is_fixed and bytes(v.mv[:FOOTER_SIZE]) != v.footer.pack()
        if v.is_fixed and not primary_ok:  # pragma: no cover - open() refuses this case
            raise FormatError(f"{vhd}: a fixed disk has no footer copy to repair from")
        end = v._end_of_data() if not primary_ok else 0
        footer = v.footer
    if primary_ok:
        if not stale_copy:
            return False
        with VhdFile.open(vhd, writable=True) as w:
            return w.sync_footer_copy()
    fd = os.open(vhd, os.O_RDWR)
    try:
        # the footer right after the last block, then cut what follows
        _io.pwrite_all(fd, footer.pack(), end)
        _io.fsync(fd)
        _io.ftruncate(fd, end + FOOTER_SIZE)
        _io.fsync(fd)
    finally:
        os.close(fd)
    with VhdFile.open(vhd) as v:
        if not v.primary_footer_ok:  # pragma: no cover - defensive
            raise FormatError(f"{vhd}: repair did not produce a valid footer")
    return True

