"""XFS: free space from each AG's by-block B+tree and free list.

Trusted only when the internal log is clean (its last record is an unmount
record ending exactly at the head), there is no realtime section, every CRC
on a v5 filesystem matches, and the counts agree: per AG the tree's extents
sum to ``agf_freeblks`` and the free list holds ``agf_flcount`` blocks; over
all AGs ``freeblks + flcount + btreeblks`` equals the superblock's
``sb_fdblocks``.
"""
from __future__ import annotations

import struct
import uuid as _uuid
from collections.abc import Callable

import numpy as np

from . import _ranges as R
from .common import FsResult, FsUnsafe, PartReader, Probe
from .crc import crc32c

__all__ = ["probe"]

INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
INCOMPAT_NEEDSREPAIR = 0x10
RO_KNOWN = 0x1 | 0x2 | 0x4 | 0x8
LOG_MAGIC = 0xFEEDBABE
UNMOUNT_TRANS = 0x20
FULL_LOG_SCAN = 64 * 1024 * 1024
LOG_WINDOW = 8 * 1024 * 1024


def probe(part: PartReader) -> Probe | None:
    if part.length < 4096:
        return None
    sb = part.read(0, 512)
    if sb[0:4] != b"XFSB":
        return None
    bs = struct.unpack_from(">I", sb, 4)[0]
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        return None
    return Probe("xfs", str(_uuid.UUID(bytes=sb[32:48])), _analyze)


def _be(fmt: str, b: bytes, off: int) -> tuple[int, ...]:
    return struct.unpack_from(">" + fmt, b, off)


def _crc_ok(buf: bytes, off: int) -> bool:
    """XFS CRC: standard CRC-32C with the field zeroed, stored little-endian."""
    want: int = struct.unpack_from("<I", buf, off)[0]
    return crc32c(buf[:off] + b"\0\0\0\0" + buf[off + 4 :]) == want


