"""The layout of a new sparse dynamic VHD written front to back.

Shared by everything that produces such a file or its stream: ``flatten`` to
a VHD, ``compact``, the image stream of ``image`` and the repository's
``export``, and the cost estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..format import (
    BAT_UNUSED,
    DISK_DYNAMIC,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BAT_SECTOR,
    SECTOR,
    DynamicHeader,
    Footer,
    bitmap_size_for,
    check_block_offset,
    check_virtual_size,
    encode_bat,
)

__all__ = ["DynamicLayout"]


class DynamicLayout:
    """Where everything goes in a sparse dynamic VHD whose blocks are stored
    in ascending block order right after the BAT: the head (footer copy,
    header, BAT) can be built once the set of stored blocks is known, and
    every block's position follows from its rank."""

    def __init__(self, virtual_size: int, block_size: int, *, unique_id: bytes | None = None,
                 timestamp: int | None = None, data_start: int | None = None) -> None:
        check_virtual_size(virtual_size)
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.nblocks = -(-virtual_size // block_size)
        self.bitmap_size = bitmap_size_for(block_size)
        self.bat_offset = FOOTER_SIZE + HEADER_SIZE
        self.bat_bytes = -(-self.nblocks * 4 // SECTOR) * SECTOR
        self.data_start = self.bat_offset + self.bat_bytes if data_start is None else data_start
        self.block_stride = self.bitmap_size + block_size
        self.footer = Footer.new(DISK_DYNAMIC, virtual_size, data_offset=FOOTER_SIZE,
                                 unique_id=unique_id)
        if timestamp is not None:
            self.footer = self.footer.with_(timestamp=timestamp)
        self.header = DynamicHeader(table_offset=self.bat_offset,
                                    max_table_entries=self.nblocks, block_size=block_size)

    def max_blocks(self) -> int:
        """How many blocks this layout can store before a block's offset no
        longer fits a 32-bit BAT entry (the format's 2 TiB file limit)."""
        last = MAX_BAT_SECTOR * SECTOR
        if last < self.data_start:
            return 0
        return (last - self.data_start) // self.block_stride + 1

    def check_capacity(self, nstored: int) -> None:
        """Refuse (``FormatError``), before anything is written, a file that
        would store ``nstored`` blocks past what 32-bit BAT entries address."""
        if nstored > self.max_blocks():
            check_block_offset(self.block_offset_unchecked(nstored - 1))

    def block_offset_unchecked(self, rank: int) -> int:
        return self.data_start + rank * self.block_stride

    def block_offset(self, rank: int) -> int:
        off = self.data_start + rank * self.block_stride
        check_block_offset(off)
        return off

    def head(self, stored_blocks: Sequence[int]) -> bytes:
        """Footer copy + dynamic header + BAT for blocks stored in this order."""
        self.check_capacity(len(stored_blocks))
        bat = np.full(self.nblocks, BAT_UNUSED, dtype=np.uint32)
        idx = np.asarray(stored_blocks, dtype=np.int64)
        if idx.size:
            bat[idx] = (self.data_start + np.arange(idx.size, dtype=np.int64)
                        * self.block_stride) // SECTOR
        return self.footer.pack() + self.header.pack() + encode_bat(bat)

    def tail(self) -> bytes:
        return self.footer.pack()

    def stream_size(self, nstored: int) -> int:
        return self.data_start + nstored * self.block_stride + FOOTER_SIZE
