"""One VHD file: open read-only through mmap, validate, give views of blocks;
create fixed, dynamic and differencing files and write into them in a
crash-consistent order.

Reading never modifies the file.  Writing (``VhdFile.open(path,
writable=True)`` or the ``create_*`` functions) follows this order, so that
a power cut (which may keep or lose each page written since the last fsync)
leaves the old content or the new one:

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
EOF.  New files are written under a temporary name, fsynced, then linked or
renamed into place and the directory fsynced: complete or absent.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import uuid as _uuid
from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from . import _io, kernels
from .errors import FormatError, VhdError
from .format import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_size_for,
    check_block_offset,
    check_virtual_size,
    decode_bat,
    decode_locator_path,
    encode_bat,
    encode_locator_path,
    vhd_timestamp,
)

__all__ = [
    "VhdFile",
    "create_fixed",
    "create_dynamic",
    "create_differencing",
    "vhd_to_raw",
    "PathLike",
]

PathLike = Union[str, "os.PathLike[str]"]

#: locator codes written into new differencing disks, in this order
LOCATOR_CODES = (b"W2ku", b"W2ru", b"MacX")
_MAX_LOCATOR_BYTES = 64 * 1024


class VhdFile:
    """A VHD file, open for reading (mmap) and optionally for writing.

    Attributes describe the file as found: ``footer``, ``header`` (None for
    fixed disks), ``bat`` (native uint32 array, one entry per block the
    virtual size needs), ``block_size``, ``sectors_per_block``,
    ``bitmap_size``, ``nblocks``, ``virtual_size``, ``footer_offset`` (where
    the primary footer is, or would be) and ``primary_footer_ok`` (False when
    the footer was taken from the copy at offset 0).
    """

    def __init__(self, path: PathLike, *, writable: bool = False, _fd: int | None = None) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        #: fsync at the barriers of the write order (False: only the order
        #: protects, against a dying process but not a power cut)
        self.durable = True
        self._synced_footer = 0
        self._mm: mmap.mmap | None = None
        self._mv: memoryview | None = None
        #: set when a write grew the file past the mapping (see :attr:`mv`)
        self._grown = False
        #: an ``madvise`` advice applied to every mapping of the file (e.g.
        #: ``mmap.MADV_RANDOM`` for a coalesce's parent: a page fault then
        #: reads that page, not the device's whole read-ahead window)
        self.map_advice: int | None = None
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            if _fd is not None:
                self._fd = _fd
            else:
                # never open anything but a regular file: opening a FIFO blocks
                # until a writer comes, opening a device can have side effects.
                # O_NONBLOCK covers a swap between the stat and the open; it
                # means nothing for a regular file and is cleared again.
                st = os.stat(self.path)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(self.path)
                if not stat.S_ISREG(st.st_mode):
                    self._fd = -1
                    raise FormatError(f"{self.path}: not a regular file")
                self._fd = os.open(self.path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                os.set_blocking(self._fd, True)
        except FileNotFoundError as exc:
            raise FormatError(f"{self.path}: no such file") from exc
        except IsADirectoryError as exc:
            raise FormatError(f"{self.path}: is a directory, not a VHD file") from exc
        except OSError as exc:
            raise VhdError(f"{self.path}: cannot open: {exc.strerror}") from exc
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: PathLike, *, writable: bool = False) -> "VhdFile":
        """Open and validate the VHD at ``path``, read-only unless ``writable``."""
        return cls(path, writable=writable)

    def __enter__(self) -> "VhdFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unmap(self) -> None:
        # views handed out (or held by a traceback) keep the mapping alive;
        # then it is released when the last of them goes away
        if self._mv is not None:
            try:
                self._mv.release()
            except BufferError:
                pass
            self._mv = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None

    def close(self) -> None:
        """Unmap and close the file; ``with`` does this."""
        self._unmap()
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<VhdFile {self.path!r} {self.footer.type_name} {self.virtual_size} bytes>"

    def _map(self) -> None:
        self._grown = False
        self._unmap()
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{self.path}: not a regular file")
        self.file_size = st.st_size
        if self.file_size:
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            if self.map_advice is not None:
                self._mm.madvise(self.map_advice)
            self._mv = memoryview(self._mm)
        else:
            self._mv = memoryview(b"")

    @property
    def mv(self) -> memoryview:
        """A read-only view of the whole file (its mmap).  After a write that
        grew the file (a new block, a relocated header) the file is mapped
        again, so that reads through this object see what was written."""
        if self._grown:
            self._grown = False
            self._map()
        assert self._mv is not None, "file is closed"
        return self._mv

    def _load(self) -> None:
        self._map()
        size = self.file_size
        if size < FOOTER_SIZE - 1:
            raise FormatError(f"{self.path}: {size} bytes is too small for a VHD (truncated?)")
        mv = self.mv
        self.primary_footer_ok = True
        self.footer_offset = size - FOOTER_SIZE
        try:
            self.footer = Footer.parse(mv[size - FOOTER_SIZE :] if size >= FOOTER_SIZE
                                       else mv[size - 511 :], source=self.path,
                                       offset=max(0, size - FOOTER_SIZE))
        except FormatError as primary_err:
            footer = None
            # very old files: a 511-byte footer
            if size >= 511 and bytes(mv[size - 511 : size - 503]) == b"conectix":
                try:
                    footer = Footer.parse(mv[size - 511 :], source=self.path, offset=size - 511)
                    self.footer_offset = size - 511
                except FormatError:
                    footer = None
            if footer is None:
                # a damaged primary footer: dynamic disks keep a copy at offset 0
                try:
                    footer = Footer.parse(mv[:FOOTER_SIZE], source=self.path, offset=0)
                except FormatError:
                    raise primary_err from None
                if footer.disk_type == DISK_FIXED:
                    raise primary_err from None
                self.primary_footer_ok = False
                # the primary footer would sit after the last block
                self.footer_offset = size
            self.footer = footer
        f = self.footer
        self.disk_type = f.disk_type
        self.virtual_size = f.current_size
        self.header: DynamicHeader | None = None
        if f.disk_type == DISK_FIXED:
            if f.current_size > self.footer_offset:
                raise FormatError(
                    f"{self.path}: fixed disk of {f.current_size} bytes but only "
                    f"{self.footer_offset} bytes of data before the footer (truncated?)"
                )
            self.block_size = DEFAULT_BLOCK_SIZE
            self.bitmap_size = 0
            self.sectors_per_block = self.block_size // SECTOR
            self.nblocks = -(-f.current_size // self.block_size)
            self.bat = None
            return
        hoff = f.data_offset
        if hoff + HEADER_SIZE > self.footer_offset:
            raise FormatError(
                f"{self.path}: dynamic header offset {hoff} + 1024 lies past the end of the "
                f"data ({self.footer_offset} bytes; truncated?)"
            )
        self.header = h = DynamicHeader.parse(mv[hoff : hoff + HEADER_SIZE], source=self.path,
                                              offset=hoff)
        self.block_size = h.block_size
        self.sectors_per_block = h.block_size // SECTOR
        self.bitmap_size = bitmap_size_for(h.block_size)
        self.nblocks = -(-f.current_size // h.block_size)
        if h.max_table_entries < self.nblocks:
            raise FormatError(
                f"{self.path}: BAT has {h.max_table_entries} entries (dynamic header @28) but a "
                f"virtual size of {f.current_size} needs {self.nblocks} blocks of {h.block_size}"
            )
        bat_end = h.table_offset + self.nblocks * 4
        if bat_end > self.footer_offset:
            raise FormatError(
                f"{self.path}: BAT at offset {h.table_offset} with {self.nblocks} entries "
                f"ends past the data ({self.footer_offset} bytes; truncated?)"
            )
        self.bat = decode_bat(mv[h.table_offset : bat_end], self.nblocks)
        self._bat_dirty: set[int] = set()
        self._validate_bat()
        if self.writable:
            # a block that overlaps metadata or another block would be written
            # over it, and metadata past the footer would place new blocks
            # there: refuse to write into such a file at all
            why = [what for _, _, what in self.layout_conflicts(limit=1)]
            why += [f"the {what} ({r0}..{r1}) runs past the footer at {self.footer_offset}"
                    for r0, r1, what in self.metadata_regions()[1:] if r1 > self.footer_offset]
            if why:
                raise FormatError(f"{self.path}: {why[0]}; refusing to write into a damaged "
                                  "file ('vhdcore check' lists every problem)")
        # new blocks go after all data, and never before the footer: a footer
        # written in front of the one at EOF would not be the one readers use
        self._next_block = max(self._end_of_data(), -(-self.footer_offset // SECTOR) * SECTOR)
        #: where the footer was when the file was last known durable
        self._synced_footer = self.footer_offset

    def _needed_bytes(self, block: int) -> int:
        """Bytes of data a block must have on disk (the last block may be short)."""
        rest = self.virtual_size - block * self.block_size
        need = min(self.block_size, rest)
        return -(-need // SECTOR) * SECTOR

    def _validate_bat(self) -> None:
        bat = self.bat
        assert bat is not None
        alloc = np.nonzero(bat != BAT_UNUSED)[0]
        if alloc.size == 0:
            return
        starts = bat[alloc].astype(np.uint64) * SECTOR
        ends = starts + np.uint64(self.bitmap_size + self.block_size)
        limit = self.footer_offset
        bad = np.nonzero(ends > limit)[0]
        for k in bad:
            blk = int(alloc[k])
            # tolerate a short last block (only the bytes the virtual size needs)
            if int(starts[k]) + self.bitmap_size + self._needed_bytes(blk) <= limit:
                continue
            raise FormatError(
                f"{self.path}: BAT entry {blk} points to sector {int(bat[blk])} (offset "
                f"{int(starts[k])}); the block ends at {int(ends[k])}, past the end of the data "
                f"at {limit}"
            )

    def metadata_regions(self) -> list[tuple[int, int, str]]:
        """(start, end, name) of the footer copy, the dynamic header, the BAT
        and every used parent locator's data space: what blocks must not
        overlap."""
        h = self.header
        assert h is not None
        regions = [
            (0, FOOTER_SIZE, "footer copy"),
            (self.footer.data_offset, self.footer.data_offset + HEADER_SIZE, "dynamic header"),
            (h.table_offset, h.table_offset + -(-self.nblocks * 4 // SECTOR) * SECTOR, "BAT"),
        ]
        for loc in h.locators:
            if loc.used:
                regions.append((loc.data_offset, loc.data_offset + loc.space_bytes,
                                f"parent locator {loc.code.decode('latin-1')}"))
        return regions

    def layout_conflicts(self, limit: int = 100) -> list[tuple[int, int, str]]:
        """(block, offset, message) for blocks that overlap another block or
        the metadata (at most ``limit`` of each kind); empty for a fixed disk."""
        if self.bat is None:
            return []
        out: list[tuple[int, int, str]] = []
        alloc = np.nonzero(self.bat != BAT_UNUSED)[0]
        if alloc.size == 0:
            return out
        starts = self.bat[alloc].astype(np.int64) * SECTOR
        size = self.bitmap_size + self.block_size
        order = np.argsort(starts, kind="stable")
        s_sorted = starts[order]
        for k in np.nonzero(s_sorted[1:] < s_sorted[:-1] + size)[0][:limit]:
            a, b = int(alloc[order[k]]), int(alloc[order[k + 1]])
            out.append((b, int(s_sorted[k + 1]), f"block {b} (offset {int(s_sorted[k + 1])}) "
                                                  f"overlaps block {a} (offset {int(s_sorted[k])})"))
        for r0, r1, what in self.metadata_regions():
            for k in np.nonzero((starts < r1) & (starts + size > r0))[0][:limit]:
                blk = int(alloc[k])
                out.append((blk, int(starts[k]), f"block {blk} overlaps the {what} ({r0}..{r1})"))
        return out

    def _end_of_data(self) -> int:
        """First byte after all metadata and blocks: where a new block goes."""
        h = self.header
        assert h is not None and self.bat is not None
        end = max(FOOTER_SIZE, h.table_offset + (-(-self.nblocks * 4 // SECTOR)) * SECTOR,
                  self.footer.data_offset + HEADER_SIZE)
        for loc in h.locators:
            if loc.used:
                end = max(end, loc.data_offset + loc.space_bytes)
        alloc = self.bat[self.bat != BAT_UNUSED]
        if alloc.size:
            end = max(end, int(alloc.max()) * SECTOR + self.bitmap_size + self.block_size)
        return -(-end // SECTOR) * SECTOR

    # ------------------------------------------------------------------ facts
    @property
    def is_fixed(self) -> bool:
        """True for a fixed disk (the data, then one footer)."""
        return self.disk_type == DISK_FIXED

    @property
    def is_differencing(self) -> bool:
        """True for a differencing disk (one with a parent)."""
        return self.disk_type == DISK_DIFFERENCING

    @property
    def uuid(self) -> _uuid.UUID:
        """The footer's unique id, which a child's header names as its parent."""
        return self.footer.uuid

    def block_sectors(self, block: int) -> int:
        """Number of sectors of the virtual disk in ``block``."""
        rest = self.virtual_size - block * self.block_size
        if rest <= 0:
            return 0
        return min(self.sectors_per_block, -(-rest // SECTOR))

    def block_offset(self, block: int) -> int | None:
        """Byte offset of a block's sector bitmap, or None when unallocated."""
        if self.bat is None:
            raise FormatError(f"{self.path}: a fixed disk has no BAT")
        if block < 0 or block >= self.nblocks:
            return None
        e = int(self.bat[block])
        return None if e == BAT_UNUSED else e * SECTOR

    def block_views(self, block: int) -> tuple[memoryview, memoryview] | None:
        """(sector bitmap, data) views of an allocated block, or None."""
        off = self.block_offset(block)
        if off is None:
            return None
        n = self.block_sectors(block) * SECTOR
        d = off + self.bitmap_size
        return self.mv[off : off + self.bitmap_size], self.mv[d : d + n]

    def fixed_view(self, offset: int, length: int) -> memoryview:
        """A view of a fixed disk's data (clipped to the virtual size)."""
        end = min(offset + length, self.virtual_size)
        return self.mv[offset:end]

    def allocated_blocks(self) -> np.ndarray:
        """Indices of allocated blocks (all blocks for a fixed disk)."""
        if self.bat is None:
            return np.arange(self.nblocks, dtype=np.int64)
        return np.nonzero(self.bat != BAT_UNUSED)[0]

    def allocated_bytes(self) -> int:
        """Bytes of virtual disk this file holds data for (set bitmap bits x 512;
        for a fixed disk, its virtual size)."""
        if self.bat is None:
            return self.virtual_size
        total = 0
        for blk in self.allocated_blocks():
            bm, _ = self.block_views(int(blk))  # type: ignore[misc]
            total += kernels.bitmap_count(bm, self.block_sectors(int(blk)))
        return total * SECTOR

    def parent_locators(self, *, strict: bool = True,
                        damaged: list[str] | None = None) -> list[tuple[str, str]]:
        """(code, path) of every used parent locator whose data lies in the file.

        A damaged locator (absurd length, data past the end of the file) is a
        :class:`FormatError`; with ``strict=False`` it is skipped instead and
        described in ``damaged`` (when given), so that the other locators and
        the parent name can still find the parent.
        """
        out: list[tuple[str, str]] = []
        if self.header is None:
            return out
        for loc in self.header.locators:
            if not loc.used:
                continue
            problem = None
            end = loc.data_offset + loc.data_length
            if loc.data_length > _MAX_LOCATOR_BYTES or loc.data_length > loc.space_bytes + SECTOR:
                problem = (f"{self.path}: parent locator {loc.code!r} claims {loc.data_length} "
                           f"bytes (space {loc.space_bytes})")
            elif end > self.file_size:
                problem = (f"{self.path}: parent locator {loc.code!r} data at offset "
                           f"{loc.data_offset} + {loc.data_length} lies past the end of the file")
            if problem is not None:
                if strict:
                    raise FormatError(problem)
                if damaged is not None:
                    damaged.append(problem)
                continue
            path = decode_locator_path(loc.code, bytes(self.mv[loc.data_offset : end]))
            if path:
                out.append((loc.code.decode("latin-1"), path))
        return out

    # ------------------------------------------------------------- reading
    def read(self, offset: int, length: int) -> bytes:
        """Bytes of this file's own virtual disk (a differencing disk's sectors
        that live in its parent read as zero here; use a Chain to resolve them)."""
        from .chain import Chain

        return Chain.from_layers([self], owned=False).read(offset, length)

    # ------------------------------------------------------------- writing
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
        _check_sector_offset(self.path, off)
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

    def describe(self) -> dict[str, Any]:
        """The file's structures as plain data (``vhdcore info --json``)."""
        f = self.footer
        d: dict[str, Any] = {
            "path": self.path,
            "file_size": self.file_size,
            "type": f.type_name,
            "virtual_size": f.current_size,
            "original_size": f.original_size,
            "uuid": str(f.uuid),
            "timestamp": f.timestamp,
            "creator_app": f.creator_app.decode("latin-1").rstrip("\0 ") or "",
            "creator_version": f"0x{f.creator_version:08x}",
            "creator_os": f.creator_os.decode("latin-1").rstrip("\0"),
            "geometry": list(f.geometry),
            "hidden": f.hidden,
            "saved_state": f.saved_state,
            "footer_offset": self.footer_offset,
            "primary_footer_ok": self.primary_footer_ok,
        }
        h = self.header
        if h is not None and self.bat is not None:
            alloc = self.allocated_blocks()
            d.update({
                "block_size": h.block_size,
                "bat_offset": h.table_offset,
                "max_table_entries": h.max_table_entries,
                "blocks": self.nblocks,
                "allocated_blocks": int(alloc.size),
                "allocated_bytes": self.allocated_bytes(),
            })
            if self.is_differencing:
                try:
                    locs = [{"code": c, "path": p} for c, p in self.parent_locators()]
                except FormatError as exc:
                    locs = [{"error": str(exc)}]
                d.update({
                    "parent_uuid": str(h.parent_uuid_obj),
                    "parent_timestamp": h.parent_timestamp,
                    "parent_name": h.parent_name,
                    "parent_locators": locs,
                })
        return d

    def iter_allocated(self) -> Iterator[int]:
        """The allocated block numbers, ascending, as Python ints."""
        for b in self.allocated_blocks():
            yield int(b)


