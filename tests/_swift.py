"""Helpers for the store tests: the loopback Swift/S3, random image streams, store wrappers.

The Swift and S3 tests need the server started by ``scripts/swift_server.py``
and its environment (``eval "$(python scripts/swift_server.py env --dir DIR)"``).
Without it they skip.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import shutil
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from _helpers import server_missing
from vhdcore.compress import FrameCompressor
from vhdcore.store.base import Manifest, SegmentInfo, SegmentLimits, Store, image_metadata

REPO = Path(__file__).resolve().parents[1]

lz4_tool = pytest.mark.skipif(
    shutil.which("lz4") is None, reason="the lz4 command line tool is not installed"
)


# -- random image streams ------------------------------------------------------------
_WORDS = [bytes(random.Random(i).choices(b"abcdefghijklmnopqrstuvwxyz", k=2 + i % 8)) for i in range(500)]


def disk_like_chunk(rng: random.Random, size: int) -> bytes:
    """``size`` bytes that compress about like an OS disk (text, random, zero runs)."""
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        if kind < 0.35:
            out += b" ".join(rng.choices(_WORDS, k=200))
        elif kind < 0.78:
            out += rng.randbytes(1500)
        elif kind < 0.85:
            out += bytes(4096)
        else:
            out += bytes(range(256)) * 8
    return bytes(out[:size])


class ImageStream:
    """A random raw stream, its lz4 frames and its metadata."""

    def __init__(
        self, seed: int, chunks: int, chunk_size: int = 256 * 1024, *, incompressible: float = 0.0
    ) -> None:
        rng = random.Random(seed)
        self.chunks = []
        for _ in range(chunks):
            if rng.random() < incompressible:
                self.chunks.append(rng.randbytes(chunk_size))
            else:
                self.chunks.append(disk_like_chunk(rng, rng.randint(chunk_size // 2, chunk_size)))
        self.raw = b"".join(self.chunks)
        with FrameCompressor(threads=2) as fc:
            self.frames = list(fc.compress(self.chunks))
        self.compressed = b"".join(self.frames)
        self.sha256 = hashlib.sha256(self.raw).hexdigest()
        self.metadata = image_metadata(
            sha256=self.sha256, stream_size=len(self.raw), virtual_size=len(self.raw)
        )


# -- store wrappers ---------------------------------------------------------------------
class Interrupted(Exception):
    """Injected failure."""


class CountingStore(Store):
    """Delegates to ``inner``, counts segment PUTs and can fail after ``fail_after`` of them."""

    def __init__(self, inner: Store, fail_after: int | None = None) -> None:
        super().__init__(inner.url, inner.retry)
        self.inner = inner
        self.fail_after = fail_after
        self.puts: list[int] = []
        self.lists = 0
        self._lock = threading.Lock()

    def put_segment(self, index: int, data: Any, md5_hex: str) -> str:
        with self._lock:
            if self.fail_after is not None and len(self.puts) >= self.fail_after:
                raise Interrupted(f"injected failure before segment {index}")
            self.puts.append(index)
        return self.inner.put_segment(index, data, md5_hex)

    def list_segments(self) -> dict[int, SegmentInfo]:
        self.lists += 1
        return self.inner.list_segments()

    def get_segment(self, index: int) -> bytes:
        return self.inner.get_segment(index)

    def put_manifest(self, segments: list[SegmentInfo], metadata: Mapping[str, str]) -> None:
        self.inner.put_manifest(segments, metadata)

    def get_manifest(self) -> Manifest:
        return self.inner.get_manifest()

    def delete(self) -> None:
        self.inner.delete()

    def segment_limits(self) -> SegmentLimits:
        return self.inner.segment_limits()

    def set_generation(self, generation: str) -> None:
        super().set_generation(generation)
        self.inner.set_generation(generation)

    def prune(self) -> int:
        return self.inner.prune()

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


# -- the loopback server ----------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@functools.lru_cache(maxsize=None)
def _server_answer() -> str | None:
    """None if the Swift in ST_AUTH answers an authenticated request, else why not."""
    missing = [k for k in ("ST_AUTH", "ST_USER", "ST_KEY") if not os.environ.get(k)]
    if missing:
        return f"loopback Swift not configured ({', '.join(missing)} unset; see scripts/swift_server.py)"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        os.environ["ST_AUTH"],
        headers={"X-Auth-User": os.environ["ST_USER"], "X-Auth-Key": os.environ["ST_KEY"]},
    )
    try:
        with opener.open(req, timeout=5) as resp:
            if resp.status == 200:
                return None
            return f"Swift auth answered HTTP {resp.status}"
    except (OSError, urllib.error.URLError) as exc:
        return f"Swift at {os.environ['ST_AUTH']} does not answer: {exc}"


def require_swift() -> None:
    """Skip the calling test unless the loopback Swift answers."""
    why = _server_answer()
    if why is not None:
        if os.environ.get("VHDCORE_TEST_SWIFT") == "1":
            # CI started a Swift for these tests: a missing server is a failure
            pytest.fail(f"VHDCORE_TEST_SWIFT=1 but {why}")
        server_missing(why)


def require_s3() -> None:
    """Skip unless the loopback Swift answers and its S3 API is configured."""
    require_swift()
    missing = [
        k for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)
    ]
    if missing:
        server_missing(f"S3 endpoint not configured ({', '.join(missing)} unset)")


def swift_connection() -> Any:
    """A plain swiftclient connection to the loopback Swift (for set-up and tampering)."""
    from swiftclient.client import Connection

    return Connection(os.environ["ST_AUTH"], os.environ["ST_USER"], os.environ["ST_KEY"], retries=1)


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def server_control() -> Any:
    """The ``SwiftServer`` of scripts/swift_server.py for the running loopback Swift, or skip."""
    directory = os.environ.get("VHDCORE_TEST_SWIFT_DIR")
    if not directory or not (Path(directory) / "state.json").exists():
        server_missing(
            "VHDCORE_TEST_SWIFT_DIR does not name a loopback Swift started by scripts/swift_server.py"
        )
    spec = importlib.util.spec_from_file_location(
        "_vhdcore_swift_server", REPO / "scripts" / "swift_server.py"
    )
    assert spec and spec.loader
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    server = module.SwiftServer(directory)
    if server.state.get("object_backend") != "object":
        pytest.skip("the loopback Swift keeps objects in memory: stopping its servers loses them")
    return server


@pytest.fixture(scope="session")
def swift_session() -> None:
    """Session fixture: skip unless the loopback Swift answers."""
    require_swift()


# -- scenarios shared by every target ----------------------------------------------------------
def round_trip(store: Store, stream: ImageStream, segment_size: int, out: Path, **kw: Any) -> Manifest:
    """Upload ``stream``, restore it to ``out`` and check both ends; return the manifest."""
    from vhdcore.store import restore, upload_frames

    manifest = upload_frames(store, stream.frames, segment_size=segment_size, metadata=stream.metadata, **kw)
    assert [s.index for s in manifest.segments] == list(range(len(manifest.segments)))
    assert manifest.compressed_size == len(stream.compressed)
    stored = store.get_manifest()
    assert stored.segments == manifest.segments
    for key, value in stream.metadata.items():
        assert stored.metadata[key] == value
    assert stored.metadata["codec"] == "lz4-frames"
    assert stored.metadata["format"] == "vhd-dynamic"
    restore(store, out)
    assert out.read_bytes() == stream.raw
    return manifest


def resume_after_failure(
    make_store: Any, stream: ImageStream, segment_size: int, out: Path, fail_after: int
) -> tuple[int, int]:
    """Interrupt an upload after ``fail_after`` segment PUTs, re-run it; return (total, re-uploaded)."""
    from vhdcore.errors import UploadError
    from vhdcore.store import UploadStats, pack_segments, restore, upload_frames

    total = sum(1 for _ in pack_segments(stream.frames, segment_size))
    assert total > fail_after + 1
    first = CountingStore(make_store(), fail_after=fail_after)
    with pytest.raises(UploadError, match="injected failure"):
        upload_frames(
            first, stream.frames, segment_size=segment_size, metadata=stream.metadata, concurrency=2
        )
    assert len(first.puts) == fail_after
    from vhdcore.errors import StoreNotFoundError

    with pytest.raises(StoreNotFoundError):
        first.get_manifest()  # no manifest: the image is incomplete
    second = CountingStore(make_store())
    stats = UploadStats()
    upload_frames(
        second, stream.frames, segment_size=segment_size, metadata=stream.metadata, concurrency=2, stats=stats
    )
    assert second.lists == 1
    assert sorted(second.puts) == sorted(set(range(total)) - set(first.puts))
    assert stats.skipped_segments == fail_after and stats.uploaded_segments == total - fail_after
    restore(make_store(), out)
    assert out.read_bytes() == stream.raw
    return total, len(second.puts)


def corrupted_segment_detected(store: Store, out: Path, overwrite: Any) -> None:
    """After ``overwrite(index)`` damages a stored segment, restore fails and leaves no output."""
    from vhdcore.errors import IntegrityError
    from vhdcore.store import restore

    overwrite(1)
    with pytest.raises(IntegrityError, match="segment 1"):
        restore(store, out)
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
