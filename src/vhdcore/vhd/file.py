"""One VHD file: open it read-only through mmap, validate it (footer with
its fallbacks, dynamic header, BAT bounds), and give views of its blocks.

Reading never modifies the file.  The write methods come from
:class:`~vhdcore.vhd.write.VhdWriter` (``VhdFile.open(path,
writable=True)``); new files are made by :mod:`vhdcore.vhd.create`.
"""
from __future__ import annotations

import mmap
import os
import stat
import uuid as _uuid
from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from .. import kernels
from ..errors import FormatError, VhdError
from .format import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE,
    DISK_DIFFERENCING,
    DISK_FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR,
    DynamicHeader,
    Footer,
    bitmap_size_for,
    decode_bat,
    decode_locator_path,
)
from .overlay import Buffer, merge_layers, read_blocks_into
from .write import VhdWriter

__all__ = ["VhdFile", "PathLike"]

PathLike = Union[str, "os.PathLike[str]"]

_MAX_LOCATOR_BYTES = 64 * 1024


class VhdFile(VhdWriter):
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
        """Map the file and read its footer, header and BAT (validated)."""
        self._map()
        size = self.file_size
        if size < FOOTER_SIZE - 1:
            raise FormatError(f"{self.path}: {size} bytes is too small for a VHD (truncated?)")
        self._load_footer(size)
        self._load_dynamic()

    def _load_footer(self, size: int) -> None:
        """The footer at EOF; else a 511-byte one; else (dynamic disks) the
        copy at offset 0, and then ``primary_footer_ok`` is False."""
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

    def _load_dynamic(self) -> None:
        """The geometry; for a dynamic or differencing disk its header and
        BAT, checked against the file (and, to write, its layout)."""
        mv = self.mv
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
        self._load_bat(h)

    def _load_bat(self, h: DynamicHeader) -> None:
        """The BAT of a dynamic or differencing disk, checked against the
        file (and, to write, its layout); where new blocks go."""
        f = self.footer
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
        self.bat = decode_bat(self.mv[h.table_offset : bat_end], self.nblocks)
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
        length = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(length)
        bs = self.block_size

        def merge(block: int, data: Buffer, bitmap: Buffer) -> int:
            return merge_layers([self], block, bs, self.block_sectors(block), data, bitmap)

        read_blocks_into(merge, self.virtual_size, bs, offset, buf, bytearray(bs),
                         bytearray(bitmap_size_for(bs)))
        return bytes(buf)

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