def _check_sector_offset(path: str, offset: int) -> None:
    check_block_offset(offset, path)


def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    for s in range(first, first + count):
        bitmap[s >> 3] |= 0x80 >> (s & 7)


# ---------------------------------------------------------------- creating
def _layout_dynamic(size: int, block_size: int, locator_blobs: list[tuple[bytes, bytes]]
                    ) -> tuple[int, int, list[ParentLocator], int]:
    """Offsets for a new dynamic/differencing file: (header, BAT, locators, first block)."""
    header_off = FOOTER_SIZE
    bat_off = header_off + HEADER_SIZE
    nblocks = -(-size // block_size)
    bat_bytes = -(-nblocks * 4 // SECTOR) * SECTOR
    pos = bat_off + bat_bytes
    locs = []
    for code, blob in locator_blobs:
        space = max(SECTOR, -(-len(blob) // SECTOR) * SECTOR)
        locs.append(ParentLocator(code=code, data_space=space, data_length=len(blob),
                                  data_offset=pos))
        pos += space
    return header_off, bat_off, locs, pos


def _check_new_size(size: int, block_size: int) -> None:
    check_virtual_size(size)
    if block_size < SECTOR * 8 or block_size & (block_size - 1) or block_size > 256 * 1024 * 1024:
        raise VhdError(f"block size {block_size} must be a power of two from 4 KiB to 256 MiB")


def _create_complete(path: str, exclusive: bool, fill: Any) -> int:
    """Create ``path`` whole or not at all: ``fill(fd)`` writes a temporary
    file beside it, which is fsynced, then linked (``exclusive``: an existing
    ``path`` is an error, as with ``O_EXCL``) or renamed to ``path``, and the
    directory fsynced.  Returns the open descriptor of the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    if exclusive and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _io.FILE_MODE)
    try:
        fill(fd)
        _io.fsync(fd)
        if exclusive:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
                _io.replace(tmp, path)
            else:
                _io.unlink(tmp)
        else:
            _io.replace(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _io.fsync_dir(directory)
    return fd


def _write_new_dynamic(path: str, footer: Footer, header: DynamicHeader,
                       blobs: list[bytes], first_block: int, exclusive: bool) -> VhdFile:
    def fill(fd: int) -> None:
        nblocks = -(-footer.current_size // header.block_size)
        bat = np.full(nblocks, BAT_UNUSED, dtype=np.uint32)
        _io.pwrite_all(fd, footer.pack(), 0)
        _io.pwrite_all(fd, header.pack(), FOOTER_SIZE)
        _io.pwrite_all(fd, encode_bat(bat), header.table_offset)
        for loc, blob in zip(header.locators, blobs):
            _io.pwrite_all(fd, blob.ljust(loc.space_bytes, b"\0"), loc.data_offset)
        _io.pwrite_all(fd, footer.pack(), first_block)

    fd = _create_complete(path, exclusive, fill)
    return VhdFile(path, writable=True, _fd=fd)


def create_fixed(path: PathLike, size: int, *, exclusive: bool = False) -> VhdFile:
    """Create a fixed VHD of ``size`` bytes (sparse on the host filesystem)."""
    path = os.fspath(path)
    _check_new_size(size, DEFAULT_BLOCK_SIZE)
    footer = Footer.new(DISK_FIXED, size)

    def fill(fd: int) -> None:
        _io.ftruncate(fd, size)
        _io.pwrite_all(fd, footer.pack(), size)

    fd = _create_complete(path, exclusive, fill)
    return VhdFile(path, writable=True, _fd=fd)


def create_dynamic(path: PathLike, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                   exclusive: bool = False) -> VhdFile:
    """Create an empty dynamic VHD of ``size`` virtual bytes."""
    path = os.fspath(path)
    _check_new_size(size, block_size)
    header_off, bat_off, _, first = _layout_dynamic(size, block_size, [])
    footer = Footer.new(DISK_DYNAMIC, size, data_offset=header_off)
    header = DynamicHeader(table_offset=bat_off, max_table_entries=-(-size // block_size),
                           block_size=block_size)
    return _write_new_dynamic(path, footer, header, [], first, exclusive)


def create_differencing(path: PathLike, parent: PathLike, *, size: int | None = None,
                        block_size: int | None = None, exclusive: bool = False) -> VhdFile:
    """Create a differencing VHD whose parent is ``parent``.

    The parent is recorded by UUID, modification time, UTF-16BE name and
    locators (see :func:`parent_locator_blobs`).
    """
    path = os.fspath(path)
    parent = os.fspath(parent)
    with VhdFile.open(parent) as p:
        psize = p.virtual_size
        pblock = p.block_size
        puuid = p.footer.unique_id
        if p.is_fixed:
            pblock = block_size or DEFAULT_BLOCK_SIZE
    if block_size is not None and block_size != pblock:
        raise VhdError(f"block size {block_size} differs from the parent's {pblock}")
    size = size or psize
    if size < psize:
        raise VhdError(f"a child ({size} bytes) cannot be smaller than its parent ({psize} bytes)")
    _check_new_size(size, pblock)
    blobs = parent_locator_blobs(path, parent)
    header_off, bat_off, locs, first = _layout_dynamic(size, pblock, blobs)
    footer = Footer.new(DISK_DIFFERENCING, size, data_offset=header_off)
    header = DynamicHeader(
        table_offset=bat_off, max_table_entries=-(-size // pblock), block_size=pblock,
        parent_uuid=puuid, parent_timestamp=vhd_timestamp_of_file(parent),
        parent_name=os.path.basename(parent), locators=tuple(locs),
    )
    return _write_new_dynamic(path, footer, header, [b for _, b in blobs], first, exclusive)


def parent_locator_blobs(child: PathLike, parent: PathLike) -> list[tuple[bytes, bytes]]:
    """(code, data) of the parent locators vhdcore writes for ``child`` over
    ``parent``: ``W2ku`` the parent's absolute path (as the specification
    says), ``W2ru`` and ``MacX`` its path relative to the child's directory
    (what vhdcore itself follows first)."""
    ap = os.path.abspath(os.fspath(parent))
    rel = os.path.relpath(ap, os.path.dirname(os.path.abspath(os.fspath(child))))
    out = []
    for code in LOCATOR_CODES:
        out.append((code, encode_locator_path(code, ap if code == b"W2ku" else rel)))
    return out


def inspect_damaged(path: PathLike) -> dict[str, Any]:
    """What can be read of a VHD file that does not open (``vhdcore info`` on
    a damaged file): the footer at the end and its copy at offset 0, and the
    dynamic header the better footer points to, each field as stored, each
    checksum stored and computed.  Reads at most a few KiB; never raises for
    damaged contents (only when the file cannot be read at all)."""
    from .format import read_footer_fields, read_header_fields

    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file")
    out: dict[str, Any] = {"path": path, "file_size": st.st_size}
    with open(path, "rb") as f:
        size = st.st_size
        if size >= FOOTER_SIZE:
            f.seek(size - FOOTER_SIZE)
            out["footer"] = read_footer_fields(f.read(FOOTER_SIZE))
            out["footer"]["offset"] = size - FOOTER_SIZE
        if size >= 2 * FOOTER_SIZE:
            f.seek(0)
            copy = read_footer_fields(f.read(FOOTER_SIZE))
            if copy["cookie_ok"]:
                copy["offset"] = 0
                out["footer_copy"] = copy
        best = None
        for key in ("footer", "footer_copy"):
            ft = out.get(key)
            if ft and ft["cookie_ok"] and ft["type"] in ("dynamic", "differencing"):
                if best is None or (ft["checksum_ok"] and not best["checksum_ok"]):
                    best = ft
        if best is not None:
            hoff = int(best["data_offset"])
            if 0 <= hoff and hoff + HEADER_SIZE <= size:
                f.seek(hoff)
                out["header"] = read_header_fields(f.read(HEADER_SIZE))
                out["header"]["offset"] = hoff
    bad = [f"{k.replace('_', ' ')} checksum (stored {v['checksum_stored']}, computed "
           f"{v['checksum_computed']})" for k, v in out.items()
           if isinstance(v, dict) and v.get("cookie_ok") and not v["checksum_ok"]]
    out["checksum_failures"] = bad
    return out


def vhd_timestamp_of_file(path: PathLike) -> int:
    """A file's modification time as a VHD timestamp (what blktap records as
    the parent time stamp)."""
    import datetime as _dt

    mtime = os.stat(path).st_mtime
    return vhd_timestamp(_dt.datetime.fromtimestamp(mtime, _dt.timezone.utc))


def vhd_to_raw(vhd_path: PathLike, raw_path: PathLike, *, allowed_dirs: list[PathLike] | None = None
               ) -> int:
    """Write the virtual disk of ``vhd_path`` (through its chain) as a raw file,
    sparse where blocks read as zero.  Returns the virtual size."""
    from .chain import Chain

    with Chain.open(vhd_path, allowed_dirs=allowed_dirs) as chain:
        return chain.copy_to_raw(raw_path)


__all__ += ["vhd_timestamp_of_file", "parent_locator_blobs", "inspect_damaged"]
