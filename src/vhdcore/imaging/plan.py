"""The plan of an image: which blocks it stores, decided before the stream
is produced (the head's BAT lists them, and the head is the stream's first
bytes).

A block is stored when some sector of it is held by a layer of the chain,
is not marked free by the filesystem map, and holds a byte that is not zero
-- exactly the blocks :func:`~vhdcore.coalesce.iter_image_blocks` yields.
The planner finds this out *without merging the block*: it reads the layers'
sector bitmaps (metadata), and then the data of the live sectors, owner
layer by owner layer, in growing pieces, only until the first non-zero
byte.  A block with data is usually settled by its first 64 KiB (often by
its first sector); only a block that really is all zeros is read whole, and
that block is then never read again.  So the job reads the chain's data
once (the upload stage), plus a small probe per block.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..chain import Chain
from ..ops.stream import FreeMap
from ..vhd.format import SECTOR

__all__ = ["BlockPlanner"]

#: the first probe of a run of live sectors reads this much; each further
#: probe of the run doubles (a block with data is settled by its first bytes)
_FIRST_PROBE = 64 * 1024


class BlockPlanner:
    """Decides, per block, whether the image stores it (see the module
    docstring).  :meth:`candidates` lists the blocks to look at (allocated
    in some layer, not entirely free per the filesystem map);
    :meth:`stores` answers for one block; :meth:`scan` answers for many, in
    order, on ``threads`` threads."""

    def __init__(self, chain: Chain, free_map: FreeMap | None = None, threads: int = 2) -> None:
        self.chain = chain
        self.free_map = free_map
        self.threads = max(1, threads)

    def candidates(self) -> list[int]:
        """Blocks some layer holds data for, less those the filesystem map
        marks entirely free (they are never read)."""
        todo = [int(b) for b in self.chain.allocated_blocks()]
        skip = getattr(self.free_map, "skip_blocks", None)
        if skip:
            todo = [b for b in todo if b not in skip]
        return todo

    def _owners(self, block: int, n: int) -> np.ndarray:
        """Per sector of ``block``: index of the layer that holds it (the
        youngest that has it), -1 when none does."""
        owner = np.full(n, -1, dtype=np.int16)
        start = block * self.chain.block_size
        for i, ly in enumerate(self.chain.layers):
            if ly.is_fixed:
                if start >= ly.virtual_size:
                    continue
                m = len(ly.fixed_view(start, n * SECTOR)) // SECTOR  # as merge_block
                owner[:m][owner[:m] < 0] = i
                continue
            v = ly.block_views(block)
            if v is None:
                continue
            m = min(n, ly.block_sectors(block))
            have = np.unpackbits(np.frombuffer(v[0], dtype=np.uint8), count=m).astype(bool)
            owner[:m][(owner[:m] < 0) & have] = i
            if owner.min() >= 0:
                break
        return owner

    def _sector_data(self, layer: int, block: int, first: int, count: int) -> memoryview:
        """The bytes of sectors ``[first, first + count)`` of ``block`` as
        layer ``layer`` holds them."""
        ly = self.chain.layers[layer]
        if ly.is_fixed:
            start = block * self.chain.block_size + first * SECTOR
            return ly.fixed_view(start, count * SECTOR)
        v = ly.block_views(block)
        assert v is not None
        return v[1][first * SECTOR : (first + count) * SECTOR]

    def stores(self, block: int) -> bool:
        """True when the image stores ``block``: it has a live sector (held
        by a layer, not free) with a non-zero byte."""
        chain = self.chain
        n = chain.block_sectors(block)
        if n <= 0:
            return False
        try:
            owner = self._owners(block, n)
            if self.free_map is not None:
                free = self.free_map(block, n)
                if free is not None:
                    fr = np.unpackbits(np.frombuffer(free, dtype=np.uint8), count=n)
                    owner[fr.astype(bool)] = -1
            for layer, first, count in _runs(owner):
                pos = 0
                step = _FIRST_PROBE // SECTOR
                while pos < count:
                    k = min(step, count - pos)
                    data = self._sector_data(layer, block, first + pos, k)
                    if np.frombuffer(data, dtype=np.uint8).any():
                        return True
                    pos += k
                    step *= 2
            return False
        finally:
            chain.release_block(block)

    def scan(self, blocks: Sequence[int]) -> Generator[tuple[int, bool], None, None]:
        """``(block, stored)`` for each of ``blocks``, in order; the probes
        run on :attr:`threads` threads with a bounded window."""
        if self.threads == 1:
            for b in blocks:
                yield b, self.stores(b)
            return
        yield from _ordered_map(self.stores, blocks, self.threads, 8 * self.threads)


def _runs(owner: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(layer, first sector, count)`` of each run of sectors with one owner
    (runs of unowned sectors left out), in sector order."""
    n = len(owner)
    if n == 0:
        return
    cuts = np.flatnonzero(np.diff(owner)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [n]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        layer = int(owner[s])
        if layer >= 0:
            yield layer, s, e - s


def _ordered_map(fn: Callable[[int], bool], items: Sequence[int], threads: int,
                 window: int) -> Generator[tuple[int, bool], None, None]:
    """``(item, fn(item))`` in order, ``fn`` running on a thread pool with at
    most ``window`` calls in flight."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vhdcore-plan") as ex:
        pending: deque[tuple[int, Future[bool]]] = deque()
        it = iter(items)
        try:
            for b in it:
                pending.append((b, ex.submit(fn, b)))
                if len(pending) >= window:
                    break
            while pending:
                b, fut = pending.popleft()
                res = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, ex.submit(fn, nxt)))
                yield b, res
        finally:
            for _, f in pending:
                f.cancel()
