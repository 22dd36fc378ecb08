"""Chain read, flatten and coalesce; flatten and cat side by side with
qemu-img convert on the same data, warm and cold, syncs included.  Bytes
(and the ratios to qemu-img with their targets) are recorded in extra_info."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time

import pytest

from _benchutil import gbps
from vhdcore.chain import Chain
from vhdcore.bench.coalesce_peer import sparse_copy
from vhdcore.coalesce import coalesce, flatten


def _read_all(leaf) -> int:
    n = 0
    with Chain.open(leaf) as c:
        for v in c.iter_raw(8 * 1024 * 1024):
            n += len(v)
    return n


@pytest.mark.parametrize("kind", ["realistic", "sparse"])
def test_chain_read(benchmark, workloads, kind):
    w = workloads(kind)
    n = benchmark(_read_all, w.leaf)
    assert n == w.virtual_size
    gbps(benchmark, w.virtual_size)


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@pytest.fixture(scope="module")
def flat_input(workloads, tmp_path_factory):
    """The realistic chain flattened into one dynamic VHD: the same input
    for vhdcore and qemu-img (which does not follow VHD differencing
    chains)."""
    w = workloads("realistic")
    flat = tmp_path_factory.mktemp("flatin") / "flat.vhd"
    flatten(w.leaf, flat, durable=False, fs_aware=False)
    _fsync_path(flat)
    return flat, w.virtual_size


#: the issue's targets: vhdcore's speed / qemu-img's, fsync of the output included on both sides
TARGETS = {("vhd", "cold"): 1.0, ("raw", "warm"): 1.0, ("raw", "cold"): 1.0}
GOALS = {"vhd": 2.0, "raw": 1.5, "cat": 1.5}


@pytest.mark.parametrize("mode", ["warm", "cold"])
@pytest.mark.parametrize("what", ["vhd", "raw", "cat"])
def test_flatten_vs_qemu_img(benchmark, flat_input, tmp_path, what, mode):
    """vhdcore flatten (vhd, raw) and ``cat -o`` against ``qemu-img convert
    -O vpc`` / ``-O raw`` of the same dynamic VHD, run interleaved, the
    output's fsync timed on both sides; cold drops the page cache before
    each side (root only).  The ratio and its target go in extra_info."""
    qemu = shutil.which("qemu-img")
    if qemu is None:
        pytest.skip("qemu-img not installed (Debian: qemu-utils)")
    if mode == "cold" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("dropping the page cache needs root")
    flat, vsize = flat_input
    qfmt = "vpc" if what == "vhd" else "raw"
    peer_times: list[float] = []

    def ours(out):
        if what == "cat":
            with Chain.open(flat) as c:
                c.copy_to_raw(out)
        else:
            flatten(flat, out, what, fs_aware=False)

    def peer(out):
        subprocess.run([qemu, "convert", "-f", "vpc", "-O", qfmt, str(flat), str(out)],
                       check=True)
        _fsync_path(out)

    def setup():
        # the peer runs first in each round, outside vhdcore's timing
        q = tmp_path / "q.out"
        if mode == "cold":
            _drop_caches()
        t = time.perf_counter()
        peer(q)
        peer_times.append(time.perf_counter() - t)
        q.unlink()
        out = tmp_path / "v.out"
        if out.exists():
            out.unlink()
        os.sync()
        if mode == "cold":
            _drop_caches()
        return (out,), {}

    benchmark.pedantic(ours, setup=setup, rounds=3, iterations=1)
    gbps(benchmark, vsize)
    ours_med = statistics.median(benchmark.stats.stats.data) if benchmark.stats else None
    if ours_med:
        ratio = statistics.median(peer_times) / ours_med
        benchmark.extra_info["peer"] = f"qemu-img convert -O {qfmt} + fsync"
        benchmark.extra_info["peer_seconds"] = round(statistics.median(peer_times), 4)
        benchmark.extra_info["ratio"] = round(ratio, 3)
        tgt = TARGETS.get((what, mode))
        benchmark.extra_info["target"] = (f">= {tgt}x (goal {GOALS[what]}x)" if tgt
                                          else "info")
    assert (tmp_path / "v.out").exists()


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_flatten(benchmark, workloads, tmp_path, fmt):
    """The engine alone: the chain flattened in the page cache, no fsync."""
    w = workloads("realistic")
    out = tmp_path / f"f.{fmt}"
    res = benchmark(flatten, w.leaf, out, fmt, durable=False, fs_aware=False, overwrite=True)
    assert res.virtual_size == w.virtual_size
    gbps(benchmark, w.virtual_size)


@pytest.mark.parametrize("kind", ["full", "scattered"])
def test_coalesce(benchmark, workloads, tmp_path, kind):
    """Coalesce the leaf into its parent on fresh copies each round; GB/s of
    merged (written) data."""
    w = workloads(kind)
    state = {"i": 0, "merged": 0}

    def setup():
        state["i"] += 1
        d = tmp_path / f"r{state['i']}"
        d.mkdir()
        for p in w.paths:
            sparse_copy(p, d / p.name)  # shutil.copyfile would fill the holes
        return (d / w.leaf.name,), {}

    def run(leaf):
        res = coalesce(leaf, durable=False, skip_space_check=True)
        state["merged"] = res.sectors_written * 512
        return res

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert state["merged"] > 0
    gbps(benchmark, state["merged"])
