"""The whole imaging pipeline (to a directory, and to the loopback Swift when
it is configured) and the memory bound of flatten on a large sparse chain.

They run once as smoke tests (``--benchmark-disable``) and are timed on
demand::

    python -m pytest benchmarks/test_bench_pipeline.py --benchmark-only

``extra_info["bytes"]`` is the image stream (the stored, uncompressed data),
``extra_info["virtual_bytes"]`` the virtual disk, so bytes / median time reads
as GB/s of either.
"""
from __future__ import annotations

import os
import urllib.request
import uuid

import pytest
from _benchutil import gbps, server_missing

from vhdcore._workloads import make_chain
from vhdcore.bench import measure_peak_memory
from vhdcore.imaging import create_image

MiB = 1024 * 1024
GiB = 1024 * MiB
#: virtual size of the sparse chain of the memory test
MEMORY_GIB = int(os.environ.get("VHDCORE_BENCH_MEMORY_GIB", "8"))
SEGMENT = 8 * MiB


def _rounds(request) -> int:
    return 1 if request.config.getoption("benchmark_disable", False) else 3


def test_image_to_directory(benchmark, workloads, tmp_path, request):
    """create_image to file:// (no fsync), a fresh directory every round."""
    w = workloads("realistic")
    state = {"i": 0, "res": None}

    def setup():
        state["i"] += 1
        d = tmp_path / f"img{state['i']}"
        d.mkdir()
        return (f"file://{d}/image",), {}

    def run(url):
        state["res"] = create_image(w.leaf, url, threads=2, segment_size=SEGMENT,
                                    store_options={"durable": False}, fs_aware=False)

    benchmark.pedantic(run, setup=setup, rounds=_rounds(request), iterations=1)
    res = state["res"]
    assert res.virtual_size == w.virtual_size and res.blocks_stored > 0
    benchmark.extra_info.update(virtual_bytes=res.virtual_size,
                                compressed_bytes=res.compressed_size, segments=res.segments)
    gbps(benchmark, res.stream_size)


def _swift_or_skip() -> None:
    for key in ("ST_AUTH", "ST_USER", "ST_KEY"):
        if not os.environ.get(key):
            server_missing("loopback Swift not configured (ST_AUTH, ST_USER, ST_KEY; see "
                       "scripts/swift_server.py)")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        os.environ["ST_AUTH"],
        headers={"X-Auth-User": os.environ["ST_USER"], "X-Auth-Key": os.environ["ST_KEY"]},
    )
    try:
        opener.open(req, timeout=5).close()
    except OSError as exc:
        server_missing(f"loopback Swift does not answer: {exc}")


@pytest.fixture()
def swift_container():
    _swift_or_skip()
    from swiftclient.client import ClientException, Connection

    conn = Connection(os.environ["ST_AUTH"], os.environ["ST_USER"], os.environ["ST_KEY"])
    name = f"vhdcore-bench-{uuid.uuid4().hex[:10]}"  # unique per run
    conn.put_container(name)
    yield name
    for c in (name, f"{name}_segments"):
        try:
            for obj in conn.get_container(c, full_listing=True)[1]:
                conn.delete_object(c, obj["name"])
            conn.delete_container(c)
        except (ClientException, OSError):
            continue  # best effort: a leftover container does no harm


@pytest.mark.swift
def test_image_to_swift(benchmark, workloads, tmp_path, request, swift_container):
    """create_image to swift:// (a new object every round; job state in tmp_path)."""
    w = workloads("realistic")
    state = {"i": 0, "res": None}

    def setup():
        state["i"] += 1
        return (f"swift://{swift_container}/image-{state['i']}",), {}

    def run(url):
        state["res"] = create_image(w.leaf, url, threads=2, state_dir=tmp_path, fs_aware=False)

    benchmark.pedantic(run, setup=setup, rounds=_rounds(request), iterations=1)
    res = state["res"]
    assert res.virtual_size == w.virtual_size and res.blocks_stored > 0
    benchmark.extra_info.update(virtual_bytes=res.virtual_size,
                                compressed_bytes=res.compressed_size, segments=res.segments)
    gbps(benchmark, res.stream_size)


