"""The repository: a first image into an empty repository, an incremental
image after a new layer, and a restore (timed on demand)::

    python -m pytest benchmarks/test_bench_repo.py --benchmark-only

``extra_info["bytes"]`` is the virtual disk, so bytes / median time reads as
GB/s of virtual disk.  ``vhdcore bench`` checks the repository targets against
``image --to`` of the same chain in the same run (see docs/benchmarks.md).
"""
from __future__ import annotations

from _benchutil import gbps

from vhdcore import repo as R
from vhdcore.disk import create_differencing
from vhdcore.chain import Chain

OPTS = {"durable": False}


def _rounds(request) -> int:
    return 1 if request.config.getoption("benchmark_disable", False) else 3


def test_first_image(benchmark, workloads, tmp_path, request):
    w = workloads("realistic")
    state = {"i": 0, "res": None}

    def setup():
        state["i"] += 1
        url = str(tmp_path / f"repo{state['i']}")
        R.init_repo(url).close()
        return (url,), {}

    def run(url):
        state["res"] = R.create_image(w.leaf, url, "vm", fs_aware=False, backend_options=OPTS)

    benchmark.pedantic(run, setup=setup, rounds=_rounds(request), iterations=1)
    assert state["res"].counts["new"] > 0
    gbps(benchmark, w.virtual_size)


def test_incremental_image(benchmark, workloads, tmp_path, request):
    w = workloads("realistic")
    url = str(tmp_path / "repo")
    R.init_repo(url).close()
    R.create_image(w.leaf, url, "vm", fs_aware=False, backend_options=OPTS)
    # the new layer must sit beside its parent (parents are confined to the leaf's directory)
    child = w.leaf.parent / "bench-repo-child.vhd"
    if child.exists():
        child.unlink()
    create_differencing(child, w.leaf).close()
    with Chain.open(child, writable=True) as c:
        for b in range(0, c.nblocks, 20):  # 5% of the blocks
            c.write(b * c.block_size, bytes([b % 251 + 1]) * 65536)
    state = {"res": None}

    def run():
        state["res"] = R.create_image(child, url, "vm", fs_aware=False, backend_options=OPTS)

    try:
        benchmark.pedantic(run, rounds=_rounds(request), iterations=1)
    finally:
        child.unlink()
    res = state["res"]
    assert res.counts["reused"] > 0 and res.bytes["read"] < w.virtual_size
    gbps(benchmark, w.virtual_size)


def test_restore(benchmark, workloads, tmp_path, request):
    w = workloads("realistic")
    url = str(tmp_path / "repo")
    R.init_repo(url).close()
    img = R.create_image(w.leaf, url, "vm", fs_aware=False, backend_options=OPTS)
    out = tmp_path / "out.vhd"

    def run():
        R.restore(url, str(img), out)

    benchmark.pedantic(run, rounds=_rounds(request), iterations=1)
    assert out.stat().st_size > 0
    gbps(benchmark, w.virtual_size)
