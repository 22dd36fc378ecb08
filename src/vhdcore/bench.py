"""Throughput benchmarks behind ``python -m vhdcore bench``.

One run generates its own chains (:func:`vhdcore._workloads.make_chain`) in a
temporary directory and measures, several repetitions each with the median
reported, everything from the machine's own memory copy bandwidth (the
physical limit) up to the whole imaging pipeline:

* memory copy into page-aligned buffers (a 2 MiB block, in cache, and a
  64 MiB stream);
* the merge kernel's verbs on 2 MiB blocks, and the same verbs of its
  pure-Python/numpy twin (:mod:`vhdcore._merge_py`) for the speed-up, per
  kernel and on whole operations (the kernels patched into
  :mod:`vhdcore.kernels` for the time of the measurement);
* reading a chain, flattening it (raw and sparse VHD, in the page cache),
  ``qemu-img convert`` as a peer when it is installed, coalescing full
  blocks and scattered 4 KiB writes in place;
* lz4 on OS-disk-like blocks (1 and 2 threads), a segmented upload to a
  directory target, the merge/scan stage alone and the imaging pipeline to a
  directory;
* the peak memory of flatten and imaging of a sparse chain of at least
  8 GiB of virtual size, each in a child process.

Every figure is reported in GB/s (10**9 bytes per second) next to a ratio to
a reference measured in the same run (memory copy, the peer, the twin, the
slowest pipeline stage) and, where there is one, its target with PASS or
MISS.  Ratios carry over between machines; absolute GB/s do not.

Directory targets are written without fsync and flatten/coalesce run with
``durable=False``: the figures are those of the engine with the data in the
page cache, not of the disk under it.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import _merge_py, kernels
from ._version import __version__
from ._workloads import Workload, make_chain
from .chain import Chain, aligned_buffer
from .ops.coalesce import coalesce
from .ops.flatten import flatten
from .ops.stream import iter_image_blocks
from .vhd.layout import DynamicLayout
from .compress import FrameCompressor, compress_frame
from .vhd.format import SECTOR

__all__ = [
    "DEFAULT_SIZE",
    "MEMORY_SIZE",
    "QUICK_SIZE",
    "TARGETS",
    "Result",
    "format_report",
    "machine_info",
    "measure_peak_memory",
    "run_bench",
    "twin_kernels",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
GB = 1e9

#: virtual size of the throughput workloads (``--size``)
DEFAULT_SIZE = 256 * MiB
QUICK_SIZE = 96 * MiB
#: virtual size of the sparse chain of the memory check
MEMORY_SIZE = 8 * GiB
#: repetitions per measurement (the median is reported)
DEFAULT_REPS = 7
QUICK_REPS = 5

BLOCK = 2 * MiB
NSECTORS = BLOCK // SECTOR
THREADS = 2
#: segment size of the upload and imaging measurements: small enough that a
#: workload of 96 MiB still has several segments to overlap
SEGMENT = 8 * MiB

#: the targets of the issue, by result name: (what is compared, operator, value, text)
TARGETS: dict[str, tuple[str, str, float, str]] = {
    "kernel.overlay_full": ("ratio", ">=", 0.5, ">= 0.5x memcpy"),
    "kernel.is_zero": ("ratio", ">=", 0.5, ">= 0.5x memcpy"),
    "twin.overlay_scattered": ("ratio", ">=", 20.0, ">= 20x twin"),
    "twin.find_runs": ("ratio", ">=", 20.0, ">= 20x twin"),
    "twin.merge_scattered": ("ratio", ">=", 20.0, ">= 20x twin"),
    "flatten.vhd_cold": ("ratio", ">=", 1.0, ">= 1x qemu-img -O vpc (goal 2x)"),
    "flatten.raw": ("ratio", ">=", 1.0, ">= 1x qemu-img -O raw (goal 1.5x)"),
    "flatten.raw_cold": ("ratio", ">=", 1.0, ">= 1x qemu-img -O raw (goal 1.5x)"),
    "coalesce.full": ("gbps", ">=", 1.0, ">= 1 GB/s"),
    "coalesce.scattered": ("gbps", ">=", 0.2, ">= 200 MB/s"),
    "imaging.pipeline": ("ratio", ">=", 0.7, ">= 0.7x slowest stage"),
    "memory.flatten": ("mib", "<", 256.0, "< 256 MiB"),
    "memory.imaging": ("mib", "<", 256.0, "< 256 MiB"),
}


def _repo_targets() -> None:
    from .repo.bench import REPO_TARGETS

    TARGETS.update(REPO_TARGETS)


_repo_targets()


def _coalesce_peer_targets() -> None:
    from ._coalesce_peer import PEER_TARGETS

    TARGETS.update(PEER_TARGETS)


_coalesce_peer_targets()
#: virtual size of the sparse chain of the repository's memory check
REPO_MEMORY_SIZE = 2040 << 30  # the VHD limit: just under 2 TiB


@dataclass
class Result:
    """One measured figure.

    ``bytes`` processed in ``seconds`` (the median of the repetitions) give
    ``gbps``; ``ratio`` compares it with the reference ``ratio_to``.  Memory
    results put the peak resident size in ``peak_bytes`` (``bytes`` and
    ``seconds`` are then the virtual disk and the run time).  ``passed`` is
    None where there is no target (or it could not be checked).
    """

    name: str
    title: str
    group: str
    bytes: int
    seconds: float
    reps: int
    ratio: float | None = None
    ratio_to: str = ""
    target: str = ""
    passed: bool | None = None
    note: str = ""
    peak_bytes: int | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB if self.seconds > 0 else 0.0

    @property
    def verdict(self) -> str:
        """PASS, MISS, ``n/a`` (a target that could not be checked) or ``info``."""
        if self.passed is None:
            return "n/a" if self.target else "info"
        return "PASS" if self.passed else "MISS"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = round(self.gbps, 4)
        d["seconds"] = self.seconds
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        d["pass"] = d.pop("passed")
        d["verdict"] = self.verdict
        if self.peak_bytes is not None:
            d["peak_mib"] = round(self.peak_bytes / MiB, 1)
        return d


# --------------------------------------------------------------------------
# timing
def _median_calls(fn: Callable[[], object], reps: int, min_seconds: float = 0.02) -> float:
    """Median seconds of one call of a fast ``fn``: each repetition loops
    enough calls to last about ``min_seconds``."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_seconds / 4 or n >= 1 << 20:
            break
        n *= 4
    n = max(1, int(n * min_seconds / max(dt, 1e-9)))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def _median_op(fn: Callable[..., object], reps: int,
               setup: Callable[[], tuple[Any, ...]] | None = None,
               cleanup: Callable[[], object] | None = None, warmup: bool = True,
               cpu: list[float] | None = None) -> float:
    """Median seconds of ``fn(*setup())``; ``setup`` and ``cleanup`` run
    outside the timing, around each repetition (and the warm-up).  ``cpu``,
    if given, receives the median CPU seconds of the process (all threads)."""
    samples = []
    cpus = []
    for i in range(reps + (1 if warmup else 0)):
        args = setup() if setup is not None else ()
        gc.collect()
        c = time.process_time()
        t = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t
        dc = time.process_time() - c
        if cleanup is not None:
            cleanup()
        if i or not warmup:
            samples.append(dt)
            cpus.append(dc)
    if cpu is not None:
        cpu.append(statistics.median(cpus))
    return statistics.median(samples)


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


