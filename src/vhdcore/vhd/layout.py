"""The layout of a new sparse dynamic VHD written front to back.

Shared by everything that produces such a file or its stream: ``create``
(dynamic and differencing: the parent's locators go after the BAT),
``flatten`` to a VHD, ``compact``, the image stream of ``image`` and the
repository's ``export``, and the cost estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .format import (
    BAT_UNUSED,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BAT_SECTOR,
    SECTOR,
    DynamicHeader,
    Footer,
    ParentLocator,
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
                 timestamp: int | None = None, data_start: int | None = None,
                 parent: tuple[bytes, int, str] | None = None,
                 locators: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """``parent``: (UUID, time stamp, name) of the parent, for a
        differencing disk; ``locators``: its parent locators' (code, data),
        whose data goes right after the BAT, before the first block."""
        check_virtual_size(virtual_size)
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.nblocks = -(-virtual_size // block_size)
        self.bitmap_size = bitmap_size_for(block_size)
        self.bat_offset = FOOTER_SIZE + HEADER_SIZE
        self.bat_bytes = -(-self.nblocks * 4 // SECTOR) * SECTOR
        pos = self.bat_offset + self.bat_bytes
        locs = []
        #: (offset, data padded to its space) of each parent locator
        self.locator_data: list[tuple[int, bytes]] = []
        for code, blob in locators:
            space = max(SECTOR, -(-len(blob) // SECTOR) * SECTOR)
            locs.append(ParentLocator(code=code, data_space=space, data_length=len(blob),
                                      data_offset=pos))
            self.locator_data.append((pos, blob.ljust(space, b"\0")))
            pos += space
        #: the header's parent locator entries, in the order of ``locators``
        self.locators: tuple[ParentLocator, ...] = tuple(locs)
        self.data_start = pos if data_start is None else data_start
        self.block_stride = self.bitmap_size + block_size
        self.footer = Footer.new(DISK_DYNAMIC if parent is None else DISK_DIFFERENCING,
                                 virtual_size, data_offset=FOOTER_SIZE, unique_id=unique_id)
        if timestamp is not None:
            self.footer = self.footer.with_(timestamp=timestamp)
        puuid, ptime, pname = parent if parent is not None else (b"\0" * 16, 0, "")
        self.header = DynamicHeader(
            table_offset=self.bat_offset, max_table_entries=self.nblocks, block_size=block_size,
            parent_uuid=puuid, parent_timestamp=ptime, parent_name=pname, locators=self.locators)

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
