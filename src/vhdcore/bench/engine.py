"""The engine against its peers: chain read, flatten and ``cat -o`` against
``qemu-img convert`` (warm and cold, fsync counted on both sides), coalesce
in place, and coalesce against blktap's ``vhd-util`` (:mod:`.coalesce_peer`)."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._workloads import Workload
from ..chain import Chain
from ..ops.coalesce import coalesce
from ..ops.flatten import flatten
from ..vhd.format import SECTOR
from . import coalesce_peer as cpeer
from .context import BLOCK, DEFAULT_SIZE, THREADS, BenchRun
from .machine import can_drop_caches, drop_caches, evict, fsync_paths
from .report import GB, GiB, MiB
from .timing import alternate, median_op

__all__ = ["measure_coalesce", "measure_coalesce_peer", "measure_flatten", "time_coalesce"]

_TITLES = {"flatten.vhd": "flatten to vhd", "flatten.raw": "flatten to raw",
           "cat.raw": "cat -o (raw)"}
_PEER_OF = {"flatten.vhd": "vpc", "flatten.raw": "raw", "cat.raw": "raw"}
_SYNC_NOTE = "fsync of the output included on both sides"


def _measure_read(b: BenchRun, w: Workload) -> None:
    def read_all() -> None:
        with Chain.open(w.leaf) as chain:
            for _ in chain.iter_raw(8 * MiB):
                pass

    t = median_op(read_all, b.reps)
    b.add("read.chain", "chain read (Chain.iter_raw), realistic", "read", w.virtual_size, t,
          ratio=w.virtual_size / t / GB / b.memcpy, ratio_to="memcpy",
          note="bytes = virtual disk; three layers merged per block")


def _ours(flat_vhd: Path) -> dict[str, Callable[[Path], object]]:
    """vhdcore's sides: fsync, rename and directory fsync inside the timing."""
    def cat_raw(out: Path) -> object:
        with Chain.open(flat_vhd) as chain:
            return chain.copy_to_raw(out, threads=THREADS)

    return {
        "flatten.vhd": lambda out: flatten(flat_vhd, out, "vhd", threads=THREADS,
                                           fs_aware=False, overwrite=True),
        "flatten.raw": lambda out: flatten(flat_vhd, out, "raw", threads=THREADS,
                                           fs_aware=False, overwrite=True),
        "cat.raw": cat_raw,
    }


