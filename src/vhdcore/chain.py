"""Differencing chains: open a leaf's parents, validate, read through.

A chain is a list of open :class:`~vhdcore.vhd.file.VhdFile` from the leaf (the
newest differencing disk) to the base (a fixed or dynamic disk).  Each parent
is found by :mod:`vhdcore.parents`: from the child's parent locators and
parent name, confined to ``allowed_dirs`` (by default the leaf's directory),
a regular file, never through an absolute locator path unless the caller
allows those; its footer UUID must equal the child's parent UUID and dynamic
block sizes must agree.  Depth is capped (256 by default) and cycles are
refused, all before any block data is read.
"""
from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterable, Sequence

import numpy as np

from . import _io, kernels
from ._util import aligned_buffer
from .errors import (ChainCycleError, ChainDepthError, ConfinementError, ParentNotFoundError,
                     VhdError)
from .parents import check_parent, find_parent
from .vhd.file import PathLike, VhdFile
from .vhd.format import DEFAULT_BLOCK_SIZE, SECTOR, bitmap_size_for
from .vhd.overlay import merge_layers, read_blocks_into

__all__ = ["Chain", "DEFAULT_MAX_DEPTH", "aligned_buffer", "vhd_to_raw"]

DEFAULT_MAX_DEPTH = 256


