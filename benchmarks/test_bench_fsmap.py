"""Benchmarks of vhdcore.fsmap: bitmap scanning, CRC rows, the whole map, block states.

They run once as smoke tests in the normal suite (``--benchmark-disable``) and
are timed on demand::

    python -m pytest benchmarks/test_bench_fsmap.py --benchmark-only

Each records what it processes in ``extra_info["bytes"]`` (bitmap bytes, or
virtual-disk bytes for ``map_disk``), so bytes / mean time reads as throughput.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from vhdcore._fs import _ranges as R
from vhdcore._fs.crc import crc32c_rows
from vhdcore.fsmap import map_disk

MiB = 1024 * 1024
BITMAP_MIB = int(os.environ.get("VHDCORE_BENCH_FSMAP_BITMAP_MIB", "8"))


def _aged_bitmap(nbytes: int, seed: int = 1) -> np.ndarray:
    """A bitmap of alternating used/free runs (geometric lengths, mean 64 bits)."""
    rng = np.random.default_rng(seed)
    nbits = nbytes * 8
    runs = rng.geometric(1 / 64, size=nbits // 32 + 16)
    edges = np.cumsum(runs)
    edges = edges[edges < nbits]
    bits = np.zeros(nbits, dtype=np.uint8)
    flips = np.zeros(nbits + 1, dtype=np.int8)
    flips[edges] = 1
    bits[:] = np.cumsum(flips[:nbits]) & 1
    return np.packbits(bits, bitorder="little")


def test_bench_zero_bit_runs(benchmark):
    bm = _aged_bitmap(BITMAP_MIB * MiB)
    s, e = benchmark(R.zero_bit_runs, bm, bm.size * 8)
    assert s.size > 0 and (e > s).all()
    benchmark.extra_info["bytes"] = int(bm.size)
    benchmark.extra_info["runs"] = int(s.size)


def test_bench_crc32c_rows(benchmark):
    rows = np.random.default_rng(2).integers(0, 256, size=(512, 4096), dtype=np.uint8)
    out = benchmark(crc32c_rows, np.uint32(0xFFFFFFFF), rows)
    assert out.shape == (512,)
    benchmark.extra_info["bytes"] = int(rows.size)


def test_bench_block_states(benchmark):
    bm = _aged_bitmap(BITMAP_MIB * MiB // 8)
    s, e = R.zero_bit_runs(bm, bm.size * 8)
    from vhdcore.fsmap import DiskMap

    size = int(bm.size * 8 * 4096)
    d = DiskMap(size=size, table="none", partitions=[], warnings=[], _starts=s * 4096, _ends=e * 4096)
    states = benchmark(d.block_states, 2 * MiB)
    assert states.size == -(-size // (2 * MiB))
    benchmark.extra_info["bytes"] = size
    benchmark.extra_info["ranges"] = int(s.size)


@pytest.mark.skipif(not shutil.which("mke2fs"), reason="needs mke2fs")
def test_bench_map_disk_ext4(benchmark, tmp_path):
    """A 32 GiB sparse ext4 without uninit_bg: every one of its 256 bitmaps is read."""
    img = tmp_path / "big.img"
    size = 32 * 1024 * MiB
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^uninit_bg",
         str(img)],
        check=True,
        capture_output=True,
    )
    with open(img, "rb") as f:

        def rd(o, n):
            f.seek(o)
            return f.read(n)

        dmap = benchmark(map_disk, rd, size)
    assert dmap.partitions[0].state == "clean"
    benchmark.extra_info["bytes"] = size
