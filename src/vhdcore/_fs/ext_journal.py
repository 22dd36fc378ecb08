"""The internal journal of an ext3/ext4 filesystem: the journal inode's block
map (extent tree or indirect blocks) and the overlay of committed transactions
(:func:`vhdcore._fs.journal.replay`) that the free-space walk reads through.
"""
from __future__ import annotations

import struct

import numpy as np

from .common import FsUnsafe, u32
from .journal import Overlay, replay
from .ext_layout import EXTENTS_FL, INLINE_DATA_FL, Geo, Vol


def read_inode(vol: Vol, geo: Geo, d: dict[str, np.ndarray], ino: int) -> bytes:
    g, idx = divmod(ino - 1, geo.ipg)
    if g >= geo.groups:
        raise FsUnsafe(f"inode {ino} lies past the last group")
    off = idx * geo.inode_size
    blk = int(d["it"][g]) + off // geo.bs
    data = vol.raw_block(blk)
    o = off % geo.bs
    return data[o : o + geo.inode_size]


class _BlockCheck:
    """Every mapping block of the journal inode lies inside the filesystem, and
    there are not implausibly many of them."""

    def __init__(self, geo: Geo) -> None:
        self.geo = geo
        self.budget = 4096

    def __call__(self, b: int) -> None:
        if not self.geo.fdb <= b < self.geo.blocks:
            raise FsUnsafe(f"journal inode maps block {b} outside the filesystem")
        self.budget -= 1
        if self.budget < 0:
            raise FsUnsafe("journal inode mapping is implausibly large")


def _extent_map(vol: Vol, geo: Geo, iblock: bytes, out: np.ndarray,
                check_blk: _BlockCheck) -> None:
    """Fill ``out`` from an extent tree rooted in ``iblock``."""
    nblocks = len(out)

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


def _indirect_map(vol: Vol, geo: Geo, iblock: bytes, out: np.ndarray,
                  check_blk: _BlockCheck) -> None:
    """Fill ``out`` from direct, indirect, double and triple indirect block pointers."""
    nblocks = len(out)
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


def inode_blocks(vol: Vol, geo: Geo, inode: bytes, nblocks: int) -> np.ndarray:
    """Physical block of each logical block 0..nblocks-1 of an inode (-1 = hole)."""
    out = np.full(nblocks, -1, dtype=np.int64)
    flags = u32(inode, 0x20)
    iblock = inode[0x28 : 0x28 + 60]
    if flags & INLINE_DATA_FL:
        raise FsUnsafe("journal inode has inline data")
    if flags & EXTENTS_FL:
        _extent_map(vol, geo, iblock, out, _BlockCheck(geo))
    else:
        _indirect_map(vol, geo, iblock, out, _BlockCheck(geo))
    return out


def build_overlay(vol: Vol, geo: Geo, d: dict[str, np.ndarray]) -> tuple[Overlay, list[str]]:
    jino = u32(geo.sb, 0xE0)
    if jino == 0:
        raise FsUnsafe("needs_recovery with an external journal, which is not on this disk")
    inode = read_inode(vol, geo, d, jino)
    size = u32(inode, 0x04) | (u32(inode, 0x6C) << 32)
    nblocks = size // geo.bs
    if nblocks < 2 or nblocks > geo.blocks:
        raise FsUnsafe(f"journal inode size {size} is implausible")
    phys = inode_blocks(vol, geo, inode, nblocks)

    def read_jblock(n: int) -> bytes:
        if not 0 <= n < nblocks or phys[n] < 0:
            raise FsUnsafe(f"journal block {n} is not mapped")
        return vol.raw_block(int(phys[n]))

    return replay(read_jblock, nblocks, geo.bs, geo.blocks)
