"""Test helpers: random chains written by vhdcore next to an independent
model (a plain bytearray that receives the same writes)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from vhdcore.chain import Chain
from vhdcore.disk import create_differencing, create_dynamic, create_fixed

SECTOR = 512


@dataclass
class ModelChain:
    paths: list[Path]  # base .. leaf
    model: bytearray
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, offset, length)

    @property
    def leaf(self) -> Path:
        return self.paths[-1]


def random_payload(rnd: random.Random, n: int, zero_share: float = 0.15) -> bytes:
    if rnd.random() < zero_share:
        return bytes(n)
    return rnd.randbytes(n)


def build_chain(tmp: Path, *, size: int, depth: int, block_size: int = 2 * 1024 * 1024,
                base: str = "dynamic", writes_per_layer: int = 10, granularity: int = SECTOR,
                max_len: int = 64 * 1024, seed: int = 0, zero_share: float = 0.15,
                base_writes: int | None = None) -> ModelChain:
    """A chain of ``depth`` disks (base + depth-1 differencing) with random
    writes aligned to ``granularity`` (1 = byte-granular), mirrored in a model."""
    rnd = random.Random(seed)
    model = bytearray(size)
    paths = [tmp / "d0.vhd"]
    if base == "fixed":
        create_fixed(paths[0], size).close()
    else:
        create_dynamic(paths[0], size, block_size=block_size).close()
    mc = ModelChain(paths, model)
    for layer in range(depth):
        if layer:
            p = tmp / f"d{layer}.vhd"
            create_differencing(p, paths[-1]).close()
            paths.append(p)
        n = writes_per_layer if (layer or base_writes is None) else base_writes
        with Chain.open(paths[-1], writable=True) as c:
            for _ in range(n):
                units = size // granularity
                off = rnd.randrange(units) * granularity
                ln = rnd.randrange(1, max(2, max_len // granularity)) * granularity
                ln = min(ln, size - off)
                data = random_payload(rnd, ln, zero_share)
                c.write(off, data)
                model[off : off + ln] = data
                mc.writes.append((layer, off, ln))
    return mc


def read_all(path: os.PathLike | str) -> bytes:
    with Chain.open(path) as c:
        return c.read(0, c.virtual_size)


def store_last_block_short(path: os.PathLike | str, *, stale_bits: bool = False) -> bool:
    """Rewrite a dynamic or differencing VHD as FreeBSD ``mkimg`` stores it:
    the partial last block moved to the end of the file and stored short
    (only the sectors the virtual size needs), the footer right after it.
    ``stale_bits``: also set the bitmap bits past the last sector (which a
    reader must ignore).  Returns False when the last block is not allocated
    or the virtual size is a multiple of the block size (nothing to do)."""
    from vhdcore.disk import VhdFile

    with VhdFile.open(path, writable=True) as v:
        last = v.nblocks - 1
        off = v.block_offset(last)
        if off is None or v.virtual_size % v.block_size == 0:
            return False
        n = v.block_sectors(last) * SECTOR
        bm = bytearray(v.mv[off : off + v.bitmap_size])
        if stale_bits:
            for s in range(n // SECTOR, v.block_size // SECTOR):
                bm[s >> 3] |= 0x80 >> (s & 7)
        data = bytes(v.mv[off + v.bitmap_size : off + v.bitmap_size + n])
        new = v.reserve(v.bitmap_size + v.block_size)
        v._pwrite(bytes(bm) + data, new)
        v.bat[last] = new // SECTOR
        v._bat_dirty.add(last)
        v.flush()
        footer = v.footer.pack()
        end = new + v.bitmap_size + n
    with open(path, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        f.write(footer)
    return True
