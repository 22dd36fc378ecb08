"""Disk shapes for the imaging properties (tests/test_image_shapes.py): a
hypothesis strategy that draws a chain's shape and its sector-granular
writes, and a builder that writes the chain with vhdcore while a plain
bytearray (the independent model) receives the same writes."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from vhdcore.chain import Chain
from vhdcore.disk import VhdFile, create_differencing, create_dynamic, create_fixed

SECTOR = 512
KiB = 1024
MiB = 1024 * KiB
#: 512 KiB and 2 MiB (the common ones) and other powers of two the format allows
BLOCK_SIZES = [4 * KiB, 64 * KiB, 128 * KiB, 512 * KiB, 2 * MiB]
#: keeps every example small: the whole disk at most this big
MAX_DISK = 6 * MiB


@dataclass
class Shape:
    block_size: int
    sectors: int                       # virtual size in sectors
    base: str                          # "dynamic" or "fixed"
    depth: int                         # 1 = the base alone
    short_last: bool                   # store the base's last block short
    writes: list[list[tuple[int, int, str]]] = field(default_factory=list)  # per layer
    seed: int = 0

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@st.composite
def shapes(draw: st.DrawFn, max_depth: int = 5) -> Shape:
    bs = draw(st.sampled_from(BLOCK_SIZES))
    spb = bs // SECTOR
    nblocks = draw(st.integers(1, max(1, min(12, MAX_DISK // bs))))
    kind = draw(st.sampled_from(["multiple", "odd", "near-boundary"]))
    if kind == "multiple":
        sectors = nblocks * spb
    elif kind == "odd":
        sectors = (nblocks - 1) * spb + draw(st.integers(0, spb // 2 - 1)) * 2 + 1
    else:
        sectors = max(1, nblocks * spb + draw(st.integers(-3, 3)))
    base = draw(st.sampled_from(["dynamic", "fixed"]))
    depth = draw(st.integers(1, max_depth))
    short_last = base == "dynamic" and sectors % spb != 0 and draw(st.booleans())
    writes = []
    for _ in range(depth):
        layer = []
        for _ in range(draw(st.integers(0, 5))):
            # near the end of the disk more often: that is where shapes differ
            first = draw(st.one_of(st.integers(0, sectors - 1),
                                   st.integers(max(0, sectors - 2 * spb), sectors - 1)))
            count = draw(st.integers(1, min(sectors - first, 2 * spb + 3)))
            payload = draw(st.sampled_from(["random", "random", "zeros", "ones"]))
            layer.append((first, count, payload))
        writes.append(layer)
    return Shape(bs, sectors, base, depth, short_last, writes, draw(st.integers(0, 2**32 - 1)))


@dataclass
class BuiltChain:
    paths: list[Path]
    model: bytearray
    short_last: bool = False  # the base's last block is stored short

    @property
    def leaf(self) -> Path:
        return self.paths[-1]


def _payload(rnd: random.Random, kind: str, n: int) -> bytes:
    if kind == "zeros":
        return bytes(n)
    if kind == "ones":
        return b"\xff" * n
    return rnd.randbytes(n)


def write_layer(path: Path, model: bytearray, writes: list[tuple[int, int, str]],
                rnd: random.Random) -> None:
    with Chain.open(path, writable=True) as c:
        for first, count, kind in writes:
            data = _payload(rnd, kind, count * SECTOR)
            c.write(first * SECTOR, data)
            model[first * SECTOR:(first + count) * SECTOR] = data


def shorten_last_block(path: Path) -> bool:
    """Store the last block of a dynamic VHD short, as FreeBSD's mkimg does:
    when it is the last block in the file, cut it after the sectors the
    virtual size needs and move the footer up.  Returns whether it did."""
    with VhdFile.open(path) as f:
        last = f.nblocks - 1
        off = f.block_offset(last)
        if off is None:
            return False
        others = [f.block_offset(b) for b in range(last)]
        if any(o is not None and o > off for o in others):
            return False
        need = f.virtual_size - last * f.block_size
        end = off + f.bitmap_size + -(-need // SECTOR) * SECTOR
        footer_at = f.footer_offset
    with open(path, "r+b") as fh:
        fh.seek(footer_at)
        footer = fh.read(SECTOR)
        if end >= footer_at:
            return False
        fh.seek(end)
        fh.write(footer)
        fh.truncate(end + SECTOR)
    return True


def build(tmp: Path, shape: Shape, *, tag: str = "d", extra_seed: int = 0) -> BuiltChain:
    """Write ``shape`` as a chain in ``tmp`` (files ``<tag>0.vhd``...) and its model."""
    rnd = random.Random(shape.seed + extra_seed)
    model = bytearray(shape.size)
    p0 = tmp / f"{tag}0.vhd"
    if shape.base == "fixed":
        create_fixed(p0, shape.size).close()
    else:
        create_dynamic(p0, shape.size, block_size=shape.block_size).close()
    write_layer(p0, model, shape.writes[0], rnd)
    short = False
    if shape.short_last:
        with VhdFile.open(p0) as f:
            unallocated = f.block_offset(f.nblocks - 1) is None
        if unallocated:
            # allocate the last block now: it goes to the end of the file
            write_layer(p0, model, [(shape.sectors - 1, 1, "random")], rnd)
        short = shorten_last_block(p0)
    paths = [p0]
    for i in range(1, shape.depth):
        p = tmp / f"{tag}{i}.vhd"
        create_differencing(p, paths[-1], block_size=shape.block_size).close()
        write_layer(p, model, shape.writes[i], rnd)
        paths.append(p)
    return BuiltChain(paths, model, short)


def disk_bytes(path: os.PathLike[str] | str) -> bytes:
    with Chain.open(path) as c:
        return bytes(c.read(0, c.virtual_size))