_DROP_CACHES = "/proc/sys/vm/drop_caches"


def _can_drop_caches() -> bool:
    """Whether this process may drop the page cache (root on Linux)."""
    return os.access(_DROP_CACHES, os.W_OK)


def _drop_caches() -> None:
    """Write everything back and drop the page cache (clean pages, dentries
    and inodes), so that the next run reads from storage."""
    os.sync()
    with open(_DROP_CACHES, "w") as f:
        f.write("3\n")


def _check(name: str, value: float | None) -> bool | None:
    tgt = TARGETS.get(name)
    if tgt is None or value is None:
        return None
    _, op, limit, _ = tgt
    return value >= limit if op == ">=" else value < limit


def _target_text(name: str) -> str:
    tgt = TARGETS.get(name)
    return tgt[3] if tgt else ""


# --------------------------------------------------------------------------
class _Bench:
    def __init__(self, work: Path, size: int, reps: int, memory_size: int,
                 say: Callable[[str], None]) -> None:
        self.work = work
        self.size = size
        self.reps = reps
        self.memory_size = memory_size
        self.say = say
        self.results: list[Result] = []
        #: GB/s of the 2 MiB memory copy: the reference of the "memcpy" ratios
        self.memcpy = 0.0
        self.settle_seconds = 0.0
        #: (seconds, merged bytes) of the scattered coalesce with the twin
        self.twin_coalesce = (0.0, 0)

    def add(self, name: str, title: str, group: str, nbytes: int, seconds: float, *,
            ratio: float | None = None, ratio_to: str = "", note: str = "",
            reps: int | None = None,
            peak_bytes: int | None = None) -> Result:
        r = Result(name, title, group, int(nbytes), float(seconds), reps or self.reps, ratio,
                   ratio_to, _target_text(name), None, note, peak_bytes)
        tgt = TARGETS.get(name)
        if tgt is not None:
            kind = tgt[0]
            value = {"ratio": ratio, "gbps": r.gbps,
                     "mib": None if peak_bytes is None else peak_bytes / MiB}[kind]
            r.passed = _check(name, value)
        self.results.append(r)
        return r

    # ------------------------------------------------------------ workloads
    def workloads(self) -> dict[str, Workload]:
        self.say(f"generating workloads of {self.size // MiB} MiB ...")
        made = {}
        for kind in ("full", "scattered", "sparse", "realistic"):
            # scattered: every base block allocated ("a full base"), so that the
            # child's 4 KiB writes land in existing parent blocks
            made[kind] = make_chain(self.work / "chains" / kind, kind, size=self.size,
                                    layers=2 if kind == "scattered" else 3, seed=1,
                                    fill=1.0 if kind == "scattered" else 0.6)
        # the same writes over a parent that lacks 40% of the blocks: each of
        # those is allocated and written whole (2 MiB) by the coalesce
        made["scattered-holes"] = make_chain(self.work / "chains" / "scattered-holes",
                                             "scattered", size=self.size, layers=2, seed=1)
        self._settle(p for w in made.values() for p in w.paths)
        return made

    def _settle(self, paths: Iterable[Path]) -> None:
        """Write back the generated files now (fsync), so that the kernel's
        flusher threads do not compete with the measurements later (they
        share the same few CPUs)."""
        t = time.perf_counter()
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.settle_seconds += time.perf_counter() - t

    # ------------------------------------------------------------ memcpy
    def measure_memcpy(self) -> None:
        self.say("measuring memory copy ...")
        rng = np.random.default_rng(7)
        src = aligned_buffer(BLOCK)
        src[:] = rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
        dst = aligned_buffer(BLOCK)
        a, b = np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)
        t = _median_calls(lambda: np.copyto(b, a), self.reps)
        self.memcpy = BLOCK / t / GB
        self.add("memcpy.block", "memory copy, 2 MiB block (in cache)", "machine", BLOCK, t,
                 ratio=1.0, ratio_to="itself",
                 note="numpy copy between page-aligned 2 MiB buffers: the reference of the "
                      "kernel ratios (the kernels work on 2 MiB blocks too)")
        n = 64 * MiB
        big_src = aligned_buffer(n)
        big_dst = aligned_buffer(n)
        np.frombuffer(big_src, np.uint8)[:] = 1
        a2, b2 = np.frombuffer(big_src, np.uint8), np.frombuffer(big_dst, np.uint8)
        t2 = _median_op(lambda: np.copyto(b2, a2), self.reps)
        self.add("memcpy.stream", "memory copy, 64 MiB (RAM)", "machine", n, t2,
                 ratio=n / t2 / GB / self.memcpy, ratio_to="memcpy")

    # ------------------------------------------------------------ kernels
    def measure_kernels(self) -> None:
        self.say("measuring the kernel and its pure-Python twin ...")
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

        def cases(k: Any) -> dict[str, tuple[Callable[[], object], int]]:
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

        titles = {
            "overlay_full": "overlay, full block",
            "overlay_scattered": "overlay, 4 KiB every 64 KiB",
            "find_runs": "find_runs, scattered bitmap",
            "is_zero": "is_zero, zero block",
            "clear_zero_sectors": "clear_zero_sectors, zero block",
            "fingerprint": "fingerprint (xxh3)",
        }
        native = {name: _median_calls(fn, self.reps) for name, (fn, _) in cases(kernels).items()}
        twin = {name: _median_calls(fn, self.reps) for name, (fn, _) in cases(_merge_py).items()}
        sizes = {name: n for name, (_, n) in cases(kernels).items()}
        for name, t in native.items():
            n = sizes[name]
            note = ""
            ratio: float | None = n / t / GB / self.memcpy
            if name == "find_runs":
                ratio = None
                note = (f"bytes = the 512-byte bitmap; {t * 1e6:.2f} us per 2 MiB block "
                        f"({NSECTORS // 128} runs)")
            elif name == "overlay_scattered":
                note = (f"bytes = the 128 KiB copied out of the 2 MiB block; "
                        f"{t * 1e6:.1f} us per block")
            self.add(f"kernel.{name}", f"kernel {titles[name]}", "kernel", n, t,
                     ratio=ratio, ratio_to="memcpy" if ratio else "", note=note)
        for name, t in twin.items():
            if name == "fingerprint":
                continue  # both call xxhash: the same code
            n = sizes[name]
            speed = t / native[name]
            note = ""
            if name in ("overlay_full", "is_zero", "clear_zero_sectors"):
                note = ("the twin is vectorised numpy, itself near memory speed on whole "
                        "blocks; the 20x target is checked where per-sector decisions "
                        "dominate (scattered overlay, find_runs, the scattered merge)")
            self.add(f"twin.{name}", f"vs twin: {titles[name]}", "twin", n, t,
                     ratio=speed, ratio_to="twin", note=note)

    # ------------------------------------------------------------ whole ops
    def measure_twin_operations(self, wl: dict[str, Workload]) -> None:
        self.say("measuring whole operations with the twin patched in ...")
        sc = wl["scattered"]

        def merge_all() -> None:
            with Chain.open(sc.leaf) as chain:
                data = aligned_buffer(chain.block_size)
                bm = bytearray(chain.bitmap_size)
                for blk in range(chain.nblocks):
                    chain.merge_block(blk, data, bm)

        t_native = _median_op(merge_all, self.reps)
        with twin_kernels():
            t_twin = _median_op(merge_all, self.reps)
        self.add("kernel.merge_scattered", "merge_block loop, scattered chain", "kernel",
                 sc.virtual_size, t_native, ratio=sc.virtual_size / t_native / GB / self.memcpy,
                 ratio_to="memcpy",
                 note="every block: the leaf's 4 KiB-every-64 KiB writes over a full base")
        self.add("twin.merge_scattered", "vs twin: merge_block loop, scattered chain",
                 "twin", sc.virtual_size, t_twin, ratio=t_twin / t_native, ratio_to="twin",
                 note="whole operation: Chain.merge_block over every block of the scattered "
                      "chain, the same Python around both kernels")
        # coalesce of the scattered writes with the twin (the native figure is
        # measured in measure_coalesce)
        merged: list[int] = []
        with twin_kernels():
            t_twin_c = self._time_coalesce(sc, merged, "twin-scattered")
        self.twin_coalesce = (t_twin_c, merged[-1] if merged else 0)

    # ------------------------------------------------------------ read/flatten
    def measure_flatten(self, wl: dict[str, Workload]) -> None:
        self.say("measuring chain read, flatten and qemu-img convert ...")
        w = wl["realistic"]
        vsize = w.virtual_size

        def read_all() -> None:
            with Chain.open(w.leaf) as chain:
                for _ in chain.iter_raw(8 * MiB):
                    pass

        t = _median_op(read_all, self.reps)
        self.add("read.chain", "chain read (Chain.iter_raw), realistic", "read", vsize, t,
                 ratio=vsize / t / GB / self.memcpy, ratio_to="memcpy",
                 note="bytes = virtual disk; three layers merged per block")
        out_dir = self.work / "flat"
        out_dir.mkdir(exist_ok=True)
        # the same input for both sides: the chain flattened into one dynamic
        # VHD (qemu-img does not follow VHD differencing chains)
        flat_vhd = out_dir / "peer-input.vhd"
        flatten(w.leaf, flat_vhd, "vhd", durable=False, fs_aware=False, overwrite=True)
        self._settle([flat_vhd])

        def cat_raw(out: Path) -> object:
            with Chain.open(flat_vhd) as chain:
                return chain.copy_to_raw(out, threads=THREADS)

        # vhdcore: fsync, rename and directory fsync inside the timing
        ours: dict[str, Callable[[Path], object]] = {
            "flatten.vhd": lambda out: flatten(flat_vhd, out, "vhd", threads=THREADS,
                                               fs_aware=False, overwrite=True),
            "flatten.raw": lambda out: flatten(flat_vhd, out, "raw", threads=THREADS,
                                               fs_aware=False, overwrite=True),
            "cat.raw": cat_raw,
        }
        peer_of = {"flatten.vhd": "vpc", "flatten.raw": "raw", "cat.raw": "raw"}
        ops: dict[str, Callable[[Path], object]] = dict(ours)
        qemu = shutil.which("qemu-img")
        qemu_note = "qemu-img is not installed"
        if qemu:
            qemu_exe: str = qemu

            def converter(fmt: str) -> Callable[[Path], object]:
                def convert(out: Path) -> object:
                    subprocess.run([qemu_exe, "convert", "-f", "vpc", "-O", fmt, str(flat_vhd),
                                    str(out)], check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
                    # its output made durable too, inside the timing
                    fd = os.open(out, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    return None
                return convert

            try:
                for fmt in ("vpc", "raw"):
                    converter(fmt)(out_dir / "probe")
                    (out_dir / "probe").unlink()
                    ops[f"qemu.{fmt}"] = converter(fmt)
            except (OSError, subprocess.CalledProcessError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                qemu_note = f"qemu-img convert failed ({err.decode(errors='replace')[:120]})"
                qemu = None
                ops = dict(ours)
        cold_ok = _can_drop_caches()
        modes = ["warm"] + (["cold"] if cold_ok else [])
        # interleaved, so that the peer and vhdcore see the same machine; each
        # output is removed (and the removal written back) after its run
        samples: dict[tuple[str, str], list[float]] = {}
        for mode in modes:
            reps = self.reps if mode == "warm" else max(1, min(self.reps, 3))
            for i in range(reps + (1 if mode == "warm" else 0)):
                for key, op in ops.items():
                    out = out_dir / f"out.{key}"
                    if mode == "cold":
                        _drop_caches()
                    gc.collect()
                    t0 = time.perf_counter()
                    op(out)
                    dt = time.perf_counter() - t0
                    out.unlink()
                    os.sync()
                    if mode == "cold" or i:
                        samples.setdefault((mode, key), []).append(dt)
        med = {k: statistics.median(v) for k, v in samples.items()}
        sync_note = "fsync of the output included on both sides"
        for mode in modes:
            sfx = "" if mode == "warm" else "_cold"
            cache = ("input in the page cache" if mode == "warm"
                     else "page cache dropped before each run")
            if qemu:
                for fmt in ("vpc", "raw"):
                    name = "peer.qemu_img" + ("" if fmt == "raw" else "_vpc") + sfx
                    self.add(name, f"qemu-img convert -O {fmt}, {mode}", "flatten", vsize,
                             med[(mode, f"qemu.{fmt}")], ratio=1.0, ratio_to="itself",
                             note=f"input: the chain flattened to one dynamic VHD; {cache}; "
                                  f"{sync_note}; includes its process start")
            for key in ours:
                tt = med[(mode, key)]
                t_q = med.get((mode, f"qemu.{peer_of[key]}"))
                title = {"flatten.vhd": "flatten to vhd", "flatten.raw": "flatten to raw",
                         "cat.raw": "cat -o (raw)"}[key]
                note = f"bytes = virtual disk; {cache}; {sync_note}"
                if not qemu:
                    note += f"; {qemu_note}: the peer target is unchecked"
                self.add(key + sfx, f"{title}, {mode}", "flatten", vsize, tt,
                         ratio=t_q / tt if t_q else None,
                         ratio_to=f"qemu-img -O {peer_of[key]}" if qemu else "", note=note)
        if not cold_ok:
            for key in ("flatten.vhd_cold", "flatten.raw_cold"):
                self.add(key, f"{key}: needs root (/proc/sys/vm/drop_caches)", "flatten", vsize,
                         med[("warm", key[: -len("_cold")])],
                         note="not measured cold: the page cache cannot be dropped here")

    # ------------------------------------------------------------ coalesce
    def _time_coalesce(self, w: Workload, merged: list[int], tag: str) -> float:
        counter = {"i": 0}

        def setup() -> tuple[Any, ...]:
            from ._coalesce_peer import sparse_copy

            counter["i"] += 1
            d = self.work / f"coalesce-{tag}-{counter['i']}"
            d.mkdir()
            # sparse copies, written back before the timing: shutil.copyfile
            # fills the holes with zeros, and the gigabytes of dirty pages
            # left behind slowed each later repetition down (issue 15)
            for p in w.paths:
                sparse_copy(p, d / p.name)
            return (d / w.leaf.name,)

        def run(leaf: Path) -> None:
            res = coalesce(leaf, durable=False, skip_space_check=True)
            merged.append(res.sectors_written * SECTOR)

        def cleanup() -> None:
            shutil.rmtree(self.work / f"coalesce-{tag}-{counter['i']}", ignore_errors=True)

        return _median_op(run, self.reps, setup=setup, cleanup=cleanup)

    def measure_coalesce(self, wl: dict[str, Workload]) -> None:
        self.say("measuring coalesce in place ...")
        for kind in ("full", "scattered"):
            merged: list[int] = []
            t = self._time_coalesce(wl[kind], merged, kind)
            nbytes = merged[-1]
            what = "full blocks" if kind == "full" else "4 KiB every 64 KiB"
            self.add(f"coalesce.{kind}", f"coalesce in place, {what}", "coalesce", nbytes, t,
                     ratio=nbytes / t / GB / self.memcpy, ratio_to="memcpy",
                     note="bytes = merged data (sectors written x 512); fresh copies each "
                          "repetition, durable=False")
            if kind == "scattered":
                merged = []
                t_h = self._time_coalesce(wl["scattered-holes"], merged, "holes")
                self.add("coalesce.scattered_holes", "coalesce, 4 KiB/64 KiB, parent with holes", "coalesce", merged[-1], t_h,
                         ratio=merged[-1] / t_h / GB / self.memcpy, ratio_to="memcpy",
                         note="40% of the child's blocks are new to the parent: placed in "
                              "fresh space (a hole), only their 128 KiB of data and the bitmap "
                              "written")
                t_twin, n_twin = self.twin_coalesce
                self.add("twin.coalesce_scattered", "vs twin: coalesce, 4 KiB every 64 KiB",
                         "twin", n_twin, t_twin, ratio=t_twin / t,
                         ratio_to="twin", note="whole operation, including the pwrite of every "
                                               "4 KiB run (the same for both)")
        self.measure_coalesce_peer()

    def measure_coalesce_peer(self) -> None:
        """Coalesce side by side with blktap's ``vhd-util coalesce`` (when
        ``VHDCORE_BENCH_VHD_UTIL`` names it) on the same files, cold and warm,
        the final sync counted on both sides (see :mod:`vhdcore._coalesce_peer`).
        Without vhd-util, vhdcore's own figures are reported."""
        from . import _coalesce_peer as cpeer

        vu = cpeer.vhd_util_path()
        # 4 GiB and 256 MiB of child data at the default size; smaller runs
        # (--quick, --size) scale down, to 1 GiB at most
        vsize = 4 * GiB if self.size >= DEFAULT_SIZE else min(1 * GiB, 16 * self.size)
        vsize = max(64 * MiB, vsize // BLOCK * BLOCK)
        data = vsize // 16
        which = f"vhd-util at {vu}" if vu else "no vhd-util: set VHDCORE_BENCH_VHD_UTIL"
        self.say(f"measuring coalesce vs vhd-util ({which}) ...")
        base = self.work / "coalesce-peer"
        for kind in cpeer.PEER_KINDS:
            pristine = cpeer.make_peer_pair(base / f"pristine-{kind}", kind, size=vsize, data=data)
            self._settle(pristine)
            for temp in ("cold", "warm"):
                name = f"coalesce.vs_vhd_util.{kind}.{temp}"
                title = (f"coalesce vs vhd-util, {temp}, "
                         f"{'random 4 KiB' if kind == 'random4k' else 'whole blocks'}")
                out = cpeer.compare(kind, base, vu, cold=temp == "cold", pristine=pristine)
                ours = out["vhdcore"]
                what = ("random 4 KiB writes" if kind == "random4k"
                        else "whole 2 MiB blocks, half over parent blocks")
                if temp == "cold":
                    what += ("; page cache dropped" if cpeer.can_drop_caches()
                             else "; the two files' pages evicted (not root)")
                note = (f"{vsize // MiB} MiB disk, {data // MiB} MiB in the child ({what}); "
                        f"one run each on fresh sparse copies, final fsync counted; vhdcore "
                        f"{ours.seconds:.2f} s, read {ours.read_bytes / MiB:.0f} MiB, wrote "
                        f"{ours.written_bytes / MiB:.0f} MiB")
                peer = out.get("vhd-util")
                if peer is not None:
                    note += (f"; vhd-util {peer.seconds:.2f} s, read {peer.read_bytes / MiB:.0f}"
                             f" MiB, wrote {peer.written_bytes / MiB:.0f} MiB")
                else:
                    note += "; set VHDCORE_BENCH_VHD_UTIL=/path/to/vhd-util for the ratio"
                self.add(name, title, "coalesce", data, ours.seconds, reps=1,
                         ratio=out.get("ratio"), ratio_to="vhd-util" if peer else "",
                         note=note)
            shutil.rmtree(base / f"pristine-{kind}", ignore_errors=True)

    # ------------------------------------------------------------ lz4/upload/imaging
    def measure_imaging(self, wl: dict[str, Workload]) -> None:
        from .imaging import create_image
        from .store import DirectoryStore, image_metadata, upload_frames

        self.say("measuring lz4, directory upload, the stages and the imaging pipeline ...")
        w = wl["realistic"]
        cpu: dict[str, float] = {}

        def timed(key: str, fn: Callable[..., object], **kw: Any) -> float:
            got: list[float] = []
            t = _median_op(fn, self.reps, cpu=got, **kw)
            cpu[key] = got[0]
            return t

        with Chain.open(w.leaf) as chain:
            layout = DynamicLayout(chain.virtual_size, chain.block_size)

            def scan() -> int:
                n = 0
                for blk in iter_image_blocks(chain, threads=THREADS):
                    fp = xxhash.xxh3_64(blk.bitmap)
                    fp.update(blk.data)
                    n += 1
                return n

            nstored = scan()
            t_scan = timed("scan", scan)
            raws = [b"".join((blk.bitmap[: layout.bitmap_size], blk.data))
                    for blk in iter_image_blocks(chain, threads=THREADS)]
        stream = sum(map(len, raws))
        assert len(raws) == nstored
        self.add("imaging.stage_scan", "stage alone: merge + zero scan + xxh3", "imaging",
                 stream, t_scan, ratio=stream / t_scan / GB / self.memcpy, ratio_to="memcpy",
                 note=f"iter_image_blocks, {THREADS} threads; bytes = image stream "
                      f"({nstored} stored blocks)")
        t1 = timed("lz4-1", lambda: [compress_frame(r) for r in raws])
        self.add("lz4.1thread", "lz4 compress_frame, 1 thread", "lz4", stream, t1,
                 ratio=stream / t1 / GB / self.memcpy, ratio_to="memcpy",
                 note="realistic merged blocks (OS-disk-like pages)")
        fc = FrameCompressor(threads=THREADS)
        try:
            t2 = timed("lz4", lambda: sum(len(f) for f in fc.compress(raws)))
            frames = list(fc.compress(raws))
        finally:
            fc.close()
        compressed = sum(map(len, frames))
        self.add("lz4.2threads", f"lz4 compress_frame, {THREADS} threads (stage alone)", "lz4",
                 stream, t2, ratio=t1 / t2, ratio_to="1 thread",
                 note=f"compression ratio {stream / compressed:.2f}")
        # upload of the compressed stream to a directory (no fsync)
        up_dir = self.work / "upload"
        up_dir.mkdir(exist_ok=True)
        meta = image_metadata(sha256="0" * 64, stream_size=stream, virtual_size=w.virtual_size)
        store = DirectoryStore(up_dir, "image", durable=False)

        def upload() -> None:
            upload_frames(store, frames, segment_size=SEGMENT, metadata=meta, concurrency=4)

        def fresh() -> tuple[Any, ...]:
            store.delete()  # or every segment would be skipped as already stored
            return ()

        t_up = timed("upload", upload, setup=fresh, cleanup=store.delete)
        self.add("upload.directory", "segmented upload to a directory", "upload", compressed,
                 t_up, ratio=compressed / t_up / GB / self.memcpy, ratio_to="memcpy",
                 note=f"bytes = compressed; {SEGMENT // MiB} MiB segments, 4 uploads at once, "
                      "MD5 per segment, no fsync")
        self.add("imaging.stage_upload", "stage alone: directory upload", "imaging", stream,
                 t_up, ratio=stream / t_up / GB / self.memcpy, ratio_to="memcpy",
                 note="the upload above counted in image-stream bytes")
        t_sha = timed("sha256", lambda: [hashlib.sha256(r) for r in raws])
        self.add("imaging.sha256", "stage alone: SHA-256 of the stream (1 thread)", "imaging",
                 stream, t_sha, ratio=stream / t_sha / GB / self.memcpy, ratio_to="memcpy",
                 note="a stage of its own: the pipeline's hasher thread digests the "
                      "uncompressed stream beside the compressor")
        raws.clear()  # free the copies before the pipeline runs
        frames.clear()
        # the pipeline: its stages run side by side, each on its own threads
        # (merge, lz4, SHA-256 + xxh3 of the stream, upload + MD5)
        stages = {"scan": stream / t_scan, "lz4": stream / t2, "upload": stream / t_up,
                  "sha256": stream / t_sha}
        slowest = min(stages, key=lambda k: stages[k])
        counter = {"i": 0}
        res_holder: list[Any] = []

        def setup() -> tuple[Any, ...]:
            counter["i"] += 1
            d = self.work / f"image-{counter['i']}"
            d.mkdir()
            return (f"file://{d}/image",)

        def run(url: str) -> None:
            res_holder.append(create_image(w.leaf, url, threads=THREADS, segment_size=SEGMENT,
                                           store_options={"durable": False}, fs_aware=False))

        def cleanup() -> None:
            shutil.rmtree(self.work / f"image-{counter['i']}", ignore_errors=True)

        t_img = timed("pipeline", run, setup=setup, cleanup=cleanup)
        res = res_holder[-1]
        gb = res.stream_size / GB
        ncpu = _usable_cpus()
        # CPU seconds per GB of stream: what the pipeline spent and what its
        # parts cost alone (it merges once; the plan's probe reads a little)
        per_gb = {k: cpu[k] / (stream / GB) for k in ("scan", "lz4", "upload", "sha256")}
        parts = per_gb["scan"] + per_gb["lz4"] + per_gb["upload"] + per_gb["sha256"]
        used = cpu["pipeline"] / gb
        self.add("imaging.pipeline", "imaging to a directory, stored data", "imaging",
                 res.stream_size, t_img, ratio=res.stream_size / t_img / stages[slowest],
                 ratio_to=f"slowest ({slowest})",
                 note=f"create_image to file://, {THREADS} merge + {THREADS} lz4 threads, "
                      f"{SEGMENT // MiB} MiB segments, no fsync; bytes = image stream. It used "
                      f"{used:.2f} CPU-s per GB ({cpu['pipeline'] / t_img / ncpu:.0%} of "
                      f"{ncpu} CPUs); its parts alone cost {parts:.2f} CPU-s per GB (merge "
                      f"{per_gb['scan']:.2f}, lz4 {per_gb['lz4']:.2f}, upload+MD5 "
                      f"{per_gb['upload']:.2f}, SHA-256 {per_gb['sha256']:.2f}), so "
                      f"{ncpu} CPUs cap it at {ncpu / parts:.2f} GB/s")
        self.add("imaging.cpu_bound", "imaging vs what its CPU work allows", "imaging",
                 res.stream_size, t_img, ratio=res.stream_size / t_img / GB / (ncpu / parts),
                 ratio_to=f"{ncpu} CPUs' ceiling",
                 note="ceiling = CPUs / (CPU-seconds per GB of the pipeline's parts measured "
                      "alone)")
        self.add("imaging.virtual", "imaging to a directory, virtual disk", "imaging",
                 res.virtual_size, t_img, ratio=None, ratio_to="",
                 note=f"compressed to {res.compressed_size / MiB:.1f} MiB in {res.segments} "
                      "segments")
        self._imaging_vs_swift_upload(w)

    def _imaging_vs_swift_upload(self, w: Workload) -> None:
        """``image`` to Swift against ``swift upload --use-slo`` (the peer a
        user would pick) of the same lz4 bytes with the same segment size, in
        the same run; only where a Swift is configured (``ST_AUTH``,
        ``ST_USER``, ``ST_KEY``) and the ``swift`` command is installed."""
        from .imaging import create_image

        swift = shutil.which("swift")
        if swift is None or not all(os.environ.get(k) for k in ("ST_AUTH", "ST_USER", "ST_KEY")):
            self.say("no Swift configured (ST_AUTH/ST_USER/ST_KEY) or no swift command: "
                     "imaging vs swift upload skipped")
            return
        self.say("measuring image to Swift vs swift upload --use-slo ...")
        container = f"vhdcore-bench-{os.getpid()}-{int(time.time())}"
        d = self.work / "swift-stream"
        d.mkdir(exist_ok=True)
        # the same lz4 bytes: the compressed stream of this chain's image
        res = create_image(w.leaf, f"file://{d}/image", threads=THREADS, segment_size=SEGMENT,
                           store_options={"durable": False}, fs_aware=False)
        stream_file = d / "stream.lz4"
        with open(stream_file, "wb") as out:
            for seg in sorted(d.glob("image.segments/**/*.lz4")):
                out.write(seg.read_bytes())
        nbytes = stream_file.stat().st_size
        counter = {"i": 0}

        def name() -> tuple[Any, ...]:
            counter["i"] += 1
            return (f"obj-{counter['i']}",)

        def peer(obj: str) -> None:
            subprocess.run([swift, "upload", "--use-slo", "-S", str(SEGMENT), "--object-name",
                            obj, container, str(stream_file)], check=True,
                           capture_output=True)

        def ours(obj: str) -> None:
            subprocess.run([sys.executable, "-m", "vhdcore", "image", str(w.leaf), "--to",
                            f"swift://{container}/{obj}", "--segment-size", str(SEGMENT),
                            "--threads", str(THREADS), "--no-fs-aware", "--state-dir", str(d),
                            "-q"], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

        # both are commands started afresh (interpreter start-up counted on
        # both sides), interleaved so that they share the machine's moods
        peer_s: list[float] = []
        ours_s: list[float] = []
        try:
            for i in range(self.reps + 1):
                for fn, into in ((peer, peer_s), (ours, ours_s)):
                    obj = name()[0]
                    t = time.perf_counter()
                    fn(obj)
                    if i:  # the first round warms up
                        into.append(time.perf_counter() - t)
        finally:
            subprocess.run([swift, "delete", container], capture_output=True, check=False)
            subprocess.run([swift, "delete", f"{container}_segments"], capture_output=True,
                           check=False)
        t_peer, t_ours = statistics.median(peer_s), statistics.median(ours_s)
        ratio = t_peer / t_ours
        r = self.add("imaging.vs_swift_upload", "image to Swift vs swift upload --use-slo",
                     "imaging", res.stream_size, t_ours, ratio=ratio,
                     ratio_to="swift upload",
                     note=f"create_image (merge + lz4 + upload) vs `swift upload --use-slo -S "
                          f"{SEGMENT // MiB}M` of the same {nbytes / MiB:.1f} MiB of lz4 bytes "
                          f"({t_peer:.2f} s vs {t_ours:.2f} s, both as commands, page cache "
                          "warm); bytes = image stream")
        r.target, r.passed = ">= 0.85x swift upload", ratio >= 0.85

    # ------------------------------------------------------------ repository
    def measure_repo(self, wl: dict[str, Workload]) -> None:
        from .repo.bench import measure_repo

        measure_repo(self.add, self.work, Path(wl["realistic"].leaf), self.reps, self.say)

    def measure_repo_memory(self) -> None:
        from .repo.bench import repo_memory

        vsize = REPO_MEMORY_SIZE
        self.say(f"measuring peak memory of image --repo + restore of a {vsize >> 30} GiB "
                 "sparse disk ...")
        rec = repo_memory(self.work, vsize)
        self.add("memory.repo", f"peak RSS, image --repo + restore, {vsize >> 30} GiB", "memory",
                 vsize, rec["image_s"] + rec["restore_s"], ratio=rec["peak_rss"] / (256 * MiB),
                 ratio_to="256 MiB", peak_bytes=rec["peak_rss"], reps=1,
                 note=f"anonymous memory peaked at {rec['peak_anon'] / MiB:.0f} MiB (sampled); "
                      f"image {rec['image_s']:.1f} s, restore {rec['restore_s']:.1f} s")

    # ------------------------------------------------------------ memory
    def measure_memory(self) -> None:
        vsize = self.memory_size
        self.say(f"measuring peak memory of flatten and imaging on a {vsize / GiB:.0f} GiB "
                 "sparse chain ...")
        w = make_chain(self.work / "memory", "sparse", size=vsize, layers=3, seed=5)
        self._settle(w.paths)
        out = self.work / "memory-out"
        out.mkdir(exist_ok=True)
        for what, limit in (("flatten", 256), ("imaging", 256)):
            dest = str(out / "flat.vhd") if what == "flatten" else f"file://{out}/image"
            rec = measure_peak_memory(what, w.leaf, dest)
            peak = rec["peak_rss"]
            note = (f"peak resident set (VmHWM) of a child process; after imports "
                    f"{rec['baseline_rss'] / MiB:.0f} MiB; own allocations peaked at about "
                    f"{rec['peak_anon'] / MiB:.0f} MiB (RssAnon, sampled), the rest is pages "
                    f"of the mapped VHD files (clean page cache, {rec['peak_file'] / MiB:.0f} "
                    "MiB at the sampled peak)")
            self.add(f"memory.{what}", f"peak RSS, {what} of {vsize / GiB:.0f} GiB sparse",
                     "memory", vsize, rec["seconds"], ratio=peak / (limit * MiB),
                     ratio_to=f"{limit} MiB", note=note, peak_bytes=peak, reps=1)
            self.add(f"memory.{what}_anon", f"peak anonymous memory, {what}", "memory", vsize,
                     rec["seconds"], ratio=rec["peak_anon"] / (limit * MiB),
                     ratio_to=f"{limit} MiB", peak_bytes=rec["peak_anon"], reps=1,
                     note="sampled every 5 ms: what the process allocated itself")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
        self._memory_swift(w, vsize)
        shutil.rmtree(self.work / "memory", ignore_errors=True)

    def _memory_swift(self, w: Workload, vsize: int) -> None:
        """Peak RSS of ``image`` to Swift (default options), where a Swift
        is configured (``ST_AUTH``, ``ST_USER``, ``ST_KEY``)."""
        if not all(os.environ.get(k) for k in ("ST_AUTH", "ST_USER", "ST_KEY")):
            return
        container = f"vhdcore-bench-mem-{os.getpid()}-{int(time.time())}"
        try:
            rec = measure_peak_memory("imaging", w.leaf, f"swift://{container}/image")
        finally:
            swift = shutil.which("swift")
            if swift is not None:
                for c in (container, f"{container}_segments"):
                    subprocess.run([swift, "delete", c], capture_output=True, check=False)
        peak = rec["peak_rss"]
        r = self.add("memory.imaging_swift", f"peak RSS, imaging of {vsize / GiB:.0f} GiB sparse "
                     "to Swift", "memory", vsize, rec["seconds"], ratio=peak / (256 * MiB),
                     ratio_to="256 MiB", peak_bytes=peak, reps=1,
                     note=f"default options (segment size, 4 uploads at once); own allocations "
                          f"peaked at about {rec['peak_anon'] / MiB:.0f} MiB (RssAnon, sampled)")
        r.target, r.passed = "< 256 MiB", peak < 256 * MiB


_CHILD = r"""
import json, os, resource, sys, threading, time

def status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out

from vhdcore.coalesce import flatten
from vhdcore.imaging import create_image
base = status().get("VmRSS", 0)
peak = {"anon": 0, "file": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        s = status()
        if s.get("RssAnon", 0) > peak["anon"]:
            peak["anon"] = s["RssAnon"]
        peak["file"] = max(peak["file"], s.get("RssFile", 0))
        stop.wait(0.005)
th = threading.Thread(target=sample, daemon=True)
th.start()
what, leaf, dest = sys.argv[1:4]
t = time.perf_counter()
if what == "flatten":
    flatten(leaf, dest, "vhd", durable=False, fs_aware=False, overwrite=True)
else:
    opts = {"store_options": {"durable": False}} if dest.startswith("file:") else {}
    create_image(leaf, dest, fs_aware=False, replace=True, **opts)
seconds = time.perf_counter() - t
stop.set()
th.join()
s = status()
hwm = s.get("VmHWM")
if hwm is None:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm *= 1 if sys.platform == "darwin" else 1024
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "baseline_rss": base,
                  "peak_anon": peak["anon"], "peak_file": peak["file"]}))
"""


def measure_peak_memory(what: str, leaf: str | os.PathLike[str], dest: str) -> dict[str, Any]:
    """Run ``flatten`` (to the path ``dest``, sparse VHD) or ``imaging`` (to
    the URL ``dest``; a ``file://`` target without fsync) of ``leaf`` in a child process and return its
    figures: ``seconds``, ``peak_rss`` (VmHWM, or ``ru_maxrss`` where there is
    no /proc), ``baseline_rss`` (after imports), ``peak_anon`` and
    ``peak_file`` (RssAnon and RssFile sampled every 5 ms; 0 without /proc),
    all in bytes."""
    if what not in ("flatten", "imaging"):
        raise ValueError(f"what must be 'flatten' or 'imaging', not {what!r}")
    proc = subprocess.run([sys.executable, "-c", _CHILD, what, os.fspath(leaf), dest],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory check of {what} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _fs_type(path: Path) -> str:
    """File system type of the directory (from /proc/self/mounts), or "?"."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return "?"
    real = os.path.realpath(path)
    best, kind = "", "?"
    for mnt, fstype in mounts:
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, fstype
    return kind


def machine_info() -> dict[str, Any]:
    """The facts a figure depends on (no paths)."""
    import lz4

    usable = _usable_cpus()
    qemu = shutil.which("qemu-img")
    qver = None
    if qemu:
        try:
            qver = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                                  check=False).stdout.splitlines()[0]
        except (OSError, IndexError):
            qver = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "lz4": getattr(lz4, "__version__", "?"),
        "xxhash": xxhash.VERSION,
        "vhdcore": __version__,
        "backend": kernels.backend,
        "qemu_img": qver,
        "load_average": _load_average(),
    }


def _cpu_busy(seconds: float = 0.5) -> float | None:
    """Share of the machine's CPU time (0..1) that was not idle during
    ``seconds`` (this process sleeps meanwhile): other work on the machine."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    a = sample()
    if a is None:
        return None
    time.sleep(seconds)
    b = sample()
    if b is None or b[1] <= a[1]:
        return None
    return round(1.0 - (b[0] - a[0]) / (b[1] - a[1]), 3)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_bench(*, size: int | None = None, quick: bool = False, reps: int | None = None,
              memory_size: int | None = None, memory: bool = True,
              workdir: str | os.PathLike[str] | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every measurement once and return the report (JSON-ready): the
    machine facts, the settings, the list of results and a PASS/MISS summary.

    ``size``: virtual size of the workloads (default 256 MiB, 96 MiB with
    ``quick``); ``reps``: repetitions per figure (median; 7, quick 5);
    ``memory_size``: virtual size of the sparse chain of the memory check
    (at least 8 GiB unless set; ``memory=False`` skips the check).
    """
    say = say or (lambda msg: None)
    size = int(size or (QUICK_SIZE if quick else DEFAULT_SIZE))
    size = max(BLOCK, -(-size // BLOCK) * BLOCK)
    reps = int(reps or (QUICK_REPS if quick else DEFAULT_REPS))
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    memory_size = int(memory_size or MEMORY_SIZE)
    t0 = time.perf_counter()
    busy_before = _cpu_busy()
    work = Path(tempfile.mkdtemp(prefix="vhdcore-bench-", dir=workdir))
    fs = _fs_type(work)
    try:
        b = _Bench(work, size, reps, memory_size, say)
        wl = b.workloads()
        b.measure_memcpy()
        b.measure_kernels()
        b.measure_twin_operations(wl)
        b.measure_flatten(wl)
        b.measure_coalesce(wl)
        b.measure_imaging(wl)
        b.measure_repo(wl)
        if memory:
            b.measure_memory()
            b.measure_repo_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = b.results
    order = ["machine", "kernel", "twin", "read", "flatten", "coalesce", "lz4", "upload",
             "imaging", "repo", "memory"]
    results.sort(key=lambda r: order.index(r.group) if r.group in order else len(order))
    checked = [r for r in results if r.passed is not None]
    machine = machine_info()
    machine["cpu_busy_before"] = busy_before
    return {
        "tool": f"vhdcore {__version__} bench",
        "machine": machine,
        "settings": {"size": size, "reps": reps, "quick": quick, "threads": THREADS,
                     "segment_size": SEGMENT, "memory_size": memory_size if memory else None,
                     "workdir_fs": fs, "memcpy_gbps": round(b.memcpy, 3),
                     "fsync_generated_seconds": round(b.settle_seconds, 2)},
        "results": [r.to_json() for r in results],
        "summary": {"pass": sum(1 for r in checked if r.passed),
                    "miss": sum(1 for r in checked if not r.passed),
                    "unchecked": [r.name for r in results if r.target and r.passed is None],
                    "seconds": round(time.perf_counter() - t0, 1)},
    }


# --------------------------------------------------------------------------
def _fmt_ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    v = r["ratio"]
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def format_report(report: dict[str, Any], *, notes: bool = True) -> str:
    """The report as a text table (what ``vhdcore bench`` prints)."""
    m, s = report["machine"], report["settings"]
    lines = [
        (f"vhdcore bench ({m['date']}): {m['cpus_usable']} of {m['cpu_count']} CPUs "
         f"({m['cpu_model']}), Python {m['python']}, numpy {m['numpy']}, kernel "
         f"{m['backend']}; workload {s['size'] // MiB} MiB, median of {s['reps']}"),
        (f"memory copy bandwidth (the reference): {s['memcpy_gbps']:.2f} GB/s; files on "
         f"{s['workdir_fs']}, in the page cache, no fsync; GB/s = 10^9 bytes/s"),
    ]
    busy = m.get("cpu_busy_before")
    if busy is not None and busy > 0.2:
        lines.append(f"warning: other processes kept {busy:.0%} of the CPUs busy just before "
                     "the run; they share the CPUs with it and the figures are low")
    lines.append("")
    head = f"{'result':<26} {'measurement':<46} {'GB/s':>7} {'ratio':>7}  {'of':<16} " \
           f"{'target':<21} {'':<4}"
    lines.append(head)
    lines.append("-" * len(head))
    footnotes: list[str] = []
    for r in report["results"]:
        if r.get("peak_bytes") is not None:
            value = f"{r['peak_bytes'] / MiB:.0f}MiB"
        else:
            value = f"{r['gbps']:.3f}" if r["gbps"] < 10 else f"{r['gbps']:.2f}"
        lines.append(f"{r['name']:<26} {r['title'][:46]:<46} {value:>7} {_fmt_ratio(r):>7}  "
                     f"{r['ratio_to'][:16]:<16} {r['target']:<21} {r['verdict']}".rstrip())
        if notes and r["note"] and (r["verdict"] in ("MISS", "n/a") or r["name"] in _SHOW_NOTES):
            footnotes.append(f"  {r['name']}: {r['note']}")
    sm = report["summary"]
    lines.append("-" * len(head))
    tail = f"{sm['pass']} PASS, {sm['miss']} MISS"
    if sm["unchecked"]:
        tail += f", unchecked: {', '.join(sm['unchecked'])}"
    lines.append(f"{tail}; ran {sm['seconds']:.0f} s")
    if footnotes:
        lines += ["", "notes:", *footnotes]
    return "\n".join(lines)


_SHOW_NOTES = {"peer.qemu_img", "twin.merge_scattered", "coalesce.scattered_holes",
               "imaging.pipeline", "imaging.virtual", "lz4.2threads", "memory.flatten",
               "memory.imaging", "repo.first_image", "repo.incremental_growth",
               "repo.clone_growth", "repo.restore", "memory.repo"}
