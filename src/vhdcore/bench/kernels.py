"""The machine's memory copy (the reference of every "memcpy" ratio) and
the merge kernel's verbs against their pure-Python/numpy twin, per verb and
on whole operations (the twin patched into :mod:`vhdcore.kernels`)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import _merge_py, kernels
from .._workloads import Workload
from ..chain import Chain, aligned_buffer
from .context import BLOCK, NSECTORS, BenchRun
from .engine import time_coalesce
from .report import GB, MiB
from .timing import median_calls, median_op

__all__ = ["measure_kernels", "measure_memcpy", "measure_twin_operations", "twin_kernels"]


@contextlib.contextmanager
def twin_kernels() -> Iterator[None]:
    """Patch the pure-Python twin into :mod:`vhdcore.kernels` (which the whole
    engine calls through), and restore the active kernel afterwards."""
    saved = {name: getattr(kernels, name) for name in kernels.KERNEL_NAMES}
    try:
        for name in kernels.KERNEL_NAMES:
            setattr(kernels, name, getattr(_merge_py, name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def measure_memcpy(b: BenchRun) -> None:
    b.say("measuring memory copy ...")
    rng = np.random.default_rng(7)
    src = aligned_buffer(BLOCK)
    src[:] = rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    dst = aligned_buffer(BLOCK)
    a, c = np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)
    t = median_calls(lambda: np.copyto(c, a), b.reps)
    b.memcpy = BLOCK / t / GB
    b.add("memcpy.block", "memory copy, 2 MiB block (in cache)", "machine", BLOCK, t,
          ratio=1.0, ratio_to="itself",
          note="numpy copy between page-aligned 2 MiB buffers: the reference of the "
               "kernel ratios (the kernels work on 2 MiB blocks too)")
    n = 64 * MiB
    big_src = aligned_buffer(n)
    big_dst = aligned_buffer(n)
    np.frombuffer(big_src, np.uint8)[:] = 1
    a2, b2 = np.frombuffer(big_src, np.uint8), np.frombuffer(big_dst, np.uint8)
    t2 = median_op(lambda: np.copyto(b2, a2), b.reps)
    b.add("memcpy.stream", "memory copy, 64 MiB (RAM)", "machine", n, t2,
          ratio=n / t2 / GB / b.memcpy, ratio_to="memcpy")


_TITLES = {
    "overlay_full": "overlay, full block",
    "overlay_scattered": "overlay, 4 KiB every 64 KiB",
    "find_runs": "find_runs, scattered bitmap",
    "is_zero": "is_zero, zero block",
    "clear_zero_sectors": "clear_zero_sectors, zero block",
    "fingerprint": "fingerprint (xxh3)",
}


def _kernel_cases(k: Any) -> dict[str, tuple[Callable[[], object], int]]:
    """Each verb of the kernel module ``k`` on a 2 MiB block: (call, bytes)."""
    rng = np.random.default_rng(3)
    block = aligned_buffer(BLOCK)
    block[:] = rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    ro = block.toreadonly()
    zero = aligned_buffer(BLOCK).toreadonly()
    out = aligned_buffer(BLOCK)
    out_bm = bytearray(NSECTORS // 8)
    empty = bytes(NSECTORS // 8)
    full = b"\xff" * (NSECTORS // 8)
    scat = bytearray(NSECTORS // 8)
    for s in range(0, NSECTORS, 128):  # 4 KiB every 64 KiB
        scat[s // 8] = 0xFF
    scattered = bytes(scat)
    runs = np.zeros(2 * (NSECTORS // 2 + 1), dtype=np.uint32)
    bm = bytearray(NSECTORS // 8)

    def overlay_full() -> object:
        out_bm[:] = empty
        return k.overlay(full, ro, out_bm, out, NSECTORS)

    def overlay_scattered() -> object:
        out_bm[:] = empty
        return k.overlay(scattered, ro, out_bm, out, NSECTORS)

    def clear_zero() -> object:
        bm[:] = full
        return k.clear_zero_sectors(bm, zero, NSECTORS)

    return {
        "overlay_full": (overlay_full, BLOCK),
        "overlay_scattered": (overlay_scattered, BLOCK // 16),
        "find_runs": (lambda: k.find_runs(scattered, NSECTORS, runs), NSECTORS // 8),
        "is_zero": (lambda: k.is_zero(zero), BLOCK),
        "clear_zero_sectors": (clear_zero, BLOCK),
        "fingerprint": (lambda: k.fingerprint(ro), BLOCK),
    }


def measure_kernels(b: BenchRun) -> None:
    b.say("measuring the kernel and its pure-Python twin ...")
    native_cases = _kernel_cases(kernels)
    native = {name: median_calls(fn, b.reps) for name, (fn, _) in native_cases.items()}
    twin = {name: median_calls(fn, b.reps) for name, (fn, _) in _kernel_cases(_merge_py).items()}
    sizes = {name: n for name, (_, n) in native_cases.items()}
    for name, t in native.items():
        n = sizes[name]
        note = ""
        ratio: float | None = n / t / GB / b.memcpy
        if name == "find_runs":
            ratio = None
            note = (f"bytes = the 512-byte bitmap; {t * 1e6:.2f} us per 2 MiB block "
                    f"({NSECTORS // 128} runs)")
        elif name == "overlay_scattered":
            note = (f"bytes = the 128 KiB copied out of the 2 MiB block; "
                    f"{t * 1e6:.1f} us per block")
        b.add(f"kernel.{name}", f"kernel {_TITLES[name]}", "kernel", n, t,
              ratio=ratio, ratio_to="memcpy" if ratio else "", note=note)
    for name, t in twin.items():
        if name == "fingerprint":
            continue  # both call xxhash: the same code
        note = ""
        if name in ("overlay_full", "is_zero", "clear_zero_sectors"):
            note = ("the twin is vectorised numpy, itself near memory speed on whole "
                    "blocks; the 20x target is checked where per-sector decisions "
                    "dominate (scattered overlay, find_runs, the scattered merge)")
        b.add(f"twin.{name}", f"vs twin: {_TITLES[name]}", "twin", sizes[name], t,
              ratio=t / native[name], ratio_to="twin", note=note)


def measure_twin_operations(b: BenchRun, wl: dict[str, Workload]) -> None:
    b.say("measuring whole operations with the twin patched in ...")
    sc = wl["scattered"]

    def merge_all() -> None:
        with Chain.open(sc.leaf) as chain:
            data = aligned_buffer(chain.block_size)
            bm = bytearray(chain.bitmap_size)
            for blk in range(chain.nblocks):
                chain.merge_block(blk, data, bm)

    t_native = median_op(merge_all, b.reps)
    with twin_kernels():
        t_twin = median_op(merge_all, b.reps)
    b.add("kernel.merge_scattered", "merge_block loop, scattered chain", "kernel",
          sc.virtual_size, t_native, ratio=sc.virtual_size / t_native / GB / b.memcpy,
          ratio_to="memcpy",
          note="every block: the leaf's 4 KiB-every-64 KiB writes over a full base")
    b.add("twin.merge_scattered", "vs twin: merge_block loop, scattered chain",
          "twin", sc.virtual_size, t_twin, ratio=t_twin / t_native, ratio_to="twin",
          note="whole operation: Chain.merge_block over every block of the scattered "
               "chain, the same Python around both kernels")
    # coalesce of the scattered writes with the twin (the native figure is
    # measured by engine.measure_coalesce)
    merged: list[int] = []
    with twin_kernels():
        t_twin_c = time_coalesce(b, sc, merged, "twin-scattered")
    b.twin_coalesce = (t_twin_c, merged[-1] if merged else 0)
