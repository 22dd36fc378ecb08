"""The content-addressed repository's benchmarks (the targets of the
repository issue), each against ``image --to`` of the same chain in the
same run: a first image, an incremental image after a new layer, the first
image of a clone, a restore, and the peak memory of ``image --repo`` +
``restore`` of a 2040 GiB sparse disk."""
from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .._workloads import Workload
from .context import REPO_MEMORY_SIZE, BenchRun
from .memory import SAMPLER, run_child
from .report import REPO_TARGETS, MiB
from .timing import timed_call

__all__ = ["REPO_TARGETS", "measure_repo", "measure_repo_memory", "repo_memory"]

_OPTS = {"durable": False}


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _lz4_sizes(raw: bytes, bs: int) -> int:
    """Bytes of the lz4 frames of each ``bs``-byte block of ``raw``."""
    from ..compress import compress_frame

    return sum(len(compress_frame(raw[i:i + bs])) for i in range(0, len(raw), bs))


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


def _first_images(b: BenchRun, leaf: Path, reps: int) -> tuple[float, float, Any, Path]:
    """``image --to`` and a first image into an empty repository, alternated
    so that machine noise hits both alike: their medians, the last image
    and its repository."""
    from ..imaging import create_image as image_to
    from ..repo import create_image, init_repo

    t_to, t_first = [], []
    first: Any = None
    repo_dir = b.work / "repo-first"
    for _ in range(reps):
        d = b.work / "to"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t_to.append(timed_call(image_to, leaf, f"file://{d}/img", fs_aware=False,
                               store_options=_OPTS)[0])
        shutil.rmtree(repo_dir, ignore_errors=True)
        init_repo(str(repo_dir)).close()
        t, first = timed_call(create_image, leaf, str(repo_dir), "vm1", fs_aware=False,
                              backend_options=_OPTS)
        t_first.append(t)
    return statistics.median(t_to), statistics.median(t_first), first, repo_dir


def _incremental(b: BenchRun, leaf: Path, repo_dir: Path, m_first: float, vsize: int,
                 bs: int, nblocks: int, rng: np.random.Generator) -> Path:
    """A second image after a new layer changed 5% of the blocks."""
    from ..repo import create_image

    k = max(1, round(0.05 * nblocks))
    changed = sorted(rng.choice(nblocks, size=k, replace=False).tolist())
    child = leaf.parent / "repo-bench-child.vhd"
    if child.exists():
        child.unlink()
    lz4_changed = _lz4_sizes(_write_changes(leaf, child, changed, 8), bs)
    before = _tree_size(repo_dir)
    t_second, second = timed_call(create_image, child, str(repo_dir), "vm1", fs_aware=False,
                                  backend_options=_OPTS)
    growth = _tree_size(repo_dir) - before
    b.add("repo.incremental_time", f"second image, new layer changed {k} of {nblocks} blocks",
          "repo", vsize, t_second, ratio=t_second / m_first, ratio_to="first image time",
          note=f"read {second.bytes['read'] / MiB:.0f} MiB, {second.counts['new']} new chunks, "
               f"{second.counts['reused']} reused without reading")
    b.add("repo.incremental_growth", "repository growth for that second image", "repo",
          growth, t_second, ratio=growth / lz4_changed, ratio_to="lz4 of changed",
          note=f"grew {growth} bytes (chunks + index + manifest); lz4 frames of the {k} changed "
               f"chunks: {lz4_changed} bytes")
    return child


def _clone(b: BenchRun, leaf: Path, repo_dir: Path, bs: int, nblocks: int,
           rng: np.random.Generator) -> None:
    """A second VM cloned from the same base: its first image."""
    from ..chain import Chain
    from ..repo import create_image

    k = max(1, round(0.05 * nblocks))
    clone_dir = b.work / "clone"
    shutil.rmtree(clone_dir, ignore_errors=True)
    clone_dir.mkdir()
    with Chain.open(leaf) as c:
        for ly in c.layers:
            shutil.copy(ly.path, clone_dir / os.path.basename(ly.path))
    clone_leaf = clone_dir / leaf.name
    cchanged = sorted(rng.choice(nblocks, size=k, replace=False).tolist())
    lz4_clone = _lz4_sizes(_write_changes(clone_leaf, clone_dir / "own.vhd", cchanged, 9), bs)
    before = _tree_size(repo_dir)
    t_clone, cimg = timed_call(create_image, clone_dir / "own.vhd", str(repo_dir), "vm2",
                               fs_aware=False, backend_options=_OPTS)
    cgrowth = _tree_size(repo_dir) - before
    b.add("repo.clone_growth", "first image of a clone of the same base: growth", "repo",
          cgrowth, t_clone, ratio=cgrowth / lz4_clone, ratio_to="lz4 of own chunks",
          note=f"{cimg.counts['new']} new chunks of {k} written by the clone; "
               f"{cimg.counts['reused']} found in the repository")
    shutil.rmtree(clone_dir, ignore_errors=True)


