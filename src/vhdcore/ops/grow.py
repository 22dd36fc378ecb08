"""Growing the parent of a coalesce to the child's size, and what a coalesce
needs of the parent before it writes anything: the free space, and new
blocks that a 32-bit BAT entry can address.

Growing is safe at every step: whatever write a crash interrupts, the parent
reads as before until one sector write switches it (a relocated BAT before
the header points at it; the footer with the new size last).
"""
from __future__ import annotations

import numpy as np

from ..vhd.file import VhdFile
from ..vhd.format import BAT_UNUSED, FOOTER_SIZE, SECTOR, check_block_offset, encode_bat
from .coalesce_block import _PAGE, _new_block_stride


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
