"""Page-cache advice for coalesce: a thread that asks the kernel to read the
child's sector runs ahead of the merge and to start the parent's writeback,
and the merged block's pages dropped from the mappings.  Advice only:
ordering and durability come from the fsyncs (:mod:`vhdcore.ops.coalesce`)."""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

from .. import _io, kernels
from ..chain import _drop_pages
from ..vhd.file import VhdFile
from ..vhd.format import SECTOR

__all__ = ["Prefetch", "release_block_pages"]


class Prefetch:
    """Keeps the child's sector runs of the next blocks being read ahead
    (``posix_fadvise(WILLNEED)``, about ``ahead`` bytes of them) from a
    thread of its own, so that the disk reads while the merge writes: the
    child is mapped ``MADV_RANDOM``, so without it each fault would wait for
    one page, and with the default advice each fault would read the device's
    whole read-ahead window.  With ``parent``, the parent's bitmap of each
    block it has is asked for too: the merge reads it (to OR the child's bits
    in), and on a cold cache each of those faults otherwise waited for its
    own read behind the merge's writes (in a profile of a cold random-4 KiB
    coalesce, 28% of the merge thread's samples).  A second job of the
    thread: start the parent's writeback (:func:`_start_writeback`) when
    asked, without waiting."""

    def __init__(self, cvhd: VhdFile, todo: Sequence[int], ahead: int = 64 * 1024 * 1024,
                 writeback_fd: int = -1, parent: VhdFile | None = None) -> None:
        self.cvhd = cvhd
        self.pvhd = parent if parent is not None and not parent.is_fixed else None
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
        p = self.pvhd
        if p is not None and blk < p.nblocks:
            poff = p.block_offset(blk)
            if poff is not None:
                _io.will_need(p._fd, poff, p.bitmap_size)
        v = self.cvhd
        off = v.block_offset(blk)
        if off is None:
            return 0
        bm = v.mv[off : off + v.bitmap_size]
        n = v.block_sectors(blk)
        cnt = kernels.find_runs(bm, n, self.runs)  # type: ignore[arg-type]
        dstart = off + v.bitmap_size
        total = 0
        flat = self.runs[: 2 * cnt].tolist()
        # each run on its own (runs are maximal: none touches the next).  A
        # range reaching over the hole between two runs would make the kernel
        # allocate and zero a page-cache page for every page of the hole:
        # joining runs up to 64 KiB apart had a child of scattered 4 KiB
        # writes "read" whole 2 MiB blocks, 4 GiB of zeroed pages for 256 MiB
        # of data, and a cold coalesce 0.1-0.3 s slower in four alternated runs
        for k in range(0, 2 * cnt, 2):
            length = flat[k + 1] * SECTOR
            _io.will_need(v._fd, dstart + flat[k] * SECTOR, length)
            total += length
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
    (:func:`vhdcore._io.start_writeback` over the whole file): the disk
    writes while the merge goes on, the final fsync has less left to do, and
    dirty pages do not pile up (they slowed later runs down when they did)."""
    _io.start_writeback(fd, 0, os.fstat(fd).st_size)


def release_block_pages(cvhd: VhdFile, pvhd: VhdFile, blk: int) -> None:
    """Drop the merged block's pages from our mappings (see Chain.release_block)."""
    for v in (cvhd, pvhd):
        if v.is_fixed:
            _drop_pages(v, blk * cvhd.block_size, cvhd.block_size)
        else:
            off = v.block_offset(blk)
            if off is not None:
                _drop_pages(v, off, v.bitmap_size + v.block_size)
