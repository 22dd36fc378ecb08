"""Which byte ranges of a virtual disk the guest's filesystems positively mark free.

:func:`map_disk` reads the partition table (MBR with extended/logical
partitions, GPT, or a filesystem on the whole disk) and the free-space maps
of the filesystems it understands (ext2/3/4, XFS, NTFS, Linux swap), and
returns a :class:`DiskMap`.  It starts from "everything is used" and clears
only what a consistent filesystem declares free; anything it does not
understand or that disagrees with itself is kept whole, with the reason.

It is a pure function of the bytes it reads: it never writes anything.  The
only exception it raises on purpose is a :class:`~vhdcore.errors.VhdError`
when the disk itself cannot be read (the ``read`` callable fails or returns
short data); every problem inside a partition becomes a warning.

Typical use by the imaging pipeline::

    dmap = map_disk(chain.read, chain.size)
    states = dmap.block_states(block_size)        # 0 used, 1 partly free, 2 all free
    for start, length in dmap.free_sectors_in(block_start, block_size):
        ...                                       # write zeros there
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._fs import _ranges as R
from ._fs import ext, ntfs, others, swap, xfs
from ._fs.common import SECTOR, DiskReader, FsResult, FsUnsafe, PartReader, Probe
from ._fs.partitions import PartEntry, scan
from .errors import VhdError

if TYPE_CHECKING:
    from .chain import Chain

__all__ = ["SECTOR_SIZE", "DiskMap", "FsFreeMap", "PartitionInfo", "fs_free_map", "map_disk"]

SECTOR_SIZE = SECTOR
_PROBES = (xfs.probe, ext.probe, ntfs.probe, swap.probe)


@dataclass
class PartitionInfo:
    """One partition (or the whole disk when there is no table) and what was found in it."""

    index: int
    start: int
    length: int
    table: str  # "mbr", "gpt" or "none"
    type_hint: str
    fs: str | None = None  # "ext2"/"ext3"/"ext4"/"xfs"/"ntfs"/"swap"/None
    uuid: str | None = None
    state: str = "kept-whole"  # "clean", "journal-applied", "kept-whole" ("journal-ignored")
    reason: str = ""
    used_bytes: int = 0
    free_bytes: int = 0
    fs_free_bytes: int | None = None  # what the filesystem itself reports free
    warnings: list[str] = field(default_factory=list)
    _free: tuple[np.ndarray, np.ndarray] = field(default_factory=R.empty, repr=False)

    def free_ranges(self) -> list[tuple[int, int]]:
        """Free byte ranges (absolute disk offsets) inside this partition."""
        s, e = self._free
        return list(zip(s.tolist(), (e - s).tolist()))

    def to_json(self, include_ranges: bool = False) -> dict[str, Any]:
        d = {
            "index": self.index,
            "start": self.start,
            "length": self.length,
            "table": self.table,
            "type": self.type_hint,
            "fs": self.fs,
            "uuid": self.uuid,
            "state": self.state,
            "reason": self.reason,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "skipped_bytes": self.free_bytes,
            "fs_reported_free_bytes": self.fs_free_bytes,
            "warnings": list(self.warnings),
        }
        if include_ranges:
            d["skipped_ranges"] = [[s, n] for s, n in self.free_ranges()]
        return d


@dataclass
class DiskMap:
    """Result of :func:`map_disk`.

    ``free`` ranges are sorted, merged, non-overlapping, 512-byte aligned
    ``(start, length)`` byte ranges of the whole disk.
    """

    size: int
    table: str
    partitions: list[PartitionInfo]
    warnings: list[str]
    _starts: np.ndarray = field(repr=False)
    _ends: np.ndarray = field(repr=False)

    @property
    def free(self) -> list[tuple[int, int]]:
        """The free ranges as ``(offset, length)`` byte pairs, ascending."""
        return list(zip(self._starts.tolist(), (self._ends - self._starts).tolist()))

    @property
    def free_bytes(self) -> int:
        """The number of bytes marked free."""
        return int((self._ends - self._starts).sum())

    def free_sectors_in(self, start: int, length: int) -> Iterator[tuple[int, int]]:
        """Free ``(offset, length)`` pieces inside ``[start, start + length)``, in order."""
        end = start + length
        i = int(np.searchsorted(self._ends, start, side="right"))
        n = self._starts.size
        while i < n:
            s = int(self._starts[i])
            if s >= end:
                break
            e = int(self._ends[i])
            lo, hi = max(s, start), min(e, end)
            if hi > lo:
                yield lo, hi - lo
            i += 1

    def is_free(self, start: int, length: int) -> bool:
        """True when all of ``[start, start + length)`` is free."""
        i = int(np.searchsorted(self._ends, start, side="right"))
        return i < self._starts.size and self._starts[i] <= start and self._ends[i] >= start + length

    def free_bitmap_for_block(self, block_index: int, block_size: int) -> bytes | None:
        """VHD-style sector bitmap of one block, MSB first, bit = 1 meaning the sector is FREE.

        None when no sector of the block is free.
        """
        if block_size % SECTOR:
            raise ValueError("block_size must be a multiple of 512")
        start = block_index * block_size
        nsect = block_size // SECTOR
        bits = np.zeros(nsect, dtype=np.uint8)
        any_free = False
        for off, ln in self.free_sectors_in(start, block_size):
            a = (off - start) // SECTOR
            bits[a : a + ln // SECTOR] = 1
            any_free = True
        if not any_free:
            return None
        return np.packbits(bits, bitorder="big").tobytes()

    def block_states(self, block_size: int, nblocks: int | None = None) -> np.ndarray:
        """Per VHD block: 0 = nothing free, 1 = partly free, 2 = entirely free (uint8)."""
        if block_size % SECTOR or block_size <= 0:
            raise ValueError("block_size must be a positive multiple of 512")
        if nblocks is None:
            nblocks = -(-self.size // block_size)
        free_per_block = np.zeros(nblocks + 1, dtype=np.int64)
        s, e = self._starts, self._ends
        if s.size:
            # add each range's bytes to the blocks it covers, via a difference array
            bs_ = s // block_size
            be_ = (e - 1) // block_size
            same = bs_ == be_
            np.add.at(free_per_block, np.minimum(bs_[same], nblocks), (e - s)[same])
            # ranges spanning blocks: head piece, full middle blocks, tail piece
            ms, me = s[~same], e[~same]
            mb, meb = bs_[~same], be_[~same]
            np.add.at(free_per_block, np.minimum(mb, nblocks), (mb + 1) * block_size - ms)
            np.add.at(free_per_block, np.minimum(meb, nblocks), me - meb * block_size)
            full = np.zeros(nblocks + 2, dtype=np.int64)
            np.add.at(full, np.minimum(mb + 1, nblocks + 1), 1)
            np.add.at(full, np.minimum(meb, nblocks + 1), -1)
            free_per_block[: nblocks + 1] += np.cumsum(full)[: nblocks + 1] * block_size
        f = free_per_block[:nblocks]
        sizes = np.full(nblocks, block_size, dtype=np.int64)
        if nblocks and self.size < nblocks * block_size:
            sizes[-1] = max(0, self.size - (nblocks - 1) * block_size)
        out = np.zeros(nblocks, dtype=np.uint8)
        out[f > 0] = 1
        out[(f >= sizes) & (sizes > 0)] = 2
        return out

    def to_json(self, include_ranges: bool = False) -> dict[str, Any]:
        """A JSON-ready summary (``--json`` output and image metadata)."""
        return {
            "disk_size": self.size,
            "table": self.table,
            "free_bytes": self.free_bytes,
            "skipped_bytes": self.free_bytes,
            "free_ranges": int(self._starts.size),
            "partitions": [p.to_json(include_ranges) for p in self.partitions],
            "warnings": list(self.warnings),
        }


def _probe_and_analyze(part: PartReader, journal_overlay: bool, info: PartitionInfo) -> FsResult:
    hits: list[Probe] = []
    for p in _PROBES:
        try:
            h = p(part)
        except FsUnsafe:
            h = None
        if h is not None:
            hits.append(h)
    if not hits:
        other = others.identify(part)
        reason = f"{other} is not parsed" if other else "no filesystem recognised"
        return FsResult(fs=None, uuid=None, state="kept-whole", reason=reason)
    if len(hits) > 1:
        names = ", ".join(h.fs for h in hits)
        return FsResult(
            fs=None,
            uuid=None,
            state="kept-whole",
            reason=f"several filesystem signatures ({names}); ambiguous",
        )
    hit = hits[0]
    try:
        assert hit.analyze is not None
        return hit.analyze(part, hit, journal_overlay=journal_overlay)
    except FsUnsafe as exc:
        return FsResult(fs=hit.fs, uuid=hit.uuid, state="kept-whole", reason=str(exc))
    except VhdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parser bug or unforeseen data: keep it all
        return FsResult(
            fs=hit.fs,
            uuid=hit.uuid,
            state="kept-whole",
            reason=f"could not parse the {hit.fs} metadata ({type(exc).__name__}: {exc})",
        )


def _check_layout(entries: list[PartEntry], size: int) -> dict[int, str]:
    """Reasons to keep partitions whole without looking inside: past the end, overlap."""
    bad: dict[int, str] = {}
    for i, e in enumerate(entries):
        if e.start + e.length > size:
            bad[i] = f"partition extends past the end of the disk ({e.start + e.length} > {size})"
        elif e.container and not (e.container[0] <= e.start and e.start + e.length <= e.container[1]):
            bad[i] = "logical partition lies outside its extended partition"
    order = sorted(range(len(entries)), key=lambda k: entries[k].start)
    for a_pos, a in enumerate(order):
        ea = entries[a]
        for b in order[a_pos + 1 :]:
            eb = entries[b]
            if eb.start >= ea.start + ea.length:
                break
            bad.setdefault(a, f"partition overlaps partition {eb.index}")
            bad.setdefault(b, f"partition overlaps partition {ea.index}")
    return bad


def _map_partition(disk: DiskReader, e: PartEntry, bad: str | None, journal_overlay: bool,
                   info: PartitionInfo, warnings: list[str]
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """The free byte ranges of one partition on the disk (None: kept whole),
    filling in ``info``."""
    if e.length <= 0:
        info.reason = "empty partition"
        return None
    if bad is not None:
        info.reason = bad
        warnings.append(f"partition {e.index}: {bad}; kept whole")
        return None
    part = PartReader(disk, e.start, e.length)
    res = _probe_and_analyze(part, journal_overlay, info)
    info.fs, info.uuid, info.state, info.reason = res.fs, res.uuid, res.state, res.reason
    info.warnings.extend(res.warnings)
    info.fs_free_bytes = res.fs_free_bytes
    if res.state == "kept-whole":
        if res.fs is not None:
            warnings.append(f"partition {e.index} ({res.fs}) kept whole: {res.reason}")
        return None
    fr = R.align_inward(R.clip(R.shift(res.free, e.start), e.start, e.start + e.length), SECTOR)
    info._free = fr
    return fr


def _keep_tables(free: tuple[np.ndarray, np.ndarray], table_keep: list[tuple[int, int]],
                 infos: list[PartitionInfo], warnings: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Never free: sector 0, the partition tables and EBRs, whatever a table says."""
    keep = [(0, SECTOR)] + list(table_keep)
    ks = np.array([k[0] for k in keep], dtype=np.int64)
    ke = np.array([k[1] for k in keep], dtype=np.int64)
    if R.overlaps_any(free, (ks, ke)):
        warnings.append("a filesystem's free space overlapped partition-table sectors; those were kept")
        free = R.difference(free, (ks, ke))
        for info in infos:
            info._free = R.difference(info._free, (ks, ke))
    return free


