"""Coalesce side by side with blktap's ``vhd-util coalesce`` (benchmarks).

Used by ``python -m vhdcore bench`` (:func:`vhdcore.bench.engine.measure_coalesce_peer`)
and by ``benchmarks/test_bench_coalesce_peer.py``.  blktap is not packaged by
Debian; build ``vhd-util`` from its public source and name it with
``VHDCORE_BENCH_VHD_UTIL=/path/to/vhd-util``.

Two chains of a 4 GiB dynamic parent (a quarter of its blocks hold data) and
one differencing child, written once and copied (sparsely) before each run:

* ``random4k``: the child holds 256 MiB of random 4 KiB writes spread over
  the whole disk (almost every block, most of them new to the parent);
* ``blocks``: the child holds 256 MiB of whole 2 MiB blocks, half of them
  over blocks the parent has.

Each side runs on its own fresh copy of the same files; its time includes the
final ``fsync`` of the parent.  Cold: the page cache is dropped (as root,
``/proc/sys/vm/drop_caches``; otherwise, or with
``VHDCORE_BENCH_NO_DROP_CACHES=1``, only the two files' pages are evicted,
``posix_fadvise(DONTNEED)``) after the copy, before each side; warm: the
files' data extents (``SEEK_DATA``/``SEEK_HOLE``) are read into the page
cache first, as a writer leaves them cached.  Reading a sparse file whole
would also cache a zeroed page for every page of its holes, and on a
virtual machine that hands freed memory back to its host that made the
coalesce's own page-cache writes pay a host fault each (``docs/benchmarks.md``
has the measurements); ``warm_whole=True`` still measures it.  vhd-util
writes with ``O_DIRECT`` and is not affected either way.  The bytes each
side read from and wrote to the storage come from its resource usage
(``ru_inblock``, ``ru_oublock``; 512-byte units).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.coalesce import coalesce
from ..ops.coalesce_block import _new_block_stride, _reserve_fresh
from ..ops.relink import relink
from ..vhd.create import create_differencing, create_dynamic
from ..vhd.file import VhdFile
from ..vhd.format import SECTOR
from .machine import can_drop_caches, drop_caches, evict, fsync_paths
from .report import PEER_TARGETS

__all__ = ["PEER_KINDS", "PEER_TARGETS", "PeerRun", "compare", "sparse_copy", "make_peer_pair", "run_side", "vhd_util_path",
           "can_drop_caches", "warm"]

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 2 * MiB
PAGE = 4096

#: the two workloads, by name: description
PEER_KINDS = {
    "random4k": "256 MiB of random 4 KiB writes over a 4 GiB disk",
    "blocks": "256 MiB of whole 2 MiB blocks, half over parent blocks",
}


def vhd_util_path() -> str | None:
    """The ``vhd-util`` named by ``VHDCORE_BENCH_VHD_UTIL``, when it runs."""
    p = os.environ.get("VHDCORE_BENCH_VHD_UTIL")
    if not p:
        return None
    p = shutil.which(p) or p
    return p if os.access(p, os.X_OK) else None


def _write_sparse_block(v: VhdFile, blk: int, sectors: np.ndarray, rng: np.random.Generator,
                        offset: int) -> None:
    """Write ``blk`` of ``v`` at ``offset`` (reserved) holding random data in
    the given sector runs only."""
    spb = v.sectors_per_block
    bits = np.zeros(spb, dtype=bool)
    bits[sectors] = True
    bitmap = np.packbits(bits).tobytes().ljust(v.bitmap_size, b"\0")
    data = bytearray(v.block_size)
    idx = np.nonzero(bits)[0]
    raw = rng.integers(0, 256, idx.size * SECTOR, dtype=np.uint8).reshape(idx.size, SECTOR)
    arr = np.frombuffer(data, dtype=np.uint8).reshape(spb, SECTOR)
    arr[idx] = raw
    # runs of consecutive set sectors
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
    runs = np.empty(edges.size, dtype=np.uint32)
    runs[0::2] = edges[0::2]
    runs[1::2] = edges[1::2] - edges[0::2]
    v.write_block_runs(blk, bitmap, data, runs, edges.size // 2, offset)


def _fill(v: VhdFile, layout: dict[int, np.ndarray], rng: np.random.Generator) -> None:
    # page-aligned blocks, as a coalesce places new ones
    stride = _new_block_stride(v)
    blocks = sorted(layout)
    base = _reserve_fresh(v, len(blocks))
    for k, blk in enumerate(blocks):
        _write_sparse_block(v, blk, layout[blk], rng, base + k * stride)
    v.flush(durable=True)


def make_peer_pair(directory: str | os.PathLike[str], kind: str, *, size: int = 4 * GiB,
                   data: int = 256 * MiB, parent_share: float = 0.25,
                   seed: int = 1) -> tuple[Path, Path]:
    """Write ``parent.vhd`` and ``child.vhd`` into ``directory`` (see the
    module's description); returns their paths."""
    if kind not in PEER_KINDS:
        raise ValueError(f"unknown peer workload {kind!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nblocks = size // BLOCK
    spb = BLOCK // SECTOR
    whole = np.arange(spb)
    pblocks = np.sort(rng.choice(nblocks, int(nblocks * parent_share), replace=False))
    parent, child = d / "parent.vhd", d / "child.vhd"
    with create_dynamic(parent, size, block_size=BLOCK) as p:
        _fill(p, {int(b): whole for b in pblocks}, rng)
    layout: dict[int, np.ndarray] = {}
    if kind == "random4k":
        pages = np.sort(rng.choice(size // PAGE, data // PAGE, replace=False))
        per = PAGE // SECTOR
        for blk in np.unique(pages // (BLOCK // PAGE)):
            sel = pages[(pages // (BLOCK // PAGE)) == blk] % (BLOCK // PAGE)
            layout[int(blk)] = (sel[:, None] * per + np.arange(per)).ravel()
    else:
        n = data // BLOCK
        have = rng.choice(pblocks, n // 2, replace=False)
        free = np.setdiff1d(np.arange(nblocks), pblocks)
        new = rng.choice(free, n - n // 2, replace=False)
        for blk in np.concatenate((have, new)):
            layout[int(blk)] = whole
    create_differencing(child, parent).close()
    with VhdFile.open(child, writable=True) as c:
        _fill(c, layout, rng)
    return parent, child


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a file keeping its holes (only the data extents are copied)."""
    size = src.stat().st_size
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start, end in _data_extents(fi, size):
            off = start
            while off < end:
                n = os.copy_file_range(fi, fo, end - off, off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range stopped at {off} of {src}")
                off += n
        os.ftruncate(fo, size)
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


@dataclass
class PeerRun:
    side: str
    seconds: float
    read_bytes: int
    written_bytes: int


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) of each data extent of the open file ``fd``."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def warm(paths: list[Path], *, whole: bool = False) -> None:
    """Read the files' data extents into the page cache (``whole``: every
    byte, the holes' zeroed pages included)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if whole:
                extents = [(0, size)]
            else:
                # no readahead: it would cache the hole pages after each extent
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                extents = _data_extents(fd, size)
            for start, end in extents:
                off = start
                while off < end:
                    n = len(os.pread(fd, min(16 * MiB, end - off), off))
                    if n == 0:
                        break
                    off += n
        finally:
            os.close(fd)


def _warm_code(side: str, vhd_util: str | None, work: Path) -> None:
    """After dropping the caches: load the program's own code again (not the
    data), so that a cold run measures the data's I/O, not the reloading of
    the Python libraries or of vhd-util and libvhd."""
    if side == "vhd-util" and vhd_util is not None:
        subprocess.run([vhd_util, "coalesce", "-h"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        return
    tiny = work.parent / f"{work.name}-warm"
    shutil.rmtree(tiny, ignore_errors=True)
    tiny.mkdir()
    create_dynamic(tiny / "p.vhd", 8 * MiB).close()
    create_differencing(tiny / "c.vhd", tiny / "p.vhd").close()
    with VhdFile.open(tiny / "c.vhd", writable=True) as c:
        c.write_sectors(0, bytes(PAGE))
        c.write_sectors(2 * BLOCK // SECTOR, b"\1" * PAGE)
    coalesce(tiny / "c.vhd", skip_space_check=True, durable=False)
    shutil.rmtree(tiny, ignore_errors=True)


def run_side(side: str, pristine: tuple[Path, Path], work: Path, *, cold: bool,
             vhd_util: str | None = None, warm_whole: bool = False) -> PeerRun:
    """Copy the pristine pair into ``work`` and coalesce it with ``side``
    (``"vhdcore"`` or ``"vhd-util"``), final fsync of the parent included.
    Warm (not ``cold``): the files' data is read first, or every byte of
    them with ``warm_whole`` (see the module's description)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    parent, child = work / pristine[0].name, work / pristine[1].name
    for s, dd in zip(pristine, (parent, child)):
        sparse_copy(s, dd)
    # the child's absolute locator names the pristine parent (which
    # vhd-util would follow): point it at the copy
    relink(child, parent)
    os.sync()
    if cold and can_drop_caches():
        drop_caches()
        _warm_code(side, vhd_util, work)
    elif cold:
        # not root: evict the two files' pages only (written back above)
        evict([parent, child])
    else:
        warm([parent, child], whole=warm_whole)
    if side == "vhdcore":
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        coalesce(child, skip_space_check=True, durable=True)
        fsync_paths([parent])
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rb = (r1.ru_inblock - r0.ru_inblock) * SECTOR
        wb = (r1.ru_oublock - r0.ru_oublock) * SECTOR
    elif side == "vhd-util":
        if vhd_util is None:
            raise ValueError("no vhd-util")
        t = time.perf_counter()
        proc = subprocess.Popen([vhd_util, "coalesce", "-n", str(child)], cwd=work,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fsync_paths([parent])
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"vhd-util coalesce failed ({proc.returncode}): "
                               f"{out.decode(errors='replace')[-400:]}")
        rb, wb = ru.ru_inblock * SECTOR, ru.ru_oublock * SECTOR
    else:
        raise ValueError(side)
    return PeerRun(side, dt, rb, wb)


def compare(kind: str, work: Path, vhd_util: str | None, *, cold: bool,
            pristine: tuple[Path, Path] | None = None,
            warm_whole: bool = False) -> dict[str, Any]:
    """One run of each side on the same files: seconds, bytes, the ratio."""
    if pristine is None:
        pristine = make_peer_pair(work / f"pristine-{kind}", kind)
    ours = run_side("vhdcore", pristine, work / "run", cold=cold, warm_whole=warm_whole)
    out: dict[str, Any] = {"vhdcore": ours}
    if vhd_util is not None:
        peer = run_side("vhd-util", pristine, work / "run", cold=cold, vhd_util=vhd_util,
                        warm_whole=warm_whole)
        out["vhd-util"] = peer
        out["ratio"] = peer.seconds / ours.seconds
    shutil.rmtree(work / "run", ignore_errors=True)
    return out
