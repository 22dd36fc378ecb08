"""Chain read, flatten and coalesce, side by side with qemu-img convert on
the same data in the page cache.  Bytes are recorded in extra_info."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from _benchutil import gbps
from vhdcore.chain import Chain
from vhdcore._coalesce_peer import sparse_copy
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


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_qemu_convert_raw_peer(benchmark, workloads, tmp_path):
    """The peer: qemu-img convert -O raw of an equivalent dynamic VHD (our
    flattened chain, which qemu reads without a parent)."""
    w = workloads("realistic")
    flat = tmp_path / "flat.vhd"
    flatten(w.leaf, flat, durable=False, fs_aware=False)
    out = tmp_path / "q.raw"
    benchmark(subprocess.run, ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(flat),
                               str(out)], check=True)
    gbps(benchmark, w.virtual_size)


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_flatten(benchmark, workloads, tmp_path, fmt):
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