class _Xfs:
    def __init__(self, part: PartReader) -> None:
        self.part = part
        sb0 = part.read(0, 512)
        self.sectsize = _be("H", sb0, 102)[0]
        if self.sectsize < 512 or self.sectsize > 32768 or self.sectsize & (self.sectsize - 1):
            raise FsUnsafe(f"sector size {self.sectsize} is invalid")
        sb = part.read(0, self.sectsize)
        self.sb = sb
        self.bs = _be("I", sb, 4)[0]
        self.dblocks, self.rblocks, self.rextents = _be("QQQ", sb, 8)
        self.uuid = sb[32:48]
        self.logstart = _be("Q", sb, 48)[0]
        self.agblocks, self.agcount = _be("II", sb, 84)
        self.logblocks = _be("I", sb, 96)[0]
        self.version = _be("H", sb, 100)[0] & 0xF
        self.agblklog = sb[124]
        self.inprogress = sb[126]
        self.fdblocks = _be("Q", sb, 144)[0]
        self.v5 = self.version == 5
        if self.version not in (4, 5):
            raise FsUnsafe(f"XFS superblock version {self.version} is not supported")
        if self.v5:
            if not _crc_ok(sb, 224):
                raise FsUnsafe("XFS superblock CRC mismatch")
            self.ro, self.incompat = _be("II", sb, 212)
            if self.incompat & INCOMPAT_NEEDSREPAIR:
                raise FsUnsafe("XFS is marked as needing repair")
            if self.incompat & ~INCOMPAT_KNOWN:
                raise FsUnsafe(f"unknown XFS incompatible features 0x{self.incompat:x}")
            if self.ro & ~RO_KNOWN:
                raise FsUnsafe(f"unknown XFS read-only-compatible features 0x{self.ro:x}")
        if self.inprogress:
            raise FsUnsafe("XFS superblock says mkfs is still in progress")
        if self.rblocks or self.rextents:
            raise FsUnsafe("XFS has a realtime section")
        if self.logstart == 0:
            raise FsUnsafe("XFS log is external: its cleanliness cannot be checked here")
        if self.agcount == 0 or self.agblocks < 8 or self.agblklog > 31:
            raise FsUnsafe(f"AG geometry {self.agcount} x {self.agblocks} is invalid")
        if (1 << self.agblklog) < self.agblocks or (1 << self.agblklog) >= 2 * self.agblocks:
            raise FsUnsafe(f"agblklog {self.agblklog} does not match agblocks {self.agblocks}")
        if not (self.agcount - 1) * self.agblocks < self.dblocks <= self.agcount * self.agblocks:
            raise FsUnsafe(f"dblocks {self.dblocks} does not match {self.agcount} AGs")
        if self.dblocks * self.bs > part.length:
            raise FsUnsafe(
                f"filesystem claims {self.dblocks * self.bs} bytes but its partition holds "
                f"{part.length}"
            )
        self.hdr_blocks = -(-4 * self.sectsize // self.bs)

    def fsb_to_daddr_block(self, fsb: int) -> int:
        ag = fsb >> self.agblklog
        agbno = fsb & ((1 << self.agblklog) - 1)
        if ag >= self.agcount or agbno >= self.agblocks:
            raise FsUnsafe(f"filesystem block {fsb} lies outside the AGs")
        return ag * self.agblocks + agbno

    # -- log --------------------------------------------------------------
    def check_log_clean(self) -> str:
        start = self.fsb_to_daddr_block(self.logstart)
        if self.logblocks < 2 or start + self.logblocks > self.dblocks:
            raise FsUnsafe("XFS log lies outside the filesystem")
        self.log_range = (start, start + self.logblocks)
        base = start * self.bs
        nbb = self.logblocks * self.bs // 512

        def cycles(first: int, count: int) -> np.ndarray:
            raw = self.part.read_np(base + first * 512, count * 512).reshape(count, 512)
            w = np.ascontiguousarray(raw[:, :8]).view(">u4").astype(np.int64)
            return np.where(w[:, 0] == LOG_MAGIC, w[:, 1], w[:, 0])

        def cyc_range(first: int, count: int) -> np.ndarray:
            parts = []
            step = 8192
            for s in range(first, first + count, step):
                parts.append(cycles(s, min(step, first + count - s)))
            return np.concatenate(parts)

        cyc: Callable[[int], int]
        if nbb * 512 <= FULL_LOG_SCAN:
            c = cyc_range(0, nbb)
            head = self._head_strict(c)
            cyc = lambda i: int(c[i % nbb])
        else:
            head = self._head_search(cycles, cyc_range, nbb)
            cyc = lambda i: int(cycles(i % nbb, 1)[0])
        # last record header before the head
        hc = cyc(head - 1)
        limit = min(nbb, 2 * 1024 * 1024 // 512)
        rhead = None
        for k in range(1, limit + 1):
            blk = (head - k) % nbb
            sec = self.part.read(base + blk * 512, 512)
            if _be("I", sec, 0)[0] == LOG_MAGIC:
                rhead = (blk, sec)
                break
        if rhead is None:
            raise FsUnsafe("XFS log: no record header found before the head")
        rblk, h = rhead
        _m, h_cycle, h_version, h_len = _be("IIII", h, 0)
        num_logops = _be("I", h, 40)[0]
        h_size = _be("I", h, 320)[0]
        if h_cycle != hc:
            raise FsUnsafe("XFS log: last record's cycle does not match the head")
        if h[304:320] != self.uuid:
            raise FsUnsafe("XFS log belongs to another filesystem (UUID differs)")
        hblks = 1
        if h_version & 2 and h_size > 32768:
            hblks = -(-h_size // 32768)
        after = (rblk + hblks + (-(-h_len // 512))) % nbb
        if after != head % nbb or num_logops != 1:
            raise FsUnsafe("XFS log is dirty (its last record is not a lone unmount record)")
        op = self.part.read(base + ((rblk + hblks) % nbb) * 512, 512)
        if not op[9] & UNMOUNT_TRANS:
            raise FsUnsafe("XFS log is dirty (no unmount record at the head)")
        return "clean"

    @staticmethod
    def _head_strict(c: np.ndarray) -> int:
        n = c.size
        top = int(c[0])
        if int(c[-1]) == top:
            if not (c == top).all():
                raise FsUnsafe("XFS log cycle numbers are irregular (log not cleanly ended)")
            return n
        h = int(np.argmax(c != top))
        if not ((c[:h] == top).all() and (c[h:] == top - 1).all()):
            raise FsUnsafe("XFS log cycle numbers are irregular (log not cleanly ended)")
        return h

    @staticmethod
    def _head_search(
        cycles: Callable[[int, int], np.ndarray], cyc_range: Callable[[int, int], np.ndarray], nbb: int
    ) -> int:
        top = int(cycles(0, 1)[0])
        last = int(cycles(nbb - 1, 1)[0])
        win = LOG_WINDOW // 512
        if last == top:
            tail = cyc_range(max(0, nbb - win), min(win, nbb))
            if not (tail == top).all():
                raise FsUnsafe("XFS log cycle numbers are irregular near the end")
            return nbb
        if last != top - 1:
            raise FsUnsafe("XFS log cycle numbers are irregular")
        lo, hi = 0, nbb - 1  # cycles(lo) == top, cycles(hi) == top - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(cycles(mid, 1)[0]) == top:
                lo = mid
            else:
                hi = mid
        a = max(0, hi - win)
        before = cyc_range(a, hi - a)
        after = cyc_range(hi, min(win, nbb - hi))
        if not ((before == top).all() and (after == top - 1).all()):
            raise FsUnsafe("XFS log cycle numbers are irregular around the head")
        return hi

    # -- allocation groups --------------------------------------------------
    def ag_free(self, ag: int) -> tuple[tuple[np.ndarray, np.ndarray], int, int, int]:
        """Free extents of one AG (AG-relative blocks) plus its counters."""
        bs, ss = self.bs, self.sectsize
        agoff = ag * self.agblocks * bs
        agf = self.part.read(agoff + ss, ss)
        if agf[0:4] != b"XAGF":
            raise FsUnsafe(f"AG {ag}: AGF magic missing")
        if self.v5 and not _crc_ok(agf, 216):
            raise FsUnsafe(f"AG {ag}: AGF CRC mismatch")
        seqno, length = _be("II", agf, 8)
        bno_root = _be("I", agf, 16)[0]
        bno_level = _be("I", agf, 28)[0]
        flfirst, fllast, flcount, freeblks = _be("IIII", agf, 40)
        btreeblks = _be("I", agf, 60)[0]
        want_len = min(self.agblocks, self.dblocks - ag * self.agblocks)
        if seqno != ag or length != want_len:
            raise FsUnsafe(f"AG {ag}: AGF seqno/length {seqno}/{length} disagree with the superblock")
        if self.v5 and agf[64:80] != self.uuid and agf[64:80] != self.sb[248:264]:
            raise FsUnsafe(f"AG {ag}: AGF UUID differs from the superblock")
        recs = self._walk_bnobt(ag, bno_root, bno_level, length)
        if int((recs[1] - recs[0]).sum()) != freeblks:
            raise FsUnsafe(
                f"AG {ag}: free-space tree holds {int((recs[1] - recs[0]).sum())} blocks, "
                f"AGF says {freeblks}"
            )
        fl = self._agfl(ag, flfirst, fllast, flcount, length)
        fl_ranges = R.normalize(fl, fl + 1)
        if R.total(fl_ranges) != flcount:
            raise FsUnsafe(f"AG {ag}: free list has duplicate blocks")
        if R.overlaps_any(recs, fl_ranges):
            raise FsUnsafe(f"AG {ag}: free list blocks also appear in the free-space tree")
        free = R.union(recs, fl_ranges)
        if free[0].size and int(free[0][0]) < self.hdr_blocks:
            raise FsUnsafe(f"AG {ag}: free space overlaps the AG headers")
        return free, freeblks, flcount, btreeblks

    def _agfl(self, ag: int, flfirst: int, fllast: int, flcount: int, length: int) -> np.ndarray:
        ss = self.sectsize
        buf = self.part.read(ag * self.agblocks * self.bs + 3 * ss, ss)
        hdr = 0
        if self.v5:
            if buf[0:4] != b"XAFL":
                raise FsUnsafe(f"AG {ag}: AGFL magic missing")
            if not _crc_ok(buf, 32):
                raise FsUnsafe(f"AG {ag}: AGFL CRC mismatch")
            if _be("I", buf, 4)[0] != ag:
                raise FsUnsafe(f"AG {ag}: AGFL sequence number is wrong")
            hdr = 36
        slots = (ss - hdr) // 4
        if flcount == 0:
            return np.zeros(0, dtype=np.int64)
        if flcount > slots or flfirst >= slots or fllast >= slots:
            raise FsUnsafe(f"AG {ag}: free list indexes are out of range")
        if (flfirst + flcount - 1) % slots != fllast:
            raise FsUnsafe(f"AG {ag}: free list first/last/count disagree")
        arr = np.frombuffer(buf, dtype=">u4", count=slots, offset=hdr).astype(np.int64)
        idx = (flfirst + np.arange(flcount)) % slots
        fl: np.ndarray = arr[idx]
        if ((fl < self.hdr_blocks) | (fl >= length)).any():
            raise FsUnsafe(f"AG {ag}: free list holds a block outside the AG")
        return fl

    def _walk_bnobt(self, ag: int, root: int, level: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        bs = self.bs
        hdr = 56 if self.v5 else 16
        magic = b"AB3B" if self.v5 else b"ABTB"
        maxrecs_leaf = (bs - hdr) // 8
        maxrecs_node = (bs - hdr) // 12
        if level < 1 or level > 8:
            raise FsUnsafe(f"AG {ag}: free-space tree level {level} is invalid")
        seen: set[int] = set()
        starts: list[np.ndarray] = []
        counts: list[np.ndarray] = []

        def visit(bno: int, lvl: int) -> None:
            if not self.hdr_blocks <= bno < length or bno in seen:
                raise FsUnsafe(f"AG {ag}: free-space tree block {bno} is invalid or repeated")
            seen.add(bno)
            blk = self.part.read((ag * self.agblocks + bno) * bs, bs)
            if blk[0:4] != magic:
                raise FsUnsafe(f"AG {ag}: free-space tree block {bno} has no {magic.decode()} magic")
            blevel, nrecs = _be("HH", blk, 4)
            if blevel != lvl:
                raise FsUnsafe(f"AG {ag}: free-space tree block {bno} is at the wrong level")
            if self.v5:
                if not _crc_ok(blk, 52):
                    raise FsUnsafe(f"AG {ag}: free-space tree block {bno} CRC mismatch")
                daddr = _be("Q", blk, 16)[0]
                if daddr != (ag * self.agblocks + bno) * (bs // 512):
                    raise FsUnsafe(f"AG {ag}: free-space tree block {bno} records another address")
                if _be("I", blk, 48)[0] != ag:
                    raise FsUnsafe(f"AG {ag}: free-space tree block {bno} belongs to another AG")
            if lvl == 0:
                if nrecs > maxrecs_leaf:
                    raise FsUnsafe(f"AG {ag}: free-space tree leaf {bno} has too many records")
                rec = np.frombuffer(blk, dtype=">u4", count=2 * nrecs, offset=hdr).astype(np.int64)
                starts.append(rec[0::2])
                counts.append(rec[1::2])
                return
            if nrecs == 0 or nrecs > maxrecs_node:
                raise FsUnsafe(f"AG {ag}: free-space tree node {bno} has a bad record count")
            ptrs = np.frombuffer(
                blk, dtype=">u4", count=nrecs, offset=hdr + maxrecs_node * 8
            ).astype(np.int64)
            for p in ptrs.tolist():
                visit(p, lvl - 1)

        visit(root, level - 1)
        if not starts:
            return R.empty()
        s = np.concatenate(starts)
        c = np.concatenate(counts)
        e = s + c
        if s.size:
            if (c <= 0).any() or (e > length).any() or (s < self.hdr_blocks).any():
                raise FsUnsafe(f"AG {ag}: free-space record outside the AG")
            if (s[1:] < e[:-1]).any():
                raise FsUnsafe(f"AG {ag}: free-space records overlap or are out of order")
        return s, e


def _analyze(part: PartReader, probe_: Probe, journal_overlay: bool = True) -> FsResult:
    x = _Xfs(part)
    res = FsResult(fs="xfs", uuid=probe_.uuid, state="clean")
    x.check_log_clean()
    all_s, all_e = [], []
    total = 0
    for ag in range(x.agcount):
        (s, e), freeblks, flcount, btreeblks = x.ag_free(ag)
        total += freeblks + flcount + btreeblks
        base = ag * x.agblocks
        all_s.append(s + base)
        all_e.append(e + base)
    if total != x.fdblocks:
        raise FsUnsafe(
            f"AG free counts add up to {total} blocks but the superblock says {x.fdblocks}"
        )
    free = R.normalize(np.concatenate(all_s), np.concatenate(all_e))
    if R.overlaps_any(free, (np.array([x.log_range[0]]), np.array([x.log_range[1]]))):
        raise FsUnsafe("XFS free space overlaps the log")
    free = R.clip(free, 0, x.dblocks)
    res.free = R.scale(free, x.bs)
    res.fs_free_bytes = x.fdblocks * x.bs
    return res