def map_disk(
    read: Callable[[int, int], bytes], size: int, *, journal_overlay: bool = True
) -> DiskMap:
    """Map the byte ranges of a virtual disk that its filesystems positively mark free.

    ``read(offset, length)`` must return exactly ``length`` bytes of the
    (coalesced) virtual disk; ``size`` is the disk's length in bytes.

    ``journal_overlay`` (default True) applies the committed but not yet
    replayed transactions of an ext3/ext4 journal virtually before reading
    descriptors and bitmaps.  Turning it off reads the on-disk bitmaps of a
    filesystem that needs recovery as they are, which can call blocks free
    that the journal will make used: it exists to demonstrate that danger in
    tests, never to be used for imaging.

    Raises :class:`~vhdcore.errors.VhdError` only when the disk cannot be read.
    """
    disk = DiskReader(read, size)
    table = scan(disk)
    warnings = list(table.warnings)
    infos: list[PartitionInfo] = []
    free_parts: list[tuple[np.ndarray, np.ndarray]] = []
    bad = _check_layout(table.entries, disk.size)
    for i, e in enumerate(table.entries):
        info = PartitionInfo(e.index, e.start, e.length, e.table, e.type_hint)
        infos.append(info)
        fr = _map_partition(disk, e, bad.get(i), journal_overlay, info, warnings)
        if fr is not None:
            free_parts.append(fr)
    free = R.union(*free_parts) if free_parts else R.empty()
    free = _keep_tables(free, table.keep, infos, warnings)
    free = R.clip(free, 0, disk.size)
    for info in infos:
        info.free_bytes = R.total(info._free)
        info.used_bytes = info.length - info.free_bytes
    starts, ends = free
    return DiskMap(
        size=disk.size,
        table=table.kind,
        partitions=infos,
        warnings=warnings,
        _starts=np.ascontiguousarray(starts, dtype=np.int64),
        _ends=np.ascontiguousarray(ends, dtype=np.int64),
    )