@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory):
    """A mostly empty chain of MEMORY_GIB GiB (5% of the blocks hold data)."""
    return make_chain(tmp_path_factory.mktemp("big-sparse"), "sparse", size=MEMORY_GIB * GiB,
                      layers=3, seed=5)


def test_flatten_memory_bounded(benchmark, big_sparse, tmp_path):
    """Flatten a large sparse chain in a child process: what the process
    allocates stays small however large the disk.  The peak resident set
    (VmHWM) is recorded too; it also counts the pages of the mapped VHD
    files that were read (clean page cache, see docs/benchmarks.md)."""
    out = tmp_path / "flat.vhd"
    got: dict = {}

    def run():
        got.update(measure_peak_memory("flatten", big_sparse.leaf, str(out)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert out.exists()
    benchmark.extra_info.update(virtual_bytes=big_sparse.virtual_size,
                                peak_rss=got["peak_rss"], peak_anon=got["peak_anon"],
                                peak_file=got["peak_file"])
    gbps(benchmark, big_sparse.virtual_size)
    if got["peak_anon"]:  # 0 where there is no /proc to sample
        assert got["peak_anon"] < 256 * MiB, got


@pytest.mark.swift
def test_image_to_swift_vs_swift_upload(benchmark, workloads, tmp_path, request,
                                        swift_container):
    """``vhdcore image --to swift://`` against ``swift upload --use-slo`` of
    the same lz4 bytes with the same segment size, both started as commands,
    interleaved in the same run; ``extra_info["vs_swift_upload"]`` is the
    ratio (swift upload seconds / image seconds; the target is >= 0.85)."""
    import shutil
    import statistics
    import subprocess
    import sys
    import time

    swift = shutil.which("swift")
    if swift is None:
        server_missing("the swift command (python-swiftclient) is not installed")
    w = workloads("realistic")
    res = create_image(w.leaf, f"file://{tmp_path}/image", threads=2, segment_size=SEGMENT,
                       store_options={"durable": False}, fs_aware=False)
    stream = tmp_path / "stream.lz4"
    with open(stream, "wb") as out:
        for seg in sorted(tmp_path.glob("image.segments/**/*.lz4")):
            out.write(seg.read_bytes())
    assert stream.stat().st_size == res.compressed_size
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    state = {"i": 0}
    peer_s: list[float] = []

    def setup():
        state["i"] += 1
        obj = f"peer-{state['i']}"
        t = time.perf_counter()
        subprocess.run([swift, "upload", "--use-slo", "-S", str(SEGMENT), "--object-name", obj,
                        swift_container, str(stream)], check=True, capture_output=True)
        peer_s.append(time.perf_counter() - t)
        return (f"swift://{swift_container}/image-{state['i']}",), {}

    def run(url):
        subprocess.run([sys.executable, "-m", "vhdcore", "image", str(w.leaf), "--to", url,
                        "--segment-size", str(SEGMENT), "--threads", "2", "--no-fs-aware",
                        "--state-dir", str(tmp_path), "-q"], check=True, capture_output=True,
                       env=env)

    benchmark.pedantic(run, setup=setup, rounds=_rounds(request), iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["vs_swift_upload"] = round(
            statistics.median(peer_s) / stats.stats.median, 3)
    benchmark.extra_info.update(swift_upload_seconds=round(statistics.median(peer_s), 3),
                                compressed_bytes=res.compressed_size, target=">= 0.85")
    gbps(benchmark, res.stream_size)


def test_image_memory_bounded(benchmark, big_sparse, tmp_path):
    """``image`` of a large sparse chain to a directory in a child process
    (default options): the peak resident set stays under 256 MiB."""
    got: dict = {}

    def run():
        got.update(measure_peak_memory("imaging", big_sparse.leaf, f"file://{tmp_path}/image"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(virtual_bytes=big_sparse.virtual_size,
                                peak_rss=got["peak_rss"], peak_anon=got["peak_anon"],
                                peak_file=got["peak_file"], target="< 256 MiB")
    gbps(benchmark, big_sparse.virtual_size)
    assert got["peak_rss"] < 256 * MiB, got
