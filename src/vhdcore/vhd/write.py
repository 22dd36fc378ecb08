"""The writing side of a VHD file: :class:`VhdWriter`, mixed into
:class:`~vhdcore.vhd.file.VhdFile` (``VhdFile.open(path, writable=True)``).

Writing follows this order, so that a power cut (which may keep or lose each
page written since the last fsync) leaves the old content or the new one:

1. room for new blocks is reserved at once: the footer is written at the new
   end of file and, when the room covers the footer last made durable, it
   is fsynced before any block goes over the old footer (so a valid primary
   footer exists at EOF at every moment);
2. the blocks' data, then their sector bitmaps; new sectors of an existing
   block before its bitmap bits, with an fsync in between;
3. the BAT entries (after an fsync, unless the caller redoes the blocks
   after a crash, as a coalesce does from its checkpoint);
4. the footer copy at offset 0 when the footer changed (after the primary).

A crash therefore leaves at worst an unreferenced region, never a BAT entry
or bitmap bit claiming unwritten data, and never a file without a footer at
EOF.  New files are made by :mod:`vhdcore.vhd.create`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _io
from ..errors import FormatError, VhdError
from .format import FOOTER_SIZE, HEADER_SIZE, SECTOR, DynamicHeader, Footer, check_block_offset, encode_bat

__all__ = ["VhdWriter"]


class VhdWriter:
    """The write methods of :class:`~vhdcore.vhd.file.VhdFile`, which opens,
    maps and validates the file and keeps the attributes used here (the
    BAT, the footer and where it is, where the next block goes)."""

    # set by VhdFile (vhd/file.py) when it opens the file
    path: str
    writable: bool
    durable: bool
    primary_footer_ok: bool
    footer: Footer
    footer_offset: int
    header: DynamicHeader | None
    bat: np.ndarray | None
    bitmap_size: int
    block_size: int
    sectors_per_block: int
    nblocks: int
    virtual_size: int
    _fd: int
    _synced_footer: int
    _next_block: int
    _grown: bool
    _bat_dirty: set[int]

    if TYPE_CHECKING:  # reading methods of VhdFile
        @property
        def mv(self) -> memoryview: ...
        @property
        def is_fixed(self) -> bool: ...
        def block_offset(self, block: int) -> int | None: ...
        def block_sectors(self, block: int) -> int: ...
        def _map(self) -> None: ...

    def _require_writable(self) -> None:
        if not self.writable:
            raise VhdError(f"{self.path}: opened read-only")
        if not self.primary_footer_ok:
            raise FormatError(
                f"{self.path}: the primary footer is damaged; run 'vhdcore repair' first"
            )

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        _io.pwrite_all(self._fd, data, offset)

    def _sync(self) -> None:
        """fsync the file: everything written so far is durable, the footer
        at ``footer_offset`` included."""
        _io.fsync(self._fd)
        self._synced_footer = self.footer_offset

    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (sector multiple) at the end of the data for new
        blocks and write the footer after them at once, so the file always ends
        with a valid footer.  Returns the offset of the reserved region.

        When the region covers the footer that was last made durable (the
        usual case: new space starts where the footer was), the new footer is
        made durable before returning (when ``durable`` is set): otherwise a
        power cut could keep a block written over the old footer and lose the
        file's new end and footer.  Reserve room for a batch of blocks at once
        to pay for one fsync."""
        self._require_writable()
        off = self._next_block
        check_block_offset(off, self.path)
        self._next_block += nbytes
        self._pwrite(self.footer.pack(), self._next_block)
        self.footer_offset = self._next_block
        self._grown = True
        if self.durable and off < self._synced_footer + FOOTER_SIZE and self._next_block > self._synced_footer:
            self._sync()
        return off

    def write_block(self, block: int, bitmap: bytes | bytearray | memoryview,
                    data: bytes | bytearray | memoryview, *, offset: int | None = None) -> None:
        """Write a whole block (bitmap + data of ``block_sectors(block)`` sectors).

        An unallocated block is placed at ``offset`` (from :meth:`reserve`) or
        at a freshly reserved place; its BAT entry is only recorded in memory
        and written by :meth:`flush`.  Data is written before the bitmap.
        """
        self._require_writable()
        if self.bat is None:
            raise FormatError(f"{self.path}: write_block needs a dynamic or differencing disk")
        if not 0 <= block < self.nblocks:
            raise VhdError(f"{self.path}: block {block} is outside the disk ({self.nblocks} blocks)")
        n = self.block_sectors(block) * SECTOR
        if len(data) < n or len(bitmap) < self.bitmap_size:
            raise VhdError(f"{self.path}: block {block} needs {n} data and "
                           f"{self.bitmap_size} bitmap bytes")
        cur = self.block_offset(block)
        if cur is None:
            if offset is None:
                offset = self.reserve(self.bitmap_size + self.block_size)
            check_block_offset(offset, self.path)
            cur = offset
            pad = self.block_size - n
            self._pwrite(memoryview(data)[:n], cur + self.bitmap_size)
            if pad:
                self._pwrite(bytes(pad), cur + self.bitmap_size + n)
            self._pwrite(memoryview(bitmap)[: self.bitmap_size], cur)
            self.bat[block] = cur // SECTOR
            self._bat_dirty.add(block)
        else:
            self._pwrite(memoryview(data)[:n], cur + self.bitmap_size)
            self._pwrite(memoryview(bitmap)[: self.bitmap_size], cur)

    def write_block_runs(self, block: int, bitmap: bytes | bytearray | memoryview,
                         data: bytes | bytearray | memoryview, runs: Any, count: int,
                         offset: int) -> int:
        """Place the unallocated ``block`` at ``offset``, in fresh space that
        :meth:`reserve` left as a hole (it reads as zeros), writing only the
        ``count`` sector runs ``runs[2k], runs[2k+1]`` (first sector, length)
        of ``data`` and then ``bitmap``: no zeros are written for the rest.
        The BAT entry is recorded in memory and written by :meth:`flush`.
        Returns the sectors written."""
        self._require_writable()
        if self.bat is None or self.block_offset(block) is not None:
            raise FormatError(f"{self.path}: block {block} is not a new block of a dynamic disk")
        check_block_offset(offset, self.path)
        dstart = offset + self.bitmap_size
        mv = memoryview(data)
        w = 0
        flat = [int(x) for x in runs[: 2 * count]] if not hasattr(runs, "tolist") \
            else runs[: 2 * count].tolist()
        for k in range(0, 2 * count, 2):
            s, ln = flat[k], flat[k + 1]
            self._pwrite(mv[s * SECTOR : (s + ln) * SECTOR], dstart + s * SECTOR)
            w += ln
        self._pwrite(memoryview(bitmap)[: self.bitmap_size], offset)
        self.bat[block] = offset // SECTOR
        self._bat_dirty.add(block)
        return w

    def write_sectors(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole sectors at a virtual sector number.

        For a differencing disk this marks the sectors as present in this file:
        the caller is responsible for their full content (use
        :meth:`vhdcore.chain.Chain.write` for unaligned writes).
        """
        self._require_writable()
        data = memoryview(data).cast("B")
        if len(data) % SECTOR:
            raise VhdError(f"{self.path}: write of {len(data)} bytes is not whole sectors")
        nsec = len(data) // SECTOR
        if sector < 0 or (sector + nsec) * SECTOR > -(-self.virtual_size // SECTOR) * SECTOR:
            raise VhdError(
                f"{self.path}: write of {nsec} sectors at sector {sector} is past the virtual "
                f"size {self.virtual_size}"
            )
        if self.is_fixed:
            self._pwrite(data, sector * SECTOR)
            return
        spb = self.sectors_per_block
        spans = []
        pos = 0
        while pos < nsec:
            blk, first = divmod(sector + pos, spb)
            count = min(nsec - pos, spb - first)
            spans.append((blk, first, count, data[pos * SECTOR : (pos + count) * SECTOR]))
            pos += count
        # the order for a power cut: room for the new blocks (one reserve,
        # made durable before anything is written over the old footer); all
        # data (and new blocks' bitmaps); a barrier; then what makes the data
        # visible: bitmap bits of existing blocks and the BAT entries of new
        # ones (durable at the next flush)
        new = [blk for blk, _, _, _ in spans if self.block_offset(blk) is None]
        stride = self.bitmap_size + self.block_size
        base = self.reserve(len(new) * stride) if new else 0
        place = {blk: base + i * stride for i, blk in enumerate(new)}
        bitmaps: list[tuple[int, bytearray]] = []
        for blk, first, count, chunk in spans:
            off = self.block_offset(blk)
            if off is None:
                bitmap = bytearray(self.bitmap_size)
                buf = bytearray(self.block_sectors(blk) * SECTOR)
                buf[first * SECTOR : (first + count) * SECTOR] = chunk
                _set_bits(bitmap, first, count)
                self.write_block(blk, bitmap, buf, offset=place[blk])
            else:
                self._pwrite(chunk, off + self.bitmap_size + first * SECTOR)
                bm = bytearray(self.mv[off : off + self.bitmap_size])
                _set_bits(bm, first, count)
                if bm != self.mv[off : off + self.bitmap_size]:
                    bitmaps.append((off, bm))
        if bitmaps or self._bat_dirty:
            if self.durable:
                self._sync()
            for off, bm in bitmaps:
                self._pwrite(bm, off)
        self.flush(durable=False)

    def flush(self, *, durable: bool = True, barrier: bool = True) -> None:
        """Write dirty BAT sectors, after an fsync that makes the blocks they
        point at durable first (when ``durable`` and ``barrier``), then fsync
        (when ``durable``).  ``barrier=False`` is for a caller that can redo
        the blocks after a power cut (a coalesce re-merges every block after
        its last checkpoint), so a BAT entry that reached the disk before its
        block's data does no harm."""
        if not self.writable or self.bat is None:
            if self.writable and durable:
                self._sync()
            return
        if self._bat_dirty:
            if durable and barrier:
                self._sync()
            h = self.header
            assert h is not None
            raw = encode_bat(self.bat)
            sectors = sorted({b * 4 // SECTOR for b in self._bat_dirty})
            # write runs of consecutive dirty BAT sectors
            i = 0
            while i < len(sectors):
                j = i
                while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                    j += 1
                a, b = sectors[i] * SECTOR, (sectors[j] + 1) * SECTOR
                self._pwrite(raw[a:b], h.table_offset + a)
                i = j + 1
            self._bat_dirty.clear()
        if durable:
            self._sync()
        self._map()

    def write_footer(self, footer: Footer, *, durable: bool = True) -> None:
        """Replace the footer: primary at EOF, then the copy at offset 0, then
        (``durable``) one fsync."""
        self._require_writable()
        raw = footer.pack()
        # no fsync between the two: the primary (one sector, in place) is the
        # one in force, and the copy is only read when the primary is
        # damaged; a copy that reaches the disk first is as valid ('check'
        # warns, 'repair' rewrites it)
        self._pwrite(raw, self.footer_offset)
        if not self.is_fixed:
            self._pwrite(raw, 0)
        if durable:
            self._sync()
        self.footer = footer

    def write_header(self, header: DynamicHeader, *, durable: bool = True) -> None:
        """Overwrite the dynamic header in place (two sectors: a torn write
        leaves a damaged header; see :meth:`relocate_header`)."""
        self._require_writable()
        self._pwrite(header.pack(), self.footer.data_offset)
        if durable:
            self._sync()
        self.header = header

    def relocate_header(self, header: DynamicHeader, footer: Footer | None = None, *,
                        durable: bool = True, offset: int | None = None) -> None:
        """Replace the dynamic header without ever overwriting it: the new one
        goes to a fresh place at the end of the data (``offset``, reserved by
        the caller together with other new space, or reserved here), then one
        footer write (at EOF, then the copy at offset 0) switches to it,
        together with any other footer change (``footer``, e.g. a new size).
        A crash at any point leaves the old or the new header in force, never
        a torn one."""
        self._require_writable()
        off = self.reserve(HEADER_SIZE) if offset is None else offset
        self._pwrite(header.pack(), off)
        if durable:
            self._sync()
        self.write_footer((footer or self.footer).with_(data_offset=off), durable=durable)
        self.header = header

    def sync_footer_copy(self, *, durable: bool = True) -> bool:
        """Rewrite the footer copy at offset 0 when it differs from the
        primary footer (an update interrupted between the two writes).
        Returns True when it wrote."""
        self._require_writable()
        if self.is_fixed or bytes(self.mv[:FOOTER_SIZE]) == self.footer.pack():
            return False
        self._pwrite(self.footer.pack(), 0)
        if durable:
            self._sync()
        return True


def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    for s in range(first, first + count):
        bitmap[s >> 3] |= 0x80 >> (s & 7)
