"""ext2/ext3/ext4 on-disk layout: the feature flags, the superblock's geometry
(:class:`Geo`, validated against the partition), block reads through the
journal overlay (:class:`Vol`), the group descriptors with their checksums and
locations, and where every piece of metadata lies (never to be called free).
"""
from __future__ import annotations


import numpy as np

from . import _ranges as R
from .common import FsUnsafe, PartReader, u16, u32, u64
from .crc import crc16_rows, crc32c_raw, crc32c_rows
from .journal import Overlay

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


def fs_name(compat: int, incompat: int, ro: int) -> str:
    if incompat & EXT4_INCOMPAT_HINT or ro & EXT4_RO_HINT:
        return "ext4"
    if compat & COMPAT_HAS_JOURNAL:
        return "ext3"
    return "ext2"


class Geo:
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
        self._read_sizes(sb, part_len)
        self._read_tables(sb)
        self._read_features(sb)

    def _read_sizes(self, sb: bytes, part_len: int) -> None:
        """Block and cluster size, groups, block count and first data block."""
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

    def _read_tables(self, sb: bytes) -> None:
        """Inode and descriptor sizes, the number of groups and of table blocks."""
        bs = self.bs
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

    def _read_features(self, sb: bytes) -> None:
        """What the feature flags change: metadata placement and checksums."""
        bs = self.bs
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


class Vol:
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


def desc_arrays(geo: Geo, gdt: bytes) -> dict[str, np.ndarray]:
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


def check_desc_csums(geo: Geo, d: dict[str, np.ndarray]) -> None:
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


def check_sb(geo: Geo, what: str) -> None:
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


def read_gdt(vol: Vol, geo: Geo) -> bytes:
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


def metadata_extents(geo: Geo, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
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


def check_locations(geo: Geo, d: dict[str, np.ndarray]) -> None:
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
