"""ext2/ext3/ext4: free clusters from the block bitmaps, after the journal.

Safety model (see the project's filesystem-aware imaging notes): start from
"everything used", clear only the clusters the block bitmaps mark free, and
never those holding superblock/descriptor backups, bitmaps or inode tables
(even if a bitmap says otherwise).  Any checksum or count that disagrees
keeps the filesystem whole.
"""
from __future__ import annotations

import struct
import uuid as _uuid

import numpy as np

from . import _ranges as R
from .common import FsResult, FsUnsafe, PartReader, Probe, u16, u32, u64
from .crc import crc16_rows, crc32c_raw, crc32c_rows
from .journal import Overlay, replay

__all__ = ["probe"]

MAGIC = 0xEF53

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400

INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_CSUM_SEED = 0x2000
# filetype, recover, meta_bg, extents, 64bit, mmp, flex_bg, ea_inode, csum_seed,
# largedir, inline_data, encrypt, casefold: none changes what a bitmap bit means
INCOMPAT_KNOWN = 0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000
INCOMPAT_KNOWN |= 0x8000 | 0x10000 | 0x20000

RO_SPARSE_SUPER = 0x1
RO_GDT_CSUM = 0x10
RO_BIGALLOC = 0x200
RO_METADATA_CSUM = 0x400
# sparse_super, large_file, huge_file, gdt_csum, dir_nlink, extra_isize, quota,
# bigalloc, metadata_csum, readonly, project, shared_blocks, verity, orphan_present
RO_KNOWN = 0x1 | 0x2 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000
RO_KNOWN |= 0x4000 | 0x8000 | 0x10000

EXT4_INCOMPAT_HINT = 0x40 | 0x80 | 0x200 | 0x10 | 0x100 | 0x400 | 0x2000 | 0x4000 | 0x8000
EXT4_RO_HINT = 0x8 | 0x10 | 0x20 | 0x40 | 0x200 | 0x400

BG_BLOCK_UNINIT = 0x2
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
GROUP_BATCH = 128
READ_CHUNK = 8 * 1024 * 1024


def _name(compat: int, incompat: int, ro: int) -> str:
    if incompat & EXT4_INCOMPAT_HINT or ro & EXT4_RO_HINT:
        return "ext4"
    if compat & COMPAT_HAS_JOURNAL:
        return "ext3"
    return "ext2"


def probe(part: PartReader) -> Probe | None:
    if part.length < 2048:
        return None
    sb = part.read(1024, 1024)
    if u16(sb, 0x38) != MAGIC or u32(sb, 0x18) > 6:
        return None
    if u32(sb, 0x20) == 0 or u32(sb, 0x28) == 0 or u32(sb, 0x04) == 0:
        return None
    if u32(sb, 0x60) & INCOMPAT_JOURNAL_DEV:
        return Probe("ext-journal", str(_uuid.UUID(bytes=sb[0x68:0x78])), _analyze)
    feats = (u32(sb, 0x5C), u32(sb, 0x60), u32(sb, 0x64)) if u32(sb, 0x4C) else (0, 0, 0)
    return Probe(_name(*feats), str(_uuid.UUID(bytes=sb[0x68:0x78])), _analyze)


