"""Benchmarks of the merge kernel, compiled and pure-Python twin side by side.

They run once as smoke tests in the normal suite (``--benchmark-disable``) and
are timed on demand::

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only

Each records the bytes it processes in ``extra_info["bytes"]``, so that
bytes / mean time reads as throughput.
"""
from __future__ import annotations

import importlib
import mmap
import os

import numpy as np
import pytest

from vhdcore import _merge_py

SECTOR = 512
NSECTORS = 4096  # a 2 MiB VHD block
BLOCK = NSECTORS * SECTOR
POLICY = os.environ.get("VHDCORE_IMPORT_POLICY", "default").strip().lower() or "default"


@pytest.fixture(scope="module", params=["cython", "python"])
def kernel(request):
    if request.param == "python":
        return _merge_py
    if POLICY == "python":
        pytest.skip("VHDCORE_IMPORT_POLICY=python: only the pure-Python twin is benchmarked")
    return importlib.import_module("vhdcore._merge")


def _page_aligned(data: bytes) -> mmap.mmap:
    """A page-aligned buffer holding data (a fresh bytearray is not aligned)."""
    mm = mmap.mmap(-1, len(data))
    mm.write(data)
    return mm


def _readonly_view(mm: mmap.mmap):
    """Yield a read-only view of mm, then release every export and close it."""
    with memoryview(mm) as mv, mv.toreadonly() as ro:
        yield ro
    mm.close()


@pytest.fixture(scope="module")
def block():
    """A 2 MiB block of random data, read-only, page-aligned."""
    yield from _readonly_view(
        _page_aligned(np.random.default_rng(7).integers(0, 256, BLOCK, dtype=np.uint8).tobytes())
    )


@pytest.fixture(scope="module")
def zero_block():
    yield from _readonly_view(_page_aligned(bytes(BLOCK)))


@pytest.fixture()
def out_block():
    mm = mmap.mmap(-1, BLOCK)
    yield mm
    mm.close()


def _scattered_bitmap() -> bytes:
    """4 KiB (8 sectors) present every 64 KiB (128 sectors)."""
    bm = bytearray(NSECTORS // 8)
    for start in range(0, NSECTORS, 128):
        bm[start // 8] = 0xFF
    return bytes(bm)


FULL_BITMAP = b"\xff" * (NSECTORS // 8)
EMPTY_BITMAP = bytes(NSECTORS // 8)
SCATTERED_BITMAP = _scattered_bitmap()


def test_overlay_full_block_onto_empty(benchmark, kernel, block, out_block):
    out_bm = bytearray(NSECTORS // 8)

    def run():
        out_bm[:] = EMPTY_BITMAP
        return kernel.overlay(FULL_BITMAP, block, out_bm, out_block, NSECTORS)

    benchmark.extra_info["bytes"] = BLOCK
    assert benchmark(run) == NSECTORS
    assert out_block[:] == block


def test_overlay_scattered_4k(benchmark, kernel, block, out_block):
    out_bm = bytearray(NSECTORS // 8)

    def run():
        out_bm[:] = EMPTY_BITMAP
        return kernel.overlay(SCATTERED_BITMAP, block, out_bm, out_block, NSECTORS)

    benchmark.extra_info["bytes"] = BLOCK
    benchmark.extra_info["bytes_copied"] = NSECTORS // 16 * SECTOR
    assert benchmark(run) == NSECTORS // 16
    assert out_bm == SCATTERED_BITMAP


@pytest.mark.parametrize("pattern", ["scattered", "random"])
def test_find_runs(benchmark, kernel, pattern):
    if pattern == "scattered":
        bm, nruns = SCATTERED_BITMAP, NSECTORS // 128
    else:
        bm = np.random.default_rng(3).integers(0, 256, NSECTORS // 8, dtype=np.uint8).tobytes()
        nruns = None
    runs = np.zeros(2 * (NSECTORS // 2 + 1), dtype=np.uint32)
    benchmark.extra_info["bytes"] = len(bm)
    got = benchmark(kernel.find_runs, bm, NSECTORS, runs)
    assert nruns is None or got == nruns


def test_is_zero_zero_block(benchmark, kernel, zero_block):
    benchmark.extra_info["bytes"] = BLOCK
    assert benchmark(kernel.is_zero, zero_block) is True


def test_clear_zero_sectors(benchmark, kernel, zero_block):
    """Every sector present and all zeros: the worst case, each sector is read whole."""
    bm = bytearray(NSECTORS // 8)

    def run():
        bm[:] = FULL_BITMAP
        return kernel.clear_zero_sectors(bm, zero_block, NSECTORS)

    benchmark.extra_info["bytes"] = BLOCK
    assert benchmark(run) == 0


def test_fingerprint(benchmark, kernel, block):
    benchmark.extra_info["bytes"] = BLOCK
    assert benchmark(kernel.fingerprint, block) == _merge_py.fingerprint(block)