class FsFreeMap:
    """A :class:`DiskMap` seen block by block: the free-space map the block
    stream takes (:data:`vhdcore.ops.stream.FreeMap`).  Blocks that are
    entirely free are never read (``skip_blocks``); in partly free blocks the
    free sectors are dropped from the bitmap and zeroed (the call returns
    their bitmap, :meth:`DiskMap.free_bitmap_for_block`)."""

    def __init__(self, disk_map: DiskMap, block_size: int) -> None:
        self.disk_map = disk_map
        self.block_size = block_size
        states = disk_map.block_states(block_size)
        self.skip_blocks = set(np.nonzero(states == 2)[0].tolist())
        self._partial = set(np.nonzero(states == 1)[0].tolist())

    def __call__(self, block: int, nsectors: int) -> bytes | None:
        if block not in self._partial:
            return None
        return self.disk_map.free_bitmap_for_block(block, self.block_size)


def fs_free_map(chain: Chain) -> tuple[FsFreeMap, dict[str, Any]]:
    """Map the free space of the filesystems on the chain's virtual disk.
    Returns the free map and the JSON summary for metadata and reports."""
    dmap = map_disk(lambda off, n: chain.read(off, n), chain.virtual_size)
    return FsFreeMap(dmap, chain.block_size), dmap.to_json()