class _Geo:
    """Superblock geometry, validated against the partition."""

    def __init__(self, sb: bytes, part_len: int) -> None:
        if u16(sb, 0x38) != MAGIC:
            raise FsUnsafe("ext superblock magic vanished after applying the journal")
        self.sb = sb
        self.rev = u32(sb, 0x4C)
        if self.rev:
            self.compat, self.incompat, self.ro = u32(sb, 0x5C), u32(sb, 0x60), u32(sb, 0x64)
        else:
            self.compat = self.incompat = self.ro = 0
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            raise FsUnsafe("this is an external ext journal device, not a filesystem")
        log_bs = u32(sb, 0x18)
        if log_bs > 6:
            raise FsUnsafe(f"block size 1024<<{log_bs} is invalid")
        self.bs = bs = 1024 << log_bs
        self.bigalloc = bool(self.ro & RO_BIGALLOC)
        if self.bigalloc:
            log_cs = u32(sb, 0x1C)
            if log_cs < log_bs or log_cs > log_bs + 16:
                raise FsUnsafe(f"cluster size 1024<<{log_cs} is invalid for block size {bs}")
            self.ratio = 1 << (log_cs - log_bs)
        else:
            self.ratio = 1
        self.is64 = bool(self.incompat & INCOMPAT_64BIT)
        self.bpg = u32(sb, 0x20)
        self.cpg = u32(sb, 0x24) if self.bigalloc else self.bpg
        if self.cpg == 0 or self.cpg % 8 or self.cpg > 8 * bs or self.bpg != self.cpg * self.ratio:
            raise FsUnsafe(
                f"blocks/clusters per group {self.bpg}/{self.cpg} are invalid for block size {bs}"
            )
        self.blocks = u32(sb, 0x04) | ((u32(sb, 0x150) << 32) if self.is64 else 0)
        self.fdb = u32(sb, 0x14)
        want_fdb = 1 if bs == 1024 and not self.bigalloc else 0
        if self.fdb != want_fdb:
            raise FsUnsafe(f"first data block {self.fdb} is invalid (expected {want_fdb})")
        if self.blocks <= self.fdb + 1:
            raise FsUnsafe(f"block count {self.blocks} is too small")
        if self.blocks * bs > part_len:
            raise FsUnsafe(
                f"filesystem claims {self.blocks * bs} bytes but its partition holds {part_len}"
            )
        self.ipg = u32(sb, 0x28)
        self.inode_size = u16(sb, 0x58) if self.rev else 128
        if (
            self.inode_size < 128
            or self.inode_size > bs
            or self.inode_size & (self.inode_size - 1)
            or not 0 < self.ipg <= 8 * bs
        ):
            raise FsUnsafe(f"inode geometry ({self.ipg} x {self.inode_size} bytes) is invalid")
        if self.is64:
            self.ds = u16(sb, 0xFE)
            if self.ds < 64 or self.ds > 1024 or self.ds & (self.ds - 1):
                raise FsUnsafe(f"descriptor size {self.ds} is invalid")
        else:
            self.ds = 32
        self.groups = -(-(self.blocks - self.fdb) // self.bpg)
        self.dpb = bs // self.ds
        self.gdt_blocks = -(-self.groups // self.dpb)
        self.itable_blocks = -(-(self.ipg * self.inode_size) // bs)
        self.reserved_gdt = u16(sb, 0xCE)
        self.meta_bg = bool(self.incompat & INCOMPAT_META_BG)
        self.first_meta_bg = u32(sb, 0x104)
        self.flex_bg = bool(self.incompat & INCOMPAT_FLEX_BG)
        self.sparse = bool(self.ro & RO_SPARSE_SUPER)
        self.sparse2 = bool(self.compat & COMPAT_SPARSE_SUPER2)
        self.backup_bgs = (u32(sb, 0x24C), u32(sb, 0x250))
        self.csum = bool(self.ro & RO_METADATA_CSUM)
        self.gdt_csum = bool(self.ro & RO_GDT_CSUM)
        self.uuid = sb[0x68:0x78]
        if self.incompat & INCOMPAT_CSUM_SEED:
            self.seed = u32(sb, 0x270)
        else:
            self.seed = crc32c_raw(0xFFFFFFFF, self.uuid)
        self.sb_block = 1024 // bs  # block holding the primary superblock
        self.sb_off = 1024 % bs
        if self.meta_bg and self.first_meta_bg > self.gdt_blocks:
            raise FsUnsafe(f"first_meta_bg {self.first_meta_bg} exceeds the descriptor blocks")

    def has_super(self, g: int) -> bool:
        if g == 0:
            return True
        if self.sparse2:
            return g in self.backup_bgs
        if g <= 1 or not self.sparse:
            return True
        if not g & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < g:
                n *= base
            if n == g:
                return True
        return False

    def group_first(self, g: int) -> int:
        return self.fdb + g * self.bpg

    def desc_block(self, i: int) -> int:
        """Block holding descriptor block ``i`` (libext2fs' descriptor_block_loc)."""
        if not self.meta_bg or i < self.first_meta_bg:
            return self.sb_block + 1 + i
        bg = self.dpb * i
        gb = self.group_first(bg)
        if gb == 0 and self.bs == 1024:
            gb = 1
        return gb + (1 if self.has_super(bg) else 0)

    def super_and_gdt(self, g: int) -> list[tuple[int, int]]:
        """Superblock/descriptor (backup) extents of group ``g`` as (block, count)."""
        gb = self.group_first(g)
        if gb == 0 and self.bs == 1024:
            gb = 1
        out = []
        hs = self.has_super(g)
        if g == 0:
            out.append((0, self.sb_block + 1))
        elif hs:
            out.append((gb, 1))
        old_desc = self.first_meta_bg if self.meta_bg else self.gdt_blocks + self.reserved_gdt
        mbg = g // self.dpb
        if not self.meta_bg or mbg < self.first_meta_bg:
            if hs:
                out.append((gb + 1, old_desc))
        else:
            r = g % self.dpb
            if r in (0, 1, self.dpb - 1):
                out.append((gb + (1 if hs else 0), 1))
            if hs and g == 0:
                out.append((gb + 1, old_desc))
        return out


class _Vol:
    """Block reads of the filesystem, through the journal overlay when there is one."""

    def __init__(self, part: PartReader, bs: int) -> None:
        self.part = part
        self.bs = bs
        self.overlay: Overlay | None = None

    def raw_block(self, b: int) -> bytes:
        return self.part.read(b * self.bs, self.bs)

    def blocks(self, start: int, count: int) -> bytes:
        data = self.part.read(start * self.bs, count * self.bs)
        ov = self.overlay
        if ov is None or not len(ov):
            return data
        hits = ov.blocks_in(start, count)
        if not hits:
            return data
        buf = bytearray(data)
        for b in hits:
            o = (b - start) * self.bs
            buf[o : o + self.bs] = ov.get(b)  # type: ignore[assignment]
        return bytes(buf)

    def block(self, b: int) -> bytes:
        return self.blocks(b, 1)


def _desc_arrays(geo: _Geo, gdt: bytes) -> dict[str, np.ndarray]:
    a = np.frombuffer(gdt, dtype=np.uint8)[: geo.groups * geo.ds].reshape(geo.groups, geo.ds)

    def f(off: int, width: int) -> np.ndarray:
        dt = "<u4" if width == 4 else "<u2"
        return np.ascontiguousarray(a[:, off : off + width]).view(dt).ravel().astype(np.int64)

    big = geo.ds >= 64
    d = {
        "bb": f(0x00, 4) | ((f(0x20, 4) << 32) if big else 0),
        "ib": f(0x04, 4) | ((f(0x24, 4) << 32) if big else 0),
        "it": f(0x08, 4) | ((f(0x28, 4) << 32) if big else 0),
        "free": f(0x0C, 2) | ((f(0x2C, 2) << 16) if big else 0),
        "flags": f(0x12, 2),
        "bbcsum": f(0x18, 2) | ((f(0x38, 2) << 16) if geo.ds >= 0x3A else 0),
        "csum": f(0x1E, 2),
        "raw": a,
    }
    return d


def _check_desc_csums(geo: _Geo, d: dict[str, np.ndarray]) -> None:
    a = d["raw"]
    n = geo.groups
    le_g = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4)
    if geo.csum:
        body = a.copy()
        body[:, 0x1E:0x20] = 0
        got = crc32c_rows(np.uint32(geo.seed), np.hstack([le_g, body])) & 0xFFFF
    elif geo.gdt_csum:
        from .crc import crc16_raw

        seed = crc16_raw(0xFFFF, geo.uuid)
        parts = [le_g, a[:, :0x1E]]
        if geo.is64 and geo.ds > 0x20:
            parts.append(a[:, 0x20:])
        got = crc16_rows(np.uint16(seed), np.hstack(parts))
    else:
        return
    bad = np.flatnonzero(got.astype(np.int64) != d["csum"])
    if bad.size:
        raise FsUnsafe(
            f"group descriptor checksum mismatch in {bad.size} group(s), first group {int(bad[0])}"
        )


def _read_inode(vol: _Vol, geo: _Geo, d: dict[str, np.ndarray], ino: int) -> bytes:
    g, idx = divmod(ino - 1, geo.ipg)
    if g >= geo.groups:
        raise FsUnsafe(f"inode {ino} lies past the last group")
    off = idx * geo.inode_size
    blk = int(d["it"][g]) + off // geo.bs
    data = vol.raw_block(blk)
    o = off % geo.bs
    return data[o : o + geo.inode_size]


def _inode_blocks(vol: _Vol, geo: _Geo, inode: bytes, nblocks: int) -> np.ndarray:
    """Physical block of each logical block 0..nblocks-1 of an inode (-1 = hole)."""
    out = np.full(nblocks, -1, dtype=np.int64)
    flags = u32(inode, 0x20)
    iblock = inode[0x28 : 0x28 + 60]
    budget = [4096]

    def check_blk(b: int) -> None:
        if not geo.fdb <= b < geo.blocks:
            raise FsUnsafe(f"journal inode maps block {b} outside the filesystem")
        budget[0] -= 1
        if budget[0] < 0:
            raise FsUnsafe("journal inode mapping is implausibly large")

    if flags & INLINE_DATA_FL:
        raise FsUnsafe("journal inode has inline data")
    if flags & EXTENTS_FL:

        def walk(node: bytes, depth: int) -> None:
            magic, entries, emax, ndepth = struct.unpack_from("<HHHH", node, 0)
            if magic != 0xF30A or entries > emax or 12 + 12 * entries > len(node):
                raise FsUnsafe("journal inode extent tree is damaged")
            if depth >= 0 and ndepth != depth:
                raise FsUnsafe("journal inode extent tree depth is inconsistent")
            if ndepth > 5:
                raise FsUnsafe("journal inode extent tree is too deep")
            for i in range(entries):
                o = 12 + 12 * i
                if ndepth == 0:
                    lblk, ln, hi, lo = struct.unpack_from("<IHHI", node, o)
                    if ln > 32768:
                        ln -= 32768
                    phys = lo | (hi << 32)
                    if ln == 0 or phys + ln > geo.blocks or phys < geo.fdb:
                        raise FsUnsafe("journal inode extent points outside the filesystem")
                    if lblk < nblocks:
                        n = min(ln, nblocks - lblk)
                        out[lblk : lblk + n] = np.arange(phys, phys + n, dtype=np.int64)
                else:
                    _lblk, lo, hi = struct.unpack_from("<IIH", node, o)
                    child = lo | (hi << 32)
                    check_blk(child)
                    walk(vol.raw_block(child), ndepth - 1)

        walk(iblock, -1)
        return out
    per = geo.bs // 4
    ptr = struct.unpack("<15I", iblock)
    for i in range(min(12, nblocks)):
        out[i] = ptr[i] or -1

    def fill(blk: int, level: int, lstart: int) -> None:
        if blk == 0 or lstart >= nblocks:
            return
        check_blk(blk)
        entries = np.frombuffer(vol.raw_block(blk), dtype="<u4").astype(np.int64)
        span = per**level
        if level == 0:
            n = min(per, nblocks - lstart)
            vals = entries[:n].copy()
            vals[vals == 0] = -1
            out[lstart : lstart + n] = vals
            return
        for k in range(per):
            s = lstart + k * span
            if s >= nblocks:
                break
            fill(int(entries[k]), level - 1, s)

    fill(ptr[12], 0, 12)
    fill(ptr[13], 1, 12 + per)
    fill(ptr[14], 2, 12 + per + per * per)
    return out


def _build_overlay(vol: _Vol, geo: _Geo, d: dict[str, np.ndarray]) -> tuple[Overlay, list[str]]:
    jino = u32(geo.sb, 0xE0)
    if jino == 0:
        raise FsUnsafe("needs_recovery with an external journal, which is not on this disk")
    inode = _read_inode(vol, geo, d, jino)
    size = u32(inode, 0x04) | (u32(inode, 0x6C) << 32)
    nblocks = size // geo.bs
    if nblocks < 2 or nblocks > geo.blocks:
        raise FsUnsafe(f"journal inode size {size} is implausible")
    phys = _inode_blocks(vol, geo, inode, nblocks)

    def read_jblock(n: int) -> bytes:
        if not 0 <= n < nblocks or phys[n] < 0:
            raise FsUnsafe(f"journal block {n} is not mapped")
        return vol.raw_block(int(phys[n]))

    return replay(read_jblock, nblocks, geo.bs, geo.blocks)


def _check_sb(geo: _Geo, what: str) -> None:
    sb = geo.sb
    state = u16(sb, 0x3A)
    if state & 2:
        raise FsUnsafe(f"{what}: the filesystem records errors (s_state 0x{state:x})")
    if not state & 1:
        raise FsUnsafe(f"{what}: the filesystem was not cleanly unmounted (s_state 0x{state:x})")
    if geo.incompat & ~INCOMPAT_KNOWN:
        raise FsUnsafe(f"{what}: unknown incompatible features 0x{geo.incompat & ~INCOMPAT_KNOWN:x}")
    if geo.ro & ~RO_KNOWN:
        raise FsUnsafe(f"{what}: unknown read-only-compatible features 0x{geo.ro & ~RO_KNOWN:x}")
    if geo.csum:
        if sb[0x175] != 1:
            raise FsUnsafe(f"{what}: unknown metadata checksum type {sb[0x175]}")
        if crc32c_raw(0xFFFFFFFF, sb[:0x3FC]) != u32(sb, 0x3FC):
            raise FsUnsafe(f"{what}: superblock checksum mismatch")


def _read_gdt(vol: _Vol, geo: _Geo) -> bytes:
    if not geo.meta_bg:
        first = geo.sb_block + 1
        if first + geo.gdt_blocks > geo.blocks:
            raise FsUnsafe("group descriptor table runs past the filesystem")
        return vol.blocks(first, geo.gdt_blocks)
    parts = []
    for i in range(geo.gdt_blocks):
        b = geo.desc_block(i)
        if b >= geo.blocks:
            raise FsUnsafe(f"descriptor block {i} at {b} lies past the filesystem")
        parts.append(vol.block(b))
    return b"".join(parts)


def _metadata_extents(geo: _Geo, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All superblock/descriptor copies, bitmaps and inode tables, in blocks."""
    starts: list[np.ndarray] = [d["bb"], d["ib"], d["it"]]
    ends: list[np.ndarray] = [d["bb"] + 1, d["ib"] + 1, d["it"] + geo.itable_blocks]
    ss, ee = [], []
    for g in range(geo.groups):
        for b, n in geo.super_and_gdt(g):
            ss.append(b)
            ee.append(b + n)
    starts.append(np.array(ss, dtype=np.int64))
    ends.append(np.array(ee, dtype=np.int64))
    if geo.incompat & INCOMPAT_MMP:
        mmp = u64(geo.sb, 0x168)
        starts.append(np.array([mmp], dtype=np.int64))
        ends.append(np.array([mmp + 1], dtype=np.int64))
    s: np.ndarray = np.concatenate(starts)
    e: np.ndarray = np.concatenate(ends)
    if geo.ratio > 1:  # whole clusters
        s = (s // geo.ratio) * geo.ratio
        e = -(-e // geo.ratio) * geo.ratio
    return R.normalize(s, e)


def _check_locations(geo: _Geo, d: dict[str, np.ndarray]) -> None:
    lo, hi = geo.fdb, geo.blocks
    for key, n in (("bb", 1), ("ib", 1), ("it", geo.itable_blocks)):
        v = d[key]
        bad = np.flatnonzero((v < lo) | (v + n > hi))
        if bad.size:
            raise FsUnsafe(
                f"group {int(bad[0])}: {key} location {int(v[bad[0]])} lies outside the filesystem"
            )
    if not geo.flex_bg:
        g = np.arange(geo.groups, dtype=np.int64)
        first = geo.fdb + g * geo.bpg
        last = np.minimum(first + geo.bpg, geo.blocks)
        for key, n in (("bb", 1), ("ib", 1), ("it", geo.itable_blocks)):
            v = d[key]
            bad = np.flatnonzero((v < first) | (v + n > last))
            if bad.size:
                raise FsUnsafe(f"group {int(bad[0])}: {key} lies outside its group without flex_bg")


def _free_from_bitmaps(
    vol: _Vol, geo: _Geo, d: dict[str, np.ndarray]
) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Free cluster runs from the block bitmaps, checked group by group."""
    honour_uninit = geo.csum or geo.gdt_csum
    bm_bytes = geo.cpg // 8
    out_s: list[np.ndarray] = []
    out_e: list[np.ndarray] = []
    total_clusters = -(-(geo.blocks - geo.fdb) // geo.ratio)
    uninit_groups = 0
    for g0 in range(0, geo.groups, GROUP_BATCH):
        g1 = min(geo.groups, g0 + GROUP_BATCH)
        n = g1 - g0
        buf = np.zeros((n, bm_bytes), dtype=np.uint8)
        uninit = np.zeros(n, dtype=bool)
        if honour_uninit:
            uninit = (d["flags"][g0:g1] & BG_BLOCK_UNINIT) != 0
        need = [(int(d["bb"][g]), g - g0) for g in range(g0, g1) if not uninit[g - g0]]
        need.sort()
        i = 0
        while i < len(need):
            j = i + 1
            while (
                j < len(need)
                and need[j][0] == need[j - 1][0] + 1
                and (j - i) * geo.bs < READ_CHUNK
            ):
                j += 1
            data = vol.blocks(need[i][0], j - i)
            for k in range(i, j):
                o = (k - i) * geo.bs
                buf[need[k][1]] = np.frombuffer(data, dtype=np.uint8, count=bm_bytes, offset=o)
            i = j
        init_rows = np.flatnonzero(~uninit)
        uninit_groups += int(uninit.sum())
        if geo.csum and init_rows.size:
            got = crc32c_rows(np.uint32(geo.seed), buf[init_rows])
            want = d["bbcsum"][g0 + init_rows]
            mask = 0xFFFFFFFF if geo.ds >= 0x3A else 0xFFFF
            bad = np.flatnonzero((got.astype(np.int64) & mask) != want)
            if bad.size:
                raise FsUnsafe(
                    f"block bitmap checksum mismatch in group {g0 + int(init_rows[bad[0]])}"
                )
        # clusters in each group (the last one may be short); bits past it do not count
        firsts = geo.fdb + np.arange(g0, g1, dtype=np.int64) * geo.bpg
        nblk = np.minimum(geo.bpg, geo.blocks - firsts)
        ncl = -(-nblk // geo.ratio)
        bits = np.unpackbits(buf, axis=1, bitorder="little")
        valid = np.arange(geo.cpg)[None, :] < ncl[:, None]
        bits[~valid] = 1
        bits[uninit] = np.where(valid[uninit], 0, 1)
        free_cnt = (valid & (bits == 0)).sum(axis=1)
        want_free = d["free"][g0:g1]
        badc = np.flatnonzero((free_cnt != want_free) & ~uninit)
        if badc.size:
            g = g0 + int(badc[0])
            raise FsUnsafe(
                f"group {g}: bitmap has {int(free_cnt[badc[0]])} free clusters, "
                f"descriptor says {int(want_free[badc[0]])}"
            )
        flat = np.packbits(bits.reshape(-1), bitorder="little")
        s, e = R.zero_bit_runs(flat, n * geo.cpg, base=g0 * geo.cpg)
        out_s.append(s)
        out_e.append(e)
    s = np.concatenate(out_s) if out_s else np.zeros(0, np.int64)
    e = np.concatenate(out_e) if out_e else np.zeros(0, np.int64)
    e = np.minimum(e, total_clusters)
    # clusters -> blocks
    return R.normalize(geo.fdb + s * geo.ratio, geo.fdb + e * geo.ratio), uninit_groups


def _analyze(part: PartReader, probe_: Probe, journal_overlay: bool = True) -> FsResult:
    name = probe_.fs
    res = FsResult(fs=name, uuid=probe_.uuid, state="clean")
    if name == "ext-journal":
        raise FsUnsafe("external ext journal device (not a filesystem)")
    raw_sb = part.read(1024, 1024)
    geo = _Geo(raw_sb, part.length)
    vol = _Vol(part, geo.bs)
    needs_recovery = bool(geo.incompat & INCOMPAT_RECOVER)
    if needs_recovery and not geo.compat & COMPAT_HAS_JOURNAL:
        raise FsUnsafe("needs_recovery is set but the filesystem has no journal")
    _check_sb(geo, "superblock")
    if geo.compat & COMPAT_HAS_JOURNAL and u32(geo.sb, 0xE0):
        d0 = _desc_arrays(geo, _read_gdt(vol, geo))
        _check_desc_csums(geo, d0)
        _check_locations(geo, d0)
        if needs_recovery and journal_overlay:
            overlay, notes = _build_overlay(vol, geo, d0)
            res.warnings.extend(notes)
            if len(overlay):
                vol.overlay = overlay
                res.state = "journal-applied"
                blk = vol.block(geo.sb_block)
                geo2 = _Geo(blk[geo.sb_off : geo.sb_off + 1024], part.length)
                _check_sb(geo2, "superblock after journal replay")
                geo = geo2
        elif needs_recovery:
            res.state = "journal-ignored"
            res.warnings.append(
                "needs_recovery is set and journal_overlay=False: free space is read from the "
                "on-disk bitmaps, which can lag behind committed journal transactions (UNSAFE)"
            )
        else:
            # clean: the journal must be empty, or the kernel would wipe it unreplayed
            inode = _read_inode(vol, geo, d0, u32(geo.sb, 0xE0))
            phys = _inode_blocks(vol, geo, inode, 1)
            if phys[0] < 0:
                raise FsUnsafe("journal superblock is not mapped")
            jsb = vol.raw_block(int(phys[0]))
            if struct.unpack_from(">I", jsb, 0)[0] != 0xC03B3998:
                raise FsUnsafe("journal superblock has no jbd2 magic")
            if struct.unpack_from(">I", jsb, 0x1C)[0] != 0:
                raise FsUnsafe("journal holds transactions but needs_recovery is clear")
    elif needs_recovery:
        raise FsUnsafe("needs_recovery with an external journal, which is not on this disk")
    d = _desc_arrays(geo, _read_gdt(vol, geo))
    _check_desc_csums(geo, d)
    _check_locations(geo, d)
    free_blocks, uninit = _free_from_bitmaps(vol, geo, d)
    meta = _metadata_extents(geo, d)
    free_blocks = R.difference(free_blocks, meta)
    free_blocks = R.clip(free_blocks, geo.fdb, geo.blocks)
    res.free = R.scale(free_blocks, geo.bs)
    sb_free = u32(geo.sb, 0x0C) | ((u32(geo.sb, 0x158) << 32) if geo.is64 else 0)
    res.fs_free_bytes = sb_free * geo.bs
    if uninit:
        res.warnings.append(f"{uninit} group(s) with BLOCK_UNINIT: free except their metadata")
    return res
