"""Coalesce side by side with blktap's ``vhd-util coalesce`` on the same
files (a 4 GiB disk; see :mod:`vhdcore.bench.coalesce_peer`): a child of 256 MiB of
random 4 KiB writes and one of whole 2 MiB blocks, cold (page cache dropped
before each side, root only) and warm (the files' data extents read first), the final
fsync counted on both sides.

The peer runs when ``VHDCORE_BENCH_VHD_UTIL=/path/to/vhd-util`` is set (blktap
is not packaged by Debian; build ``vhd-util`` from its public source);
otherwise only vhdcore is measured.  ``extra_info`` holds both sides' seconds,
bytes read and written and the ratio (vhd-util's time / vhdcore's) with the
issue's target beside it.
"""
from __future__ import annotations

import os

import pytest

from vhdcore.bench import coalesce_peer as cpeer
from vhdcore.chain import Chain

MiB = 1024 * 1024


def _smoke(config) -> bool:
    """Run as a smoke test (``--benchmark-disable``, as the suite does): a
    small disk, and no cache drop (it would slow everything else down)."""
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:  # pragma: no cover - pytest-benchmark absent
        return True


@pytest.fixture(scope="module")
def peer_pairs(tmp_path_factory, request):
    made = {}
    smoke = _smoke(request.config)
    size = (256 if smoke else int(os.environ.get("VHDCORE_BENCH_COALESCE_MIB", "4096"))) * MiB
    data = size // 16

    def get(kind):
        if kind not in made:
            made[kind] = cpeer.make_peer_pair(tmp_path_factory.mktemp(f"peer-{kind}"), kind,
                                              size=size, data=data)
        return made[kind]

    return get


def _same_view(a, b) -> bool:
    """The two disks read the same, chunk by chunk (the parent after the
    coalesce reads as the child did)."""
    with Chain.open(a) as x, Chain.open(b) as y:
        if x.virtual_size != y.virtual_size:
            return False
        step = 8 * MiB
        for off in range(0, x.virtual_size, step):
            n = min(step, x.virtual_size - off)
            if x.read(off, n) != y.read(off, n):
                return False
    return True


def _peer_side(benchmark, side, pristine, work, cold, vu):
    runs = []

    def once():
        runs.append(cpeer.run_side(side, pristine, work, cold=cold, vhd_util=vu))

    # the copy and the cache drop happen inside run_side, outside its own timing:
    # record run_side's figure, not pytest-benchmark's wall time
    benchmark.pedantic(once, rounds=1, iterations=1)
    r = runs[-1]
    benchmark.extra_info.update({f"{side}_seconds": round(r.seconds, 3),
                                 f"{side}_read_MiB": round(r.read_bytes / MiB, 1),
                                 f"{side}_written_MiB": round(r.written_bytes / MiB, 1)})
    return r


@pytest.mark.parametrize("temp", ["cold", "warm"])
@pytest.mark.parametrize("kind", list(cpeer.PEER_KINDS))
def test_coalesce_vs_vhd_util(benchmark, peer_pairs, tmp_path, request, monkeypatch, kind, temp):
    if temp == "cold" and _smoke(request.config):
        # a smoke run does not drop the machine's page cache: cold evicts
        # only the two files' pages
        monkeypatch.setenv("VHDCORE_BENCH_NO_DROP_CACHES", "1")
    pristine = peer_pairs(kind)
    vu = cpeer.vhd_util_path()
    ours = _peer_side(benchmark, "vhdcore", pristine, tmp_path / "run", temp == "cold", None)
    assert ours.seconds > 0
    assert _same_view(tmp_path / "run" / pristine[0].name, pristine[1])
    name = f"coalesce.vs_vhd_util.{kind}.{temp}"
    target = cpeer.PEER_TARGETS.get(name)
    benchmark.extra_info["target"] = target[3] if target else ""
    if vu is None:
        benchmark.extra_info["vhd_util"] = "not set (VHDCORE_BENCH_VHD_UTIL)"
        return
    peer = cpeer.run_side("vhd-util", pristine, tmp_path / "run", cold=temp == "cold",
                          vhd_util=vu)
    benchmark.extra_info.update({"vhd-util_seconds": round(peer.seconds, 3),
                                 "vhd-util_read_MiB": round(peer.read_bytes / MiB, 1),
                                 "vhd-util_written_MiB": round(peer.written_bytes / MiB, 1),
                                 "ratio_vs_vhd_util": round(peer.seconds / ours.seconds, 2)})
