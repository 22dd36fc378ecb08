"""ext2/ext3/ext4: free clusters from the block bitmaps, after the journal.

Safety model (see the project's filesystem-aware imaging notes): start from
"everything used", clear only the clusters the block bitmaps mark free, and
never those holding superblock/descriptor backups, bitmaps or inode tables
(even if a bitmap says otherwise).  Any checksum or count that disagrees
keeps the filesystem whole.  The layout is read by :mod:`.ext_layout`, the
journal by :mod:`.ext_journal`.
"""
from __future__ import annotations

import struct
import uuid as _uuid

import numpy as np

from . import _ranges as R
from .common import FsResult, FsUnsafe, PartReader, Probe, u16, u32
from .crc import crc32c_rows
from .ext_journal import build_overlay, inode_blocks, read_inode
from .ext_layout import (
    BG_BLOCK_UNINIT, COMPAT_HAS_JOURNAL, GROUP_BATCH, INCOMPAT_JOURNAL_DEV, INCOMPAT_RECOVER,
    MAGIC, READ_CHUNK, Geo, Vol, fs_name, check_desc_csums, check_locations, check_sb,
    desc_arrays, metadata_extents, read_gdt,
)

__all__ = ["probe"]


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
    return Probe(fs_name(*feats), str(_uuid.UUID(bytes=sb[0x68:0x78])), _analyze)


def _read_bitmaps(vol: Vol, geo: Geo, d: dict[str, np.ndarray], g0: int, g1: int,
                  uninit: np.ndarray) -> np.ndarray:
    """The block bitmaps of groups ``g0..g1`` (rows; zeros for the uninitialised
    ones), adjacent bitmaps read together, at most :data:`READ_CHUNK` at a time."""
    bm_bytes = geo.cpg // 8
    buf = np.zeros((g1 - g0, bm_bytes), dtype=np.uint8)
    need = sorted((int(d["bb"][g]), g - g0) for g in range(g0, g1) if not uninit[g - g0])
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
    return buf


def _check_bitmap_csums(geo: Geo, d: dict[str, np.ndarray], g0: int, buf: np.ndarray,
                        uninit: np.ndarray) -> None:
    init_rows = np.flatnonzero(~uninit)
    if geo.csum and init_rows.size:
        got = crc32c_rows(np.uint32(geo.seed), buf[init_rows])
        want = d["bbcsum"][g0 + init_rows]
        mask = 0xFFFFFFFF if geo.ds >= 0x3A else 0xFFFF
        bad = np.flatnonzero((got.astype(np.int64) & mask) != want)
        if bad.size:
            raise FsUnsafe(
                f"block bitmap checksum mismatch in group {g0 + int(init_rows[bad[0]])}"
            )


def _group_free_runs(geo: Geo, d: dict[str, np.ndarray], g0: int, g1: int, buf: np.ndarray,
                     uninit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Free cluster runs of groups ``g0..g1`` from their bitmaps, each group's
    count of free clusters checked against its descriptor."""
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
    return R.zero_bit_runs(flat, (g1 - g0) * geo.cpg, base=g0 * geo.cpg)


def _free_from_bitmaps(
    vol: Vol, geo: Geo, d: dict[str, np.ndarray]
) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Free cluster runs from the block bitmaps, checked group by group."""
    honour_uninit = geo.csum or geo.gdt_csum
    out_s: list[np.ndarray] = []
    out_e: list[np.ndarray] = []
    total_clusters = -(-(geo.blocks - geo.fdb) // geo.ratio)
    uninit_groups = 0
    for g0 in range(0, geo.groups, GROUP_BATCH):
        g1 = min(geo.groups, g0 + GROUP_BATCH)
        uninit = np.zeros(g1 - g0, dtype=bool)
        if honour_uninit:
            uninit = (d["flags"][g0:g1] & BG_BLOCK_UNINIT) != 0
        buf = _read_bitmaps(vol, geo, d, g0, g1, uninit)
        uninit_groups += int(uninit.sum())
        _check_bitmap_csums(geo, d, g0, buf, uninit)
        s, e = _group_free_runs(geo, d, g0, g1, buf, uninit)
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
    geo = Geo(raw_sb, part.length)
    vol = Vol(part, geo.bs)
    needs_recovery = bool(geo.incompat & INCOMPAT_RECOVER)
    if needs_recovery and not geo.compat & COMPAT_HAS_JOURNAL:
        raise FsUnsafe("needs_recovery is set but the filesystem has no journal")
    check_sb(geo, "superblock")
    if geo.compat & COMPAT_HAS_JOURNAL and u32(geo.sb, 0xE0):
        d0 = desc_arrays(geo, read_gdt(vol, geo))
        check_desc_csums(geo, d0)
        check_locations(geo, d0)
        if needs_recovery and journal_overlay:
            overlay, notes = build_overlay(vol, geo, d0)
            res.warnings.extend(notes)
            if len(overlay):
                vol.overlay = overlay
                res.state = "journal-applied"
                blk = vol.block(geo.sb_block)
                geo2 = Geo(blk[geo.sb_off : geo.sb_off + 1024], part.length)
                check_sb(geo2, "superblock after journal replay")
                geo = geo2
        elif needs_recovery:
            res.state = "journal-ignored"
            res.warnings.append(
                "needs_recovery is set and journal_overlay=False: free space is read from the "
                "on-disk bitmaps, which can lag behind committed journal transactions (UNSAFE)"
            )
        else:
            # clean: the journal must be empty, or the kernel would wipe it unreplayed
            inode = read_inode(vol, geo, d0, u32(geo.sb, 0xE0))
            phys = inode_blocks(vol, geo, inode, 1)
            if phys[0] < 0:
                raise FsUnsafe("journal superblock is not mapped")
            jsb = vol.raw_block(int(phys[0]))
            if struct.unpack_from(">I", jsb, 0)[0] != 0xC03B3998:
                raise FsUnsafe("journal superblock has no jbd2 magic")
            if struct.unpack_from(">I", jsb, 0x1C)[0] != 0:
                raise FsUnsafe("journal holds transactions but needs_recovery is clear")
    elif needs_recovery:
        raise FsUnsafe("needs_recovery with an external journal, which is not on this disk")
    d = desc_arrays(geo, read_gdt(vol, geo))
    check_desc_csums(geo, d)
    check_locations(geo, d)
    free_blocks, uninit = _free_from_bitmaps(vol, geo, d)
    meta = metadata_extents(geo, d)
    free_blocks = R.difference(free_blocks, meta)
    free_blocks = R.clip(free_blocks, geo.fdb, geo.blocks)
    res.free = R.scale(free_blocks, geo.bs)
    sb_free = u32(geo.sb, 0x0C) | ((u32(geo.sb, 0x158) << 32) if geo.is64 else 0)
    res.fs_free_bytes = sb_free * geo.bs
    if uninit:
        res.warnings.append(f"{uninit} group(s) with BLOCK_UNINIT: free except their metadata")
    return res
