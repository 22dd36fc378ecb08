"""Synthetic VHD chains for the demo, the benchmarks and ``vhdcore bench``.

Chains are written block by block with :meth:`VhdFile.write_block` (fast:
no read-modify-write), with data that looks like an OS disk to a compressor:
text-like pages, binary pages, already-compressed (random) pages and zero
pages.  Everything is deterministic for a given seed.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vhd.create import create_differencing, create_dynamic
from .vhd.file import VhdFile
from .vhd.format import SECTOR

__all__ = ["Workload", "make_chain", "realistic_block", "KINDS"]

KINDS = ("full", "scattered", "sparse", "realistic")

_WORDS = (b"the of and to in is for on that with as by kernel module disk block sector "
          b"config usr lib bin etc var log error warning info debug value true false none "
          b"return import class def self package version install service system user root "
          b"0 1 2 3 4 5 6 7 8 9 10 100 255 1024 4096 = : ; , . / - _ { } ( ) [ ] # \n").split(b" ")


@dataclass
class Workload:
    """A generated chain: ``paths`` from base to leaf."""

    paths: list[Path]
    kind: str
    virtual_size: int
    block_size: int
    #: bytes of data written into each layer (set sectors x 512)
    written: list[int]

    @property
    def leaf(self) -> Path:
        return self.paths[-1]


def _text_page(rng: np.random.Generator, n: int) -> bytes:
    idx = rng.integers(0, len(_WORDS), size=n // 4)
    out = b" ".join(_WORDS[i] for i in idx)
    return (out * (n // max(1, len(out)) + 1))[:n]


def realistic_block(rng: np.random.Generator, block_size: int, *, zero_share: float = 0.2,
                    random_share: float = 0.25) -> bytearray:
    """A block of 4 KiB pages mixing text, structured binary, random and zero
    pages (lz4 ratio around 2 on the whole)."""
    page = 4096
    n = block_size // page
    out = bytearray(block_size)
    kinds = rng.random(n)
    text = _text_page(rng, 64 * 1024)
    for i in range(n):
        k = kinds[i]
        a = i * page
        if k < zero_share:
            continue
        if k < zero_share + random_share:
            out[a : a + page] = rng.bytes(page)
        elif k < zero_share + random_share + 0.2:
            # structured binary: small integers, repeated records
            rec = rng.integers(0, 64, size=16, dtype=np.uint8).tobytes() + bytes(16)
            out[a : a + page] = rec * (page // len(rec))
        else:
            off = int(rng.integers(0, len(text) - page))
            out[a : a + page] = text[off : off + page]
    return out


def _full_bitmap(nbytes: int, nsectors: int) -> bytearray:
    bm = bytearray(nbytes)
    full, rem = divmod(nsectors, 8)
    bm[:full] = b"\xff" * full
    if rem:
        bm[full] = (0xFF << (8 - rem)) & 0xFF
    return bm


def _write_layer(vhd: VhdFile, blocks: Sequence[int], kind: str, rng: np.random.Generator,
                 layer: int) -> int:
    bs = vhd.block_size
    written = 0
    vhd.durable = False  # generated scratch data: the write order, no fsyncs
    for blk in blocks:
        n = vhd.block_sectors(blk)
        if kind == "scattered" and layer > 0:
            # 4 KiB written every 64 KiB
            bm = bytearray(vhd.bitmap_size)
            data = bytearray(bs)
            for s in range(0, n, 128):
                cnt = min(8, n - s)
                for k in range(s, s + cnt):
                    bm[k >> 3] |= 0x80 >> (k & 7)
                data[s * SECTOR : (s + cnt) * SECTOR] = rng.bytes(cnt * SECTOR)
                written += cnt * SECTOR
        else:
            bm = _full_bitmap(vhd.bitmap_size, n)
            if kind == "realistic":
                data = realistic_block(rng, bs)
            else:
                data = bytearray(rng.bytes(bs))
            written += n * SECTOR
        vhd.write_block(blk, bm, data)
    vhd.flush(durable=False)
    return written


def make_chain(directory: str | os.PathLike[str], kind: str = "realistic", *,
               size: int = 256 * 1024 * 1024, layers: int = 3,
               block_size: int = 2 * 1024 * 1024, seed: int = 0,
               fill: float = 0.6) -> Workload:
    """Write a chain of ``layers`` disks into ``directory``.

    * ``full``: every layer writes whole random blocks (the base ``fill`` of
      the disk, each child a quarter of the blocks);
    * ``scattered``: a full base, children write 4 KiB every 64 KiB of each
      of their blocks;
    * ``sparse``: a mostly-zero disk (5% of the blocks hold data, a few
      allocated blocks are all zero);
    * ``realistic``: OS-disk-like data over three layers, some blocks zero,
      some overwritten by later layers.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown workload {kind!r}; one of {', '.join(KINDS)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nblocks = -(-size // block_size)
    paths = [d / "base.vhd"]
    written = []
    with create_dynamic(paths[0], size, block_size=block_size) as base:
        share = 0.05 if kind == "sparse" else fill
        blocks = np.sort(rng.choice(nblocks, size=max(1, int(nblocks * share)), replace=False))
        written.append(_write_layer(base, blocks.tolist(), kind, rng, 0))
        if kind == "sparse":
            # allocated blocks that hold only zeros (deleted data, pre-zeroed)
            zeros = [b for b in range(nblocks) if base.block_offset(b) is None][:4]
            for b in zeros:
                base.write_block(b, _full_bitmap(base.bitmap_size, base.block_sectors(b)),
                                 bytes(block_size))
            base.flush(durable=False)
    for i in range(1, layers):
        p = d / f"snap{i}.vhd"
        create_differencing(p, paths[-1]).close()
        paths.append(p)
        with VhdFile.open(p, writable=True) as child:
            share = 0.25 if kind in ("full", "realistic") else (0.02 if kind == "sparse" else 1.0)
            cnt = max(1, int(nblocks * share))
            blocks = np.sort(rng.choice(nblocks, size=cnt, replace=False))
            written.append(_write_layer(child, blocks.tolist(), kind, rng, i))
    return Workload(paths, kind, size, block_size, written)