class Chain:
    """An open differencing chain, leaf first.

    Use :meth:`open` to resolve a leaf's parents, or :meth:`from_layers` for
    files already open.  All reads go through :meth:`merge_block`, which
    overlays the layers youngest first with the merge kernel: per sector, the
    newest layer that has it wins, and a sector no layer has reads as zero.
    """

    def __init__(self, layers: list[VhdFile], *, owned: bool = True) -> None:
        if not layers:
            raise VhdError("a chain needs at least one disk")
        self.layers = layers
        self._owned = owned
        leaf = layers[0]
        self.leaf = leaf
        self.base = layers[-1]
        self.virtual_size = leaf.virtual_size
        dyn = [ly for ly in layers if not ly.is_fixed]
        self.block_size = dyn[0].block_size if dyn else DEFAULT_BLOCK_SIZE
        self.sectors_per_block = self.block_size // SECTOR
        self.bitmap_bytes = (self.sectors_per_block + 7) // 8
        self.bitmap_size = bitmap_size_for(self.block_size)
        self.nblocks = -(-self.virtual_size // self.block_size)
        self._scratch: memoryview | None = None
        self._scratch_bm: bytearray | None = None

    # --------------------------------------------------------------- opening
    @classmethod
    def from_layers(cls, layers: list[VhdFile], *, owned: bool = True) -> "Chain":
        """A chain of files the caller has already opened and linked, leaf
        first (no parent resolution or link checks: :meth:`open` does those).
        ``owned``: :meth:`close` closes them."""
        return cls(layers, owned=owned)

    @classmethod
    def open(cls, leaf: PathLike, *, allowed_dirs: Iterable[PathLike] | None = None,
             max_depth: int = DEFAULT_MAX_DEPTH, allow_absolute: bool = False,
             allow_special: bool = False, writable: bool = False,
             parent: PathLike | None = None) -> "Chain":
        """Open ``leaf`` and resolve its parents.

        ``allowed_dirs``: directories parents may live in (default: the
        leaf's directory).  ``max_depth``: the most disks a chain may have.
        ``writable``: open the leaf for writing (parents stay read-only).
        ``parent``: the leaf's parent, named explicitly instead of found
        through its locators (for chains copied off a Windows host); it must
        be a regular file whose UUID is the leaf's parent UUID, and its
        directory is allowed for the parents further down.
        """
        leaf = os.fspath(leaf)
        explicit = os.fspath(parent) if parent is not None else None
        roots = _allowed_roots(leaf, allowed_dirs, explicit)
        try:
            st: os.stat_result | None = os.stat(leaf)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode) and not allow_special:
            raise ConfinementError(f"{leaf}: not a regular file")
        layers: list[VhdFile] = []
        seen: dict[tuple[int, int], str] = {}
        try:
            cur = VhdFile.open(leaf, writable=writable)
            while True:
                layers.append(cur)
                _check_walk(cur, layers, seen, leaf, max_depth)
                if not cur.is_differencing:
                    break
                if explicit is not None and len(layers) == 1:
                    pvhd = _open_named_parent(explicit, cur)
                else:
                    ppath, pfd = find_parent(cur, allowed_dirs=roots,
                                             allow_absolute=allow_absolute,
                                             allow_special=allow_special)
                    pvhd = VhdFile(ppath, _fd=pfd)
                _link_parent(cur, pvhd, seen)
                cur = pvhd
        except BaseException:
            for ly in layers:
                ly.close()
            raise
        return cls(layers)

    def close(self) -> None:
        """Close the chain's files (when it owns them); ``with`` does this."""
        if self._owned:
            for ly in self.layers:
                ly.close()

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"<Chain {len(self.layers)} disks, leaf {self.leaf.path!r}>"

    # ---------------------------------------------------------------- blocks
    def block_sectors(self, block: int) -> int:
        """Number of sectors of the virtual disk in ``block`` (the last may be short)."""
        rest = self.virtual_size - block * self.block_size
        if rest <= 0:
            return 0
        return min(self.sectors_per_block, -(-rest // SECTOR))

    def allocated_blocks(self) -> np.ndarray:
        """Blocks that some layer holds data for (fixed layers: all theirs)."""
        mask = np.zeros(self.nblocks, dtype=bool)
        for ly in self.layers:
            if ly.is_fixed:
                n = min(self.nblocks, -(-ly.virtual_size // self.block_size))
                mask[:n] = True
            else:
                a = ly.allocated_blocks()
                mask[a[a < self.nblocks]] = True
        return np.nonzero(mask)[0]

    def merge_block(self, block: int, out_data: memoryview | bytearray,
                    out_bitmap: memoryview | bytearray, *, layers: Sequence[VhdFile] | None = None
                    ) -> int:
        """Merge ``block`` of all layers (youngest first) into ``out_data``
        (at least ``block_sectors(block)*512`` bytes) and ``out_bitmap``
        (at least ``bitmap_bytes``), which is overwritten.  Sectors that no
        layer holds are zeroed and their bits stay clear.  Returns the number
        of sectors some layer held."""
        return merge_layers(self.layers if layers is None else layers, block, self.block_size,
                            self.block_sectors(block), out_data, out_bitmap)

    def prefetch_block(self, block: int) -> None:
        """Ask the kernel to start reading what :meth:`merge_block` of
        ``block`` will read (advice only, for cold caches): youngest layer
        first, the layer's bitmap and data; a layer whose bitmap covers the
        whole block hides the older ones, which are then not read at all.
        Reads the bitmaps (waits for them), so call it from a helper thread
        ahead of the merge."""
        n = self.block_sectors(block)
        if n <= 0:
            return
        start = block * self.block_size
        for ly in self.layers:
            if ly.is_fixed:
                if start < ly.virtual_size:
                    _io.will_need(ly._fd, start, min(n * SECTOR, ly.virtual_size - start))
                return
            off = ly.block_offset(block)
            if off is None:
                continue
            _io.will_need(ly._fd, off, ly.bitmap_size + ly.block_size)
            m = min(n, ly.block_sectors(block))
            try:
                bm = os.pread(ly._fd, (m + 7) // 8, off)
            except OSError:
                return
            if m == n and len(bm) == (m + 7) // 8 and kernels.bitmap_count(bm, m) == n:
                return

    def release_block(self, block: int) -> None:
        """Drop the pages of ``block`` from this process's mappings of every
        layer (after merging it).  The files are mapped read-only, so nothing is
        lost: the kernel keeps them in its page cache and a later access maps
        them again.  Keeps peak RSS at the blocks in flight instead of every
        page ever read."""
        for ly in self.layers:
            if ly.is_fixed:
                start = block * self.block_size
                if start < ly.virtual_size:
                    _drop_pages(ly, start, min(self.block_size, ly.virtual_size - start))
            else:
                off = ly.block_offset(block)
                if off is not None:
                    _drop_pages(ly, off, ly.bitmap_size + ly.block_size)

    def block_owners(self, block: int) -> np.ndarray:
        """Per sector of ``block``: the index in ``layers`` of the layer that
        holds it (0 = leaf), or -1 when no layer does (reads as zero)."""
        n = self.block_sectors(block)
        owner = np.full(n, -1, dtype=np.int16)
        start = block * self.block_size
        for i, ly in enumerate(self.layers):
            if ly.is_fixed:
                m = max(0, min(n, (ly.virtual_size - start) // SECTOR))
                have = np.zeros(n, dtype=bool)
                have[:m] = True
            else:
                v = ly.block_views(block)
                if v is None:
                    continue
                m = min(n, ly.block_sectors(block))
                have = np.zeros(n, dtype=bool)
                have[:m] = np.unpackbits(np.frombuffer(v[0], dtype=np.uint8))[:m].astype(bool)
            owner[(owner < 0) & have] = i
        return owner

    # ----------------------------------------------------------------- reads
    def _scratch_buffers(self) -> tuple[memoryview, bytearray]:
        if self._scratch is None:
            self._scratch = aligned_buffer(self.block_size)
            self._scratch_bm = bytearray(self.bitmap_size)
        assert self._scratch_bm is not None
        return self._scratch, self._scratch_bm

    def read_into(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` with the virtual disk from ``offset``.  Bytes past the
        virtual size are not written; returns the number of bytes read."""
        data, bm = self._scratch_buffers()
        return read_blocks_into(self.merge_block, self.virtual_size, self.block_size, offset, buf,
                                data, bm)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the virtual disk at ``offset`` (clipped to its size)."""
        length = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def iter_raw(self, chunk: int | None = None) -> Iterable[memoryview]:
        """The whole virtual disk as a sequence of views of one reused buffer
        (copy each before the next is produced)."""
        from .ops.stream import PREFETCH_BLOCKS, _Prefetcher

        chunk = chunk or self.block_size
        chunk = max(self.block_size, chunk // self.block_size * self.block_size)
        buf = aligned_buffer(chunk)
        pos = 0
        # read ahead of the merge for cold caches (a helper thread, advice only)
        alloc = [int(b) for b in self.allocated_blocks()]
        ahead = _Prefetcher(self, alloc, PREFETCH_BLOCKS) if alloc else None
        i = 0
        try:
            while pos < self.virtual_size:
                end = pos + min(chunk, self.virtual_size - pos)
                while ahead is not None and i < len(alloc) and alloc[i] * self.block_size < end:
                    ahead.advance()
                    i += 1
                n = self.read_into(pos, buf[: end - pos])
                yield buf[:n]
                pos += n
        finally:
            if ahead is not None:
                ahead.stop()

    def copy_to_raw(self, path: PathLike, *, threads: int = 2) -> int:
        """Write the virtual disk as a raw file (``path + ".part"``, fsynced,
        renamed, the directory fsynced), leaving holes for zero pages: the
        raw output of :func:`vhdcore.ops.flatwrite.write_flat`.  Returns the
        virtual size."""
        from .ops.flatwrite import write_flat

        write_flat(self, os.fspath(path), "raw", threads=threads)
        return self.virtual_size

    # ---------------------------------------------------------------- writes
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes into the leaf at a virtual offset (the chain must be
        opened with ``writable=True``).  Partial sectors are completed with
        their current content read through the chain."""
        data = memoryview(data).cast("B")
        if offset < 0 or offset + len(data) > self.virtual_size:
            raise VhdError(
                f"{self.leaf.path}: write of {len(data)} bytes at {offset} is outside the "
                f"virtual size {self.virtual_size}"
            )
        if not data:
            return
        first = offset // SECTOR
        end = offset + len(data)
        last = -(-end // SECTOR)
        head = offset - first * SECTOR
        if head == 0 and end % SECTOR == 0:
            self.leaf.write_sectors(first, data)
            return
        buf = bytearray((last - first) * SECTOR)
        if head:
            buf[:SECTOR] = self.read(first * SECTOR, SECTOR).ljust(SECTOR, b"\0")
        if end % SECTOR:
            buf[-SECTOR:] = self.read((last - 1) * SECTOR, SECTOR).ljust(SECTOR, b"\0")
        buf[head : head + len(data)] = data
        self.leaf.write_sectors(first, buf)


_PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _drop_pages(vhd: VhdFile, offset: int, length: int) -> None:
    mm = vhd._mm
    if mm is None or _DONTNEED is None:
        return
    start = offset // _PAGE * _PAGE
    end = min(len(mm), offset + length)
    if end > start:
        try:
            mm.madvise(_DONTNEED, start, end - start)
        except (OSError, ValueError):  # pragma: no cover - advice only
            pass


# ------------------------------------------------------ the steps of Chain.open
def _allowed_roots(leaf: str, allowed_dirs: Iterable[PathLike] | None,
                   explicit: str | None) -> list[str]:
    """The real directories parents may live in: ``allowed_dirs`` (default:
    the leaf's directory), plus the directory of a parent named explicitly."""
    if allowed_dirs is None:
        roots = [os.path.realpath(os.path.dirname(os.path.abspath(leaf)))]
    else:
        roots = [os.path.realpath(os.fspath(d)) for d in allowed_dirs]
    if explicit is not None:
        pdir = os.path.realpath(os.path.dirname(os.path.abspath(explicit)))
        if pdir not in roots:
            roots.append(pdir)
    return roots


def _check_walk(cur: VhdFile, layers: list[VhdFile], seen: dict[tuple[int, int], str],
                leaf: str, max_depth: int) -> None:
    """Refuse a chain that comes back to a file it holds, or grows past
    ``max_depth``; note ``cur`` (the newest of ``layers``) as seen."""
    st = os.fstat(cur._fd)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        raise ChainCycleError(
            f"{cur.path}: chain loops back to {seen[key]} after {len(layers) - 1} disks"
        )
    seen[key] = cur.path
    if len(layers) > max_depth:
        raise ChainDepthError(
            f"{leaf}: chain is deeper than the limit of {max_depth} disks"
        )


def _open_named_parent(explicit: str, cur: VhdFile) -> VhdFile:
    """Open the parent named for ``cur`` by the caller: a regular file."""
    try:
        pst = os.stat(explicit)
    except OSError as exc:
        raise ParentNotFoundError(
            f"{explicit}: the parent named for {cur.path} cannot be opened: "
            f"{exc.strerror}") from None
    if not stat.S_ISREG(pst.st_mode):
        raise ConfinementError(f"{explicit}: the parent named for {cur.path} is "
                               "not a regular file")
    return VhdFile.open(explicit)


def _link_parent(cur: VhdFile, pvhd: VhdFile, seen: dict[tuple[int, int], str]) -> None:
    """Check that ``pvhd`` is ``cur``'s parent; else close it and raise (a
    cycle, when it is a file already in the chain, else the mismatch)."""
    try:
        check_parent(cur, pvhd)
    except BaseException:
        # keep the parent for the cycle message only if it is a cycle
        pst = os.fstat(pvhd._fd)
        if (pst.st_dev, pst.st_ino) in seen:
            pvhd.close()
            raise ChainCycleError(
                f"{cur.path}: chain loops back to {seen[(pst.st_dev, pst.st_ino)]}"
            ) from None
        pvhd.close()
        raise


def vhd_to_raw(vhd_path: PathLike, raw_path: PathLike, *, allowed_dirs: list[PathLike] | None = None
               ) -> int:
    """Write the virtual disk of ``vhd_path`` (through its chain) as a raw file,
    sparse where blocks read as zero.  Returns the virtual size."""
    with Chain.open(vhd_path, allowed_dirs=allowed_dirs) as chain:
        return chain.copy_to_raw(raw_path)
