"""Repository benchmarks for ``vhdcore bench`` (the targets of the repository
issue), measured against ``image --to`` of the same chain in the same run."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_repo", "repo_memory", "REPO_TARGETS"]

MiB = 1 << 20

#: result name -> (what is compared, operator, value, text) as in vhdcore.bench.TARGETS
REPO_TARGETS: dict[str, tuple[str, str, float, str]] = {
    "repo.incremental_time": ("ratio", "<", 0.20, "<= 20% of first"),
    "repo.incremental_growth": ("ratio", "<", 1.15, "<= 1.15x lz4"),
    "repo.clone_growth": ("ratio", "<", 1.15, "<= 1.15x lz4"),
    "repo.first_image": ("ratio", "<", 1.10, "<= 1.10x image --to"),
    "repo.restore": ("ratio", ">=", 0.8, ">= 0.8x image --to"),
    "memory.repo": ("mib", "<", 256.0, "< 256 MiB"),
}


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _lz4_size(data: bytes) -> int:
    from ..compress import compress_frame

    return len(compress_frame(data))


def _write_changes(leaf: Path, child: Path, blocks: list[int], seed: int) -> bytes:
    """A new differencing layer over ``leaf`` rewriting ``blocks`` with fresh
    OS-disk-like data; returns those blocks' new bytes (for the lz4 reference)."""
    from .._workloads import realistic_block
    from ..chain import Chain
    from ..vhd.create import create_differencing

    create_differencing(child, leaf).close()
    rng = np.random.default_rng(seed)
    out = []
    with Chain.open(child, writable=True) as c:
        bs = c.block_size
        for b in blocks:
            data = bytes(realistic_block(rng, bs, zero_share=0.0))
            c.write(b * bs, data)
            out.append(data)
    return b"".join(out)


def _measure_first(add: Callable[..., Any], work: Path, leaf: Path, reps: int,
                   vsize: int, opts: dict[str, Any]) -> tuple[float, float, Any, Path]:
    """The first image into an empty repository against ``image --to`` (alternated,
    so that machine noise hits both alike).  Medians of both, the image, the repository."""
    from ..imaging import create_image as image_to
    from . import create_image, init_repo

    def run_to() -> float:
        d = work / "to"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t = time.perf_counter()
        image_to(leaf, f"file://{d}/img", fs_aware=False, store_options=opts)
        return time.perf_counter() - t

    def run_first() -> tuple[float, Any, Path]:
        d = work / "repo-first"
        shutil.rmtree(d, ignore_errors=True)
        init_repo(str(d)).close()
        t = time.perf_counter()
        img = create_image(leaf, str(d), "vm1", fs_aware=False, backend_options=opts)
        return time.perf_counter() - t, img, d

    t_to, t_first = [], []
    first: Any = None
    repo_dir = work / "repo-first"
    for _ in range(reps):
        t_to.append(run_to())
        t, first, repo_dir = run_first()
        t_first.append(t)
    m_to, m_first = statistics.median(t_to), statistics.median(t_first)
    add("repo.first_image", "first image into an empty repository", "repo", vsize, m_first,
        ratio=m_first / m_to, ratio_to="image --to time",
        note=f"{first.counts['new']} chunks stored, {first.bytes['new_stored'] / MiB:.1f} MiB; "
             f"image --to of the same chain took {m_to:.3f} s (median of {reps}, alternated)")
    return m_to, m_first, first, repo_dir


def _measure_incremental(add: Callable[..., Any], leaf: Path, repo_dir: Path, changed: list[int],
                         geometry: tuple[int, int, int], m_first: float,
                         opts: dict[str, Any]) -> Path:
    """A second image after a new layer changed the blocks ``changed``: its time
    and the repository's growth.  Returns the new layer."""
    from . import create_image

    vsize, bs, nblocks = geometry
    k = len(changed)
    child = leaf.parent / "repo-bench-child.vhd"
    if child.exists():
        child.unlink()
    raw_changed = _write_changes(leaf, child, changed, 8)
    lz4_changed = sum(_lz4_size(raw_changed[i * bs:(i + 1) * bs]) for i in range(k))
    before = _tree_size(repo_dir)
    t = time.perf_counter()
    second = create_image(child, str(repo_dir), "vm1", fs_aware=False, backend_options=opts)
    t_second = time.perf_counter() - t
    growth = _tree_size(repo_dir) - before
    add("repo.incremental_time", f"second image, new layer changed {k} of {nblocks} blocks",
        "repo", vsize, t_second, ratio=t_second / m_first, ratio_to="first image time",
        note=f"read {second.bytes['read'] / MiB:.0f} MiB, {second.counts['new']} new chunks, "
             f"{second.counts['reused']} reused without reading")
    add("repo.incremental_growth", "repository growth for that second image", "repo",
        growth, t_second, ratio=growth / lz4_changed, ratio_to="lz4 of changed",
        note=f"grew {growth} bytes (chunks + index + manifest); lz4 frames of the {k} changed "
             f"chunks: {lz4_changed} bytes")
    return child


