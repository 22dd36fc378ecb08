"""Reading through layers of VHD files, youngest first: one block merged by
the kernel (per sector, the newest layer that has it wins; a sector no layer
has reads as zero), and a byte range read block by block.

:class:`~vhdcore.chain.Chain` reads a chain with these; a single
:class:`~vhdcore.vhd.file.VhdFile` reads its own virtual disk with them too
(as a one-layer chain), so the file layer needs nothing of the chain's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, Union

from .. import kernels
from ..errors import VhdError
from .format import SECTOR

__all__ = ["Layer", "merge_layers", "read_blocks_into"]

Buffer = Union[memoryview, bytearray]


class Layer(Protocol):
    """What a merge reads of a layer: a :class:`~vhdcore.vhd.file.VhdFile`."""

    @property
    def is_fixed(self) -> bool: ...
    @property
    def virtual_size(self) -> int: ...
    def fixed_view(self, offset: int, length: int) -> memoryview: ...
    def block_views(self, block: int) -> tuple[memoryview, memoryview] | None: ...
    def block_sectors(self, block: int) -> int: ...


def merge_layers(layers: Sequence[Layer], block: int, block_size: int, n: int,
                 out_data: Buffer, out_bitmap: Buffer) -> int:
    """Merge the ``n`` sectors of ``block`` of ``layers`` (youngest first)
    into ``out_data`` and ``out_bitmap``, which is overwritten.  Sectors that
    no layer holds are zeroed and their bits stay clear.  Returns the number
    of sectors some layer held."""
    nb = (n + 7) // 8
    memoryview(out_bitmap)[:nb] = bytes(nb)
    filled = 0
    start = block * block_size
    for ly in layers:
        if ly.is_fixed:
            if start >= ly.virtual_size:
                continue
            view = ly.fixed_view(start, n * SECTOR)
            m = len(view) // SECTOR
            if m:
                filled += kernels.overlay_full(view, out_bitmap, out_data, m)
        else:
            v = ly.block_views(block)
            if v is None:
                continue
            m = min(n, ly.block_sectors(block))
            filled += kernels.overlay(v[0], v[1], out_bitmap, out_data, m)
        if filled >= n:
            break
    if filled < n:
        kernels.fill_unset(out_bitmap, out_data, n)
    return filled


def read_blocks_into(merge: Callable[[int, Buffer, Buffer], int], virtual_size: int,
                     block_size: int, offset: int, buf: Buffer, scratch: Buffer,
                     scratch_bitmap: Buffer) -> int:
    """Fill ``buf`` with the virtual disk from ``offset``, each block through
    ``merge(block, data, bitmap)``: a whole block straight into ``buf``, part
    of one through ``scratch`` (a block's size) and ``scratch_bitmap``.
    Bytes past ``virtual_size`` are not written; returns the bytes read."""
    out = memoryview(buf).cast("B")
    if offset < 0:
        raise VhdError(f"negative offset {offset}")
    length = max(0, min(len(out), virtual_size - offset))
    pos = 0
    bs = block_size
    while pos < length:
        off = offset + pos
        blk, within = divmod(off, bs)
        n = min(length - pos, bs - within)
        full = min(bs, -(-(virtual_size - blk * bs) // SECTOR) * SECTOR)
        if within == 0 and n == full and full % SECTOR == 0:
            merge(blk, out[pos : pos + n], scratch_bitmap)
        else:
            merge(blk, scratch, scratch_bitmap)
            out[pos : pos + n] = scratch[within : within + n]
        pos += n
    return length