def measure_repo(b: BenchRun, wl: dict[str, Workload]) -> None:
    """The repository targets on the realistic workload's chain."""
    from ..chain import Chain
    from ..repo import restore

    leaf = Path(wl["realistic"].leaf)
    b.say("measuring the repository: first image, incremental, clone, restore ...")
    reps = max(1, min(b.reps, 3))
    with Chain.open(leaf) as c:
        vsize, bs, nblocks = c.virtual_size, c.block_size, c.nblocks
        nalloc = len(c.allocated_blocks())
    m_to, m_first, first, repo_dir = _first_images(b, leaf, reps)
    b.add("repo.first_image", "first image into an empty repository", "repo", vsize, m_first,
          ratio=m_first / m_to, ratio_to="image --to time",
          note=f"{first.counts['new']} chunks stored, {first.bytes['new_stored'] / MiB:.1f} "
               f"MiB; image --to of the same chain took {m_to:.3f} s (median of {reps}, "
               "alternated)")
    rng = np.random.default_rng(7)
    child = _incremental(b, leaf, repo_dir, m_first, vsize, bs, nblocks, rng)
    _clone(b, leaf, repo_dir, bs, nblocks, rng)
    out = b.work / "restore.vhd"
    t_rest = []
    for _ in range(reps):
        t_rest.append(timed_call(restore, str(repo_dir), str(first), out, format="vhd")[0])
        out.unlink()
    m_rest = statistics.median(t_rest)
    b.add("repo.restore", "restore of an image (VHD), virtual bytes", "repo", vsize, m_rest,
          ratio=m_to / m_rest, ratio_to="image --to rate",
          note=f"{nalloc} allocated blocks; every chunk re-hashed; restore {m_rest:.3f} s "
               f"vs image --to {m_to:.3f} s")
    shutil.rmtree(b.work / "to", ignore_errors=True)
    shutil.rmtree(repo_dir, ignore_errors=True)
    child.unlink()


_CHILD = SAMPLER + r"""
from vhdcore import repo as R
start_sampling()
leaf, url, out = sys.argv[1:4]
t = time.perf_counter()
img = R.create_image(leaf, url, "big", fs_aware=False, backend_options={"durable": False})
t1 = time.perf_counter() - t
R.restore(url, str(img), out, format="vhd")
t2 = time.perf_counter() - t - t1
stop_sampling()
print(json.dumps({"peak_rss": hwm(), "peak_anon": peak["anon"], "image_s": t1,
                  "restore_s": t2}))
"""


def repo_memory(work: Path, vsize: int) -> dict[str, Any]:
    """Peak RSS of ``image --repo`` then ``restore`` of a sparse chain of
    ``vsize`` bytes (a few blocks written), in a child process."""
    from ..chain import Chain
    from ..vhd.create import create_dynamic
    from ..repo import init_repo

    d = work / "repo-mem"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    leaf = d / "big.vhd"
    with create_dynamic(leaf, vsize) as v:
        bs = v.block_size
        nb = v.nblocks
    with Chain.open(leaf, writable=True) as c:
        for blk in (0, nb // 3, nb // 2, nb - 1):
            c.write(blk * bs, os.urandom(64 * 1024))
    init_repo(str(d / "repo")).close()
    try:
        return run_child(_CHILD, str(leaf), str(d / "repo"), str(d / "out.vhd"),
                         what="the repository")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure_repo_memory(b: BenchRun) -> None:
    vsize = REPO_MEMORY_SIZE
    b.say(f"measuring peak memory of image --repo + restore of a {vsize >> 30} GiB "
          "sparse disk ...")
    rec = repo_memory(b.work, vsize)
    b.add("memory.repo", f"peak RSS, image --repo + restore, {vsize >> 30} GiB", "memory",
          vsize, rec["image_s"] + rec["restore_s"], ratio=rec["peak_rss"] / (256 * MiB),
          ratio_to="256 MiB", peak_bytes=rec["peak_rss"], reps=1,
          note=f"anonymous memory peaked at {rec['peak_anon'] / MiB:.0f} MiB (sampled); "
               f"image {rec['image_s']:.1f} s, restore {rec['restore_s']:.1f} s")
