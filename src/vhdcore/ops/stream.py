"""The merged block stream: a chain's blocks merged (youngest layer first)
in parallel threads and yielded in block order, all-zero sectors and the
sectors a filesystem marks free left out; with an optional thread that asks
the kernel to read the next blocks ahead of the merge.

flatten, ``cat -o`` (:mod:`vhdcore.ops.flatwrite`), the imaging job,
``estimate`` and ``repo export`` all read a chain through
:func:`iter_image_blocks`, so they agree on which blocks hold data.  It sits
at the chain's layer: :meth:`vhdcore.chain.Chain.iter_raw` uses its
read-ahead thread, so it does not import the chain
(:class:`BlockSource` is the protocol of what it uses).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .. import kernels
from .._util import aligned_buffer
from ..vhd.format import SECTOR

__all__ = ["BlockSource", "FreeMap", "ImageBlock", "iter_image_blocks", "PREFETCH_BLOCKS"]


class BlockSource(Protocol):
    """What the stream and the flat writer use of a
    :class:`vhdcore.chain.Chain` (named by this protocol rather than
    imported: the chain imports them, for ``cat -o``)."""

    @property
    def virtual_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def bitmap_size(self) -> int: ...
    @property
    def sectors_per_block(self) -> int: ...
    def allocated_blocks(self) -> np.ndarray: ...
    def block_sectors(self, block: int) -> int: ...
    def merge_block(self, block: int, out_data: memoryview | bytearray,
                    out_bitmap: memoryview | bytearray) -> int: ...
    def release_block(self, block: int) -> None: ...
    def prefetch_block(self, block: int) -> None: ...

#: what the stream asks of a free-space map: (block, nsectors) -> bitmap of
#: the block's FREE sectors (MSB first), or None when nothing in it is free.
#: An optional ``skip_blocks`` attribute (a set) names blocks that are free
#: entirely: they are never read.  The one implementation over the guest's
#: filesystems is :class:`vhdcore.fsmap.FsFreeMap`.
FreeMap = Callable[[int, int], "bytes | None"]

#: blocks the prefetch thread reads ahead of the merge (cold caches)
PREFETCH_BLOCKS = 16

# --------------------------------------------------------------------------
# merged block stream
@dataclass
class ImageBlock:
    """One merged block with data.  ``bitmap`` and ``data`` are views of
    reused buffers: valid until the iterator advances, unless the block is
    held (:meth:`hold`)."""

    index: int
    nsectors: int
    sectors_set: int
    bitmap: memoryview
    data: memoryview
    #: bitmap and data as one buffer (``iter_image_blocks(frames=True)``)
    frame: memoryview | None = None
    _give_back: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        """True once :meth:`hold` was called."""
        return self._give_back is None

    def hold(self) -> Callable[[], None]:
        """Keep this block's buffers past the iterator's next step (the
        iterator then does not reuse them); returns the function that
        hands them back, to be called once the caller is done with them.
        Memory grows by one block per block held and not handed back."""
        give, self._give_back = self._give_back, None
        if give is None:
            raise ValueError(f"block {self.index}: held already, or its buffers are not pooled")
        return give

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


def iter_image_blocks(chain: BlockSource, *, threads: int = 2,
                      blocks: Iterable[int] | None = None, free_map: FreeMap | None = None,
                      window: int | None = None, elide_zero: bool = True,
                      prefetch: int = 0, frames: bool = False) -> Iterator[ImageBlock]:
    """Merge the chain's blocks in parallel threads, in block order, and yield
    those that carry data.  With ``elide_zero`` every all-zero sector's bit is
    cleared, so a block reads back the same with fewer sectors stored; a block
    left with no set sector is not yielded.  ``free_map`` clears (and zeroes)
    sectors a filesystem marks free.  At most ``window`` blocks are in memory.
    ``prefetch``: a helper thread asks the kernel to read this many blocks
    ahead of the merge (:meth:`vhdcore.chain.Chain.prefetch_block`; for
    cold caches).  ``frames``: each block's bitmap and data lie in one
    buffer (:attr:`ImageBlock.frame`, the image stream's frame, so no join
    is needed), and a block may be kept past the next step with
    :meth:`ImageBlock.hold`.
    """
    todo = [int(b) for b in (chain.allocated_blocks() if blocks is None else blocks)]
    skip = getattr(free_map, "skip_blocks", None)
    if skip:
        todo = [b for b in todo if b not in skip]
    if prefetch <= 0 or not todo:
        yield from _iter_merged(chain, todo, threads, free_map, window, elide_zero, None,
                                frames)
        return
    ahead = _Prefetcher(chain, todo, prefetch)
    try:
        yield from _iter_merged(chain, todo, threads, free_map, window, elide_zero, ahead,
                                frames)
    finally:
        ahead.stop()


class _Prefetcher:
    """A thread that runs :meth:`vhdcore.chain.Chain.prefetch_block` up to
    ``distance`` blocks ahead of the blocks the merge has started."""

    def __init__(self, chain: BlockSource, todo: Sequence[int], distance: int) -> None:
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



_Buffers = tuple[memoryview, memoryview, "memoryview | None"]
_Merged = tuple[int, int, int, _Buffers]


def _merge_into(chain: BlockSource, blk: int, bufs: tuple[memoryview, memoryview],
                free_map: FreeMap | None,
                elide_zero: bool) -> tuple[int, int]:
    """Merge block ``blk`` into ``bufs`` (bitmap, data), drop its free and
    (with ``elide_zero``) all-zero sectors; returns (sectors in the block,
    sectors left set)."""
    bm, data = bufs
    bs = chain.block_size
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
    return n, filled


def _iter_merged(chain: BlockSource, todo: list[int], threads: int,
                 free_map: FreeMap | None,
                 window: int | None, elide_zero: bool,
                 ahead: _Prefetcher | None, frames: bool = False) -> Iterator[ImageBlock]:
    threads = max(1, threads)
    # buffers for at most the blocks there are (a sparse disk with huge blocks
    # and nothing stored needs none)
    window = min(window or threads * 2, len(todo))
    pool = _BufferPool(chain.bitmap_size, chain.block_size, frames, window)

    def work(blk: int) -> _Merged:
        bufs = pool.take()
        if ahead is not None:
            ahead.advance()
        n, filled = _merge_into(chain, blk, bufs[:2], free_map, elide_zero)
        return blk, n, filled, bufs

    def emit(done: _Merged) -> Iterator[ImageBlock]:
        b, n, filled, bufs = done
        block = None
        try:
            if filled:
                block = ImageBlock(b, n, filled, bufs[0], bufs[1], bufs[2],
                                   lambda: pool.give(bufs))
                yield block
        finally:
            if block is None or not block.held:
                pool.give(bufs)

    if threads == 1:
        for blk in todo:
            yield from emit(work(blk))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vhdcore-merge") as ex:
        yield from _in_order(ex, work, emit, todo, window)


class _BufferPool:
    """The merge's buffers: (bitmap, data, frame); with ``frames`` the bitmap
    and the data are the two parts of one buffer (``frame``), else ``frame``
    is None.  A block that is held gets a fresh buffer in its place when
    none is free; handing it back makes it free again."""

    def __init__(self, bitmap_size: int, block_size: int, frames: bool, count: int) -> None:
        self.bitmap_size, self.block_size, self.frames = bitmap_size, block_size, frames
        self.free: deque[_Buffers] = deque(self.new() for _ in range(count))
        self.lock = threading.Lock()

    def new(self) -> _Buffers:
        if not self.frames:
            return aligned_buffer(self.bitmap_size), aligned_buffer(self.block_size), None
        whole = aligned_buffer(self.bitmap_size + self.block_size)
        return whole[: self.bitmap_size], whole[self.bitmap_size :], whole

    def take(self) -> _Buffers:
        with self.lock:
            if self.free:
                return self.free.popleft()
        return self.new()

    def give(self, bufs: _Buffers) -> None:
        with self.lock:
            self.free.append(bufs)


def _in_order(ex: ThreadPoolExecutor, work: Callable[[int], _Merged],
              emit: Callable[[_Merged], Iterator[ImageBlock]], todo: list[int],
              window: int) -> Iterator[ImageBlock]:
    """Run ``work`` over ``todo`` in ``ex`` with at most ``window`` blocks in
    flight, and ``emit`` the results in order; on the way out, wait for the
    ones still running (their buffers are in use)."""
    pending: deque[Future[_Merged]] = deque()
    it = iter(todo)
    try:
        for blk in it:
            pending.append(ex.submit(work, blk))
            if len(pending) >= window:
                break
        while pending:
            yield from emit(pending.popleft().result())
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