def _measure_clone(add: Callable[..., Any], work: Path, leaf: Path, repo_dir: Path,
                   cchanged: list[int], vsize: int, bs: int, opts: dict[str, Any]) -> Path:
    """The first image of a second VM cloned from the same base, whose own layer
    changed the blocks ``cchanged``: the repository's growth.  Returns the clone's
    directory."""
    from ..chain import Chain
    from . import create_image

    k = len(cchanged)
    clone_dir = work / "clone"
    shutil.rmtree(clone_dir, ignore_errors=True)
    clone_dir.mkdir()
    with Chain.open(leaf) as c:
        for ly in c.layers:
            shutil.copy(ly.path, clone_dir / os.path.basename(ly.path))
    clone_leaf = clone_dir / leaf.name
    craw = _write_changes(clone_leaf, clone_dir / "own.vhd", cchanged, 9)
    lz4_clone = sum(_lz4_size(craw[i * bs:(i + 1) * bs]) for i in range(k))
    before = _tree_size(repo_dir)
    t = time.perf_counter()
    cimg = create_image(clone_dir / "own.vhd", str(repo_dir), "vm2", fs_aware=False,
                        backend_options=opts)
    t_clone = time.perf_counter() - t
    cgrowth = _tree_size(repo_dir) - before
    add("repo.clone_growth", "first image of a clone of the same base: growth", "repo",
        cgrowth, t_clone, ratio=cgrowth / lz4_clone, ratio_to="lz4 of own chunks",
        note=f"{cimg.counts['new']} new chunks of {k} written by the clone; "
             f"{cimg.counts['reused']} found in the repository")
    return clone_dir


def measure_repo(add: Callable[..., Any], work: Path, leaf: Path, reps: int,
                 say: Callable[[str], None]) -> None:
    """Measure the repository targets on the chain of ``leaf`` (a realistic
    workload) and report each through ``add(name, title, group, nbytes,
    seconds, ratio=, ratio_to=, note=)``."""
    from ..chain import Chain
    from . import restore

    say("measuring the repository: first image, incremental, clone, restore ...")
    reps = max(1, min(reps, 3))
    with Chain.open(leaf) as c:
        vsize, bs, nblocks = c.virtual_size, c.block_size, c.nblocks
        alloc = [int(b) for b in c.allocated_blocks()]
    opts: dict[str, Any] = {"durable": False}
    m_to, m_first, first, repo_dir = _measure_first(add, work, leaf, reps, vsize, opts)
    # second image after a new layer changed 5% of the blocks, then a clone's
    k = max(1, round(0.05 * nblocks))
    rng = np.random.default_rng(7)
    changed = sorted(rng.choice(nblocks, size=k, replace=False).tolist())
    child = _measure_incremental(add, leaf, repo_dir, changed, (vsize, bs, nblocks), m_first,
                                 opts)
    cchanged = sorted(rng.choice(nblocks, size=k, replace=False).tolist())
    clone_dir = _measure_clone(add, work, leaf, repo_dir, cchanged, vsize, bs, opts)

    # restore throughput vs image --to
    out = work / "restore.vhd"
    t_rest = []
    for _ in range(reps):
        t = time.perf_counter()
        restore(str(repo_dir), str(first), out, format="vhd")
        t_rest.append(time.perf_counter() - t)
        out.unlink()
    m_rest = statistics.median(t_rest)
    add("repo.restore", "restore of an image (VHD), virtual bytes", "repo", vsize, m_rest,
        ratio=m_to / m_rest, ratio_to="image --to rate",
        note=f"{len(alloc)} allocated blocks; every chunk re-hashed; restore {m_rest:.3f} s "
             f"vs image --to {m_to:.3f} s")
    shutil.rmtree(work / "to", ignore_errors=True)
    shutil.rmtree(clone_dir, ignore_errors=True)
    shutil.rmtree(repo_dir, ignore_errors=True)
    child.unlink()


_CHILD = r"""
import json, sys, threading, time
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    return out
from vhdcore import repo as R
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], status().get("RssAnon", 0))
        stop.wait(0.005)
th = threading.Thread(target=sample, daemon=True); th.start()
leaf, url, out = sys.argv[1:4]
t = time.perf_counter()
img = R.create_image(leaf, url, "big", fs_aware=False, backend_options={"durable": False})
t1 = time.perf_counter() - t
R.restore(url, str(img), out, format="vhd")
t2 = time.perf_counter() - t - t1
stop.set(); th.join()
print(json.dumps({"peak_rss": status()["VmHWM"], "peak_anon": peak[0], "image_s": t1,
                  "restore_s": t2}))
"""


def repo_memory(work: Path, vsize: int) -> dict[str, Any]:
    """Peak RSS of ``image --repo`` then ``restore`` of a sparse chain of
    ``vsize`` bytes (a few blocks written), in a child process."""
    from ..vhd.create import create_dynamic
    from . import init_repo

    d = work / "repo-mem"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    leaf = d / "big.vhd"
    with create_dynamic(leaf, vsize) as v:
        bs = v.block_size
        nb = v.nblocks
    from ..chain import Chain

    with Chain.open(leaf, writable=True) as c:
        for b in (0, nb // 3, nb // 2, nb - 1):
            c.write(b * bs, os.urandom(64 * 1024))
    init_repo(str(d / "repo")).close()
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(leaf), str(d / "repo"),
                        str(d / "out.vhd")], capture_output=True, text=True, env=env,
                       check=False)
    shutil.rmtree(d, ignore_errors=True)
    if p.returncode != 0:
        raise RuntimeError(f"repository memory check failed: {p.stderr.strip()[-2000:]}")
    rec: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return rec