def _qemu_ops(flat_vhd: Path, out_dir: Path) -> tuple[dict[str, Callable[[Path], object]], str]:
    """``qemu-img convert`` to vpc and raw (its output fsynced inside the
    timing), or none and the reason."""
    qemu = shutil.which("qemu-img")
    if not qemu:
        return {}, "qemu-img is not installed"
    exe: str = qemu

    def converter(fmt: str) -> Callable[[Path], object]:
        def convert(out: Path) -> object:
            subprocess.run([exe, "convert", "-f", "vpc", "-O", fmt, str(flat_vhd), str(out)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            fsync_paths([out])  # its output made durable too, inside the timing
            return None
        return convert

    ops: dict[str, Callable[[Path], object]] = {}
    try:
        for fmt in ("vpc", "raw"):
            converter(fmt)(out_dir / "probe")
            (out_dir / "probe").unlink()
            ops[f"qemu.{fmt}"] = converter(fmt)
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return {}, f"qemu-img convert failed ({err.decode(errors='replace')[:120]})"
    return ops, ""


def _run_interleaved(b: BenchRun, ops: dict[str, Callable[[Path], object]], out_dir: Path,
                     flat_vhd: Path, mode: str) -> dict[str, float]:
    """Median seconds of each op in ``mode`` (warm: after a warm-up round;
    cold: before each run the page cache dropped or, where it may not be,
    the input's own pages evicted).  The ops run in turn; each output is
    removed (and the removal written back) after its run."""
    drop = can_drop_caches()

    def before(key: str) -> None:
        if mode == "cold":
            if drop:
                drop_caches()
            else:
                evict([flat_vhd])

    def after(key: str) -> None:
        (out_dir / f"out.{key}").unlink()
        os.sync()

    def side(key: str, op: Callable[[Path], object]) -> Callable[[], object]:
        return lambda: op(out_dir / f"out.{key}")

    sides = {k: side(k, op) for k, op in ops.items()}
    reps = b.reps if mode == "warm" else max(1, min(b.reps, 3))
    return alternate(sides, reps, warmup=mode == "warm", setup=before, cleanup=after)


def measure_flatten(b: BenchRun, wl: dict[str, Workload]) -> None:
    """Chain read, then flatten (VHD, raw) and ``cat -o`` against ``qemu-img
    convert`` of the same input, warm and cold, interleaved."""
    b.say("measuring chain read, flatten and qemu-img convert ...")
    w = wl["realistic"]
    vsize = w.virtual_size
    _measure_read(b, w)
    out_dir = b.work / "flat"
    out_dir.mkdir(exist_ok=True)
    # the same input for both sides: the chain flattened into one dynamic
    # VHD (qemu-img does not follow VHD differencing chains)
    flat_vhd = out_dir / "peer-input.vhd"
    flatten(w.leaf, flat_vhd, "vhd", durable=False, fs_aware=False, overwrite=True)
    b.settle([flat_vhd])
    ours = _ours(flat_vhd)
    qemu_ops, qemu_note = _qemu_ops(flat_vhd, out_dir)
    ops = {**ours, **qemu_ops}
    cache_of = {"warm": "input in the page cache",
                "cold": ("page cache dropped before each run" if can_drop_caches()
                         else "the input's pages evicted before each run (page cache not "
                              "dropped: not root, or VHDCORE_BENCH_NO_DROP_CACHES)")}
    for mode in ("warm", "cold"):
        med = _run_interleaved(b, ops, out_dir, flat_vhd, mode)
        sfx = "" if mode == "warm" else "_cold"
        cache = cache_of[mode]
        for fmt in ("vpc", "raw") if qemu_ops else ():
            name = "peer.qemu_img" + ("" if fmt == "raw" else "_vpc") + sfx
            b.add(name, f"qemu-img convert -O {fmt}, {mode}", "flatten", vsize,
                  med[f"qemu.{fmt}"], ratio=1.0, ratio_to="itself",
                  note=f"input: the chain flattened to one dynamic VHD; {cache}; "
                       f"{_SYNC_NOTE}; includes its process start")
        for key in ours:
            tt = med[key]
            t_q = med.get(f"qemu.{_PEER_OF[key]}")
            note = f"bytes = virtual disk; {cache}; {_SYNC_NOTE}"
            if not qemu_ops:
                note += f"; {qemu_note}: the peer target is unchecked"
            b.add(key + sfx, f"{_TITLES[key]}, {mode}", "flatten", vsize, tt,
                  ratio=t_q / tt if t_q else None,
                  ratio_to=f"qemu-img -O {_PEER_OF[key]}" if qemu_ops else "", note=note)


def time_coalesce(b: BenchRun, w: Workload, merged: list[int], tag: str) -> float:
    """Median seconds of coalescing ``w`` in place, on fresh sparse copies
    for each repetition (``durable=False``); ``merged`` receives the merged
    bytes of each run."""
    counter = {"i": 0}

    def setup() -> tuple[Any, ...]:
        counter["i"] += 1
        d = b.work / f"coalesce-{tag}-{counter['i']}"
        d.mkdir()
        # sparse copies, written back before the timing: shutil.copyfile
        # fills the holes with zeros, and the gigabytes of dirty pages
        # left behind slowed each later repetition down (issue 15)
        for p in w.paths:
            cpeer.sparse_copy(p, d / p.name)
        return (d / w.leaf.name,)

    def run(leaf: Path) -> None:
        res = coalesce(leaf, durable=False, skip_space_check=True)
        merged.append(res.sectors_written * SECTOR)

    def cleanup() -> None:
        shutil.rmtree(b.work / f"coalesce-{tag}-{counter['i']}", ignore_errors=True)

    return median_op(run, b.reps, setup=setup, cleanup=cleanup)


def measure_coalesce(b: BenchRun, wl: dict[str, Workload]) -> None:
    b.say("measuring coalesce in place ...")
    for kind in ("full", "scattered"):
        merged: list[int] = []
        t = time_coalesce(b, wl[kind], merged, kind)
        nbytes = merged[-1]
        what = "full blocks" if kind == "full" else "4 KiB every 64 KiB"
        b.add(f"coalesce.{kind}", f"coalesce in place, {what}", "coalesce", nbytes, t,
              ratio=nbytes / t / GB / b.memcpy, ratio_to="memcpy",
              note="bytes = merged data (sectors written x 512); fresh copies each "
                   "repetition, durable=False")
    merged = []
    t_h = time_coalesce(b, wl["scattered-holes"], merged, "holes")
    b.add("coalesce.scattered_holes", "coalesce, 4 KiB/64 KiB, parent with holes", "coalesce",
          merged[-1], t_h, ratio=merged[-1] / t_h / GB / b.memcpy, ratio_to="memcpy",
          note="40% of the child's blocks are new to the parent: placed in "
               "fresh space (a hole), only their 128 KiB of data and the bitmap "
               "written")
    t_twin, n_twin = b.twin_coalesce
    t_sc = next(r.seconds for r in b.results if r.name == "coalesce.scattered")
    b.add("twin.coalesce_scattered", "vs twin: coalesce, 4 KiB every 64 KiB",
          "twin", n_twin, t_twin, ratio=t_twin / t_sc,
          ratio_to="twin", note="whole operation, including the pwrite of every "
                                "4 KiB run (the same for both)")
    measure_coalesce_peer(b)


def measure_coalesce_peer(b: BenchRun) -> None:
    """Coalesce side by side with blktap's ``vhd-util coalesce`` (when
    ``VHDCORE_BENCH_VHD_UTIL`` names it) on the same files, cold and warm,
    the final sync counted on both sides (see :mod:`.coalesce_peer`).
    Without vhd-util, vhdcore's own figures are reported."""
    vu = cpeer.vhd_util_path()
    # 4 GiB and 256 MiB of child data at the default size; smaller runs
    # (--quick, --size) scale down, to 1 GiB at most
    vsize = 4 * GiB if b.size >= DEFAULT_SIZE else min(1 * GiB, 16 * b.size)
    vsize = max(64 * MiB, vsize // BLOCK * BLOCK)
    data = vsize // 16
    which = f"vhd-util at {vu}" if vu else "no vhd-util: set VHDCORE_BENCH_VHD_UTIL"
    b.say(f"measuring coalesce vs vhd-util ({which}) ...")
    base = b.work / "coalesce-peer"
    for kind in cpeer.PEER_KINDS:
        pristine = cpeer.make_peer_pair(base / f"pristine-{kind}", kind, size=vsize, data=data)
        b.settle(pristine)
        for temp in ("cold", "warm"):
            out = cpeer.compare(kind, base, vu, cold=temp == "cold", pristine=pristine)
            _add_peer_result(b, kind, temp, out, vsize, data)
        if kind == "random4k":
            # the sparse child read whole, holes and all (information): the
            # ratio is against the vhd-util warm run above, which the page
            # cache does not change (it writes with O_DIRECT)
            whole = cpeer.compare(kind, base, None, cold=False, pristine=pristine,
                                  warm_whole=True)
            if "vhd-util" in out:
                whole["vhd-util"] = peer = out["vhd-util"]
                whole["ratio"] = peer.seconds / whole["vhdcore"].seconds
            _add_peer_result(b, kind, "warm_whole", whole, vsize, data)
        shutil.rmtree(base / f"pristine-{kind}", ignore_errors=True)


def _add_peer_result(b: BenchRun, kind: str, temp: str, out: dict[str, Any], vsize: int,
                     data: int) -> None:
    ours = out["vhdcore"]
    what = ("random 4 KiB writes" if kind == "random4k"
            else "whole 2 MiB blocks, half over parent blocks")
    if temp == "cold":
        what += ("; page cache dropped" if can_drop_caches()
                 else "; the two files' pages evicted (not root, or "
                      "VHDCORE_BENCH_NO_DROP_CACHES)")
    elif temp == "warm":
        what += "; the files' data extents read first"
    else:
        what += ("; the files read whole first, the child's holes as zeroed pages "
                 "(information: the vhd-util time is the warm run's)")
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
    title = (f"coalesce vs vhd-util, {temp.replace('_', ' ')}, "
             f"{'random 4 KiB' if kind == 'random4k' else 'whole blocks'}")
    b.add(f"coalesce.vs_vhd_util.{kind}.{temp}", title, "coalesce", data, ours.seconds, reps=1,
          ratio=out.get("ratio"), ratio_to="vhd-util" if peer else "", note=note)
