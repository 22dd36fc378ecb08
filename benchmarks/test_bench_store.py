"""Benchmarks of compression and upload, with the stock ``swift upload --use-slo`` beside ours.

They run once on small data as smoke tests (``--benchmark-disable``) and are
timed on demand, with the loopback Swift of scripts/swift_server.py in the
environment for the Swift ones::

    python -m pytest benchmarks/test_bench_store.py --benchmark-only

Each records the bytes it moves in ``extra_info`` (``raw_bytes`` for
compression, ``bytes`` = compressed bytes uploaded), so bytes / mean time
reads as throughput.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from _benchutil import server_missing

from vhdcore._workloads import realistic_block
from vhdcore.compress import FrameCompressor, decompress_frames
from vhdcore.store import MiB, image_metadata, open_store, upload_frames

CHUNK = 2 * MiB  # one VHD block per frame, as the imaging pipeline does

@pytest.fixture(scope="module")
def sizes(request) -> dict[str, int]:
    disabled = request.config.getoption("benchmark_disable", False)
    if disabled:
        return {"raw": 8 * MiB, "segment": 1 * MiB}
    return {"raw": 256 * MiB, "segment": 32 * MiB}


@pytest.fixture(scope="module")
def raw_chunks(sizes) -> list[bytes]:
    nprng = np.random.default_rng(2024)  # OS-disk-like data (text, binary, random, zero pages)
    distinct = [bytes(realistic_block(nprng, CHUNK, zero_share=0.1, random_share=0.4))
                for _ in range(8)]  # lz4 ratio about 1.9, like an OS disk
    return [distinct[i % len(distinct)] for i in range(sizes["raw"] // CHUNK)]


@pytest.fixture(scope="module")
def frames(raw_chunks) -> list[bytes]:
    with FrameCompressor(threads=2) as fc:
        return list(fc.compress(raw_chunks))


@pytest.fixture(scope="module")
def metadata(raw_chunks) -> dict[str, str]:
    import hashlib

    sha = hashlib.sha256()
    for c in raw_chunks:
        sha.update(c)
    total = sum(map(len, raw_chunks))
    return image_metadata(sha256=sha.hexdigest(), stream_size=total, virtual_size=total)


def test_compress_two_threads(benchmark, raw_chunks) -> None:
    fc = FrameCompressor(threads=2)

    def run() -> int:
        return sum(len(f) for f in fc.compress(raw_chunks))

    compressed = benchmark(run)
    fc.close()
    raw = sum(map(len, raw_chunks))
    benchmark.extra_info.update(
        raw_bytes=raw, bytes=raw, compressed_bytes=compressed, ratio=round(raw / compressed, 3), threads=2
    )
    assert 1.5 < raw / compressed < 2.5


def test_decompress_segments(benchmark, frames, sizes) -> None:
    blob = b"".join(frames)
    out = benchmark(decompress_frames, blob)
    benchmark.extra_info.update(bytes=len(out), compressed_bytes=len(blob))
    assert len(out) == sizes["raw"]


def test_upload_directory(benchmark, frames, metadata, sizes, tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/img")

    def fresh():
        store.delete()  # otherwise the next round skips every segment (resume)
        return (), {}

    manifest = benchmark.pedantic(
        lambda: upload_frames(store, frames, segment_size=sizes["segment"], metadata=metadata, concurrency=4),
        setup=fresh,
        rounds=3,
        iterations=1,
    )
    benchmark.extra_info.update(bytes=manifest.compressed_size, segments=len(manifest.segments), durable=True)


# -- Swift: ours next to the swift command line client ------------------------------------------
def _swift_or_skip() -> None:
    for key in ("ST_AUTH", "ST_USER", "ST_KEY"):
        if not os.environ.get(key):
            server_missing("loopback Swift not configured (see scripts/swift_server.py)")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        os.environ["ST_AUTH"],
        headers={"X-Auth-User": os.environ["ST_USER"], "X-Auth-Key": os.environ["ST_KEY"]},
    )
    try:
        opener.open(req, timeout=5).close()
    except OSError as exc:
        server_missing(f"loopback Swift does not answer: {exc}")


@pytest.fixture(scope="module")
def swift_container():
    _swift_or_skip()
    from swiftclient.client import Connection

    conn = Connection(os.environ["ST_AUTH"], os.environ["ST_USER"], os.environ["ST_KEY"])
    name = f"vhdcore-bench-{uuid.uuid4().hex[:8]}"
    conn.put_container(name)
    yield name
    for c in (name, f"{name}_segments"):
        try:
            for obj in conn.get_container(c, full_listing=True)[1]:
                conn.delete_object(c, obj["name"])
            conn.delete_container(c)
        except Exception:
            pass


def test_upload_swift_vhdcore(benchmark, frames, metadata, sizes, swift_container) -> None:
    store = open_store(f"swift://{swift_container}/ours")

    def fresh():
        store.delete()
        return (), {}

    manifest = benchmark.pedantic(
        lambda: upload_frames(store, frames, segment_size=sizes["segment"], metadata=metadata, concurrency=4),
        setup=fresh,
        rounds=3,
        iterations=1,
    )
    benchmark.extra_info.update(
        bytes=manifest.compressed_size,
        segments=len(manifest.segments),
        segment_size=sizes["segment"],
        concurrency=4,
    )
    store.close()


def test_upload_swift_cli_use_slo(benchmark, frames, sizes, swift_container, tmp_path: Path) -> None:
    """The same compressed bytes with ``swift upload --use-slo`` (its default threads)."""
    path = tmp_path / "stream.lz4"
    path.write_bytes(b"".join(frames))
    cmd = [
        sys.executable,
        "-m",
        "swiftclient.shell",
        "upload",
        "--use-slo",
        "-S",
        str(sizes["segment"]),
        swift_container,
        str(path),
        "--object-name",
        "cli",
    ]

    from swiftclient.client import Connection

    conn = Connection(os.environ["ST_AUTH"], os.environ["ST_USER"], os.environ["ST_KEY"])

    def fresh():
        try:  # a fresh upload each round, like ours
            conn.delete_object(swift_container, "cli", query_string="multipart-manifest=delete")
        except Exception:
            pass
        return (), {}

    def run() -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    benchmark.pedantic(run, setup=fresh, rounds=3, iterations=1)
    conn.close()
    benchmark.extra_info.update(
        bytes=path.stat().st_size,
        segment_size=sizes["segment"],
        note="includes the client's start-up (~0.3 s)",
    )
