"""The directory target, and everything of upload/restore that needs no server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _helpers import spill_segment
from _swift import (
    CountingStore,
    ImageStream,
    corrupted_segment_detected,
    lz4_tool,
    resume_after_failure,
    round_trip,
)
from vhdcore.compress import compress_frame, stream_bound
from vhdcore.errors import IntegrityError, StoreError, StoreNotFoundError, UploadError
from vhdcore.store import (
    DirectoryStore,
    FrameList,
    GiB,
    MiB,
    SegmentInfo,
    SegmentLimits,
    SegmentPacker,
    SegmentUploader,
    UploadStats,
    choose_segment_size,
    image_metadata,
    open_store,
    pack_segments,
    restore,
    upload_frames,
)

SEG = 200_000


@pytest.fixture(scope="module")
def stream() -> ImageStream:
    return ImageStream(seed=11, chunks=40, chunk_size=128 * 1024)


def store_at(tmp_path: Path, name: str = "img") -> DirectoryStore:
    store = open_store(f"file://{tmp_path}/{name}", durable=False)
    assert isinstance(store, DirectoryStore)
    return store


# -- URLs -----------------------------------------------------------------------------------
def test_open_store_urls(tmp_path: Path) -> None:
    s = open_store(f"file://{tmp_path}/a%20b")
    assert isinstance(s, DirectoryStore) and s.name == "a b" and s.directory == tmp_path
    s = open_store(str(tmp_path / "plain"))
    assert isinstance(s, DirectoryStore) and s.name == "plain"
    assert "file://" in s.describe()


@pytest.mark.parametrize("url", ["ftp://host/x", "gs://bucket/key", "http://example.invalid/x"])
def test_unknown_scheme_is_a_clear_store_error(url: str) -> None:
    with pytest.raises(StoreError, match="unknown store URL scheme"):
        open_store(url)


@pytest.mark.parametrize("url", ["swift://container", "swift:///name", "s3://bucket/", "file:///"])
def test_url_without_name_is_a_store_error(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)


# -- round trip, resume, integrity ----------------------------------------------------------------
def test_round_trip(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    manifest = round_trip(store, stream, SEG, tmp_path / "out.vhd")
    assert len(manifest.segments) >= 5
    files = sorted(os.listdir(tmp_path / "img.segments"))
    assert files[:2] == ["00000000.lz4", "00000000.lz4.md5"]
    doc = json.loads((tmp_path / "img.manifest.json").read_text())
    assert doc["metadata"]["sha256"] == stream.sha256
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@lz4_tool
def test_concatenated_segments_decompress_with_lz4_tool(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    manifest = upload_frames(store, stream.frames, segment_size=SEG, metadata=stream.metadata)
    whole = b"".join(store.get_segment(s.index) for s in manifest.segments)
    (tmp_path / "whole.lz4").write_bytes(whole)
    out = subprocess.run(
        ["lz4", "-d", "-c", str(tmp_path / "whole.lz4")], check=True, capture_output=True
    ).stdout
    assert out == stream.raw
    # and each segment alone, since segments hold whole frames
    one = subprocess.run(
        ["lz4", "-d", "-c", str(tmp_path / "img.segments" / "00000002.lz4")], check=True, capture_output=True
    ).stdout
    assert len(one) > 0 and one in stream.raw


def test_resume_uploads_only_missing_segments(tmp_path: Path, stream: ImageStream) -> None:
    total, again = resume_after_failure(
        lambda: store_at(tmp_path), stream, SEG, tmp_path / "out.vhd", fail_after=3
    )
    assert again == total - 3


def test_rerun_of_complete_upload_uploads_nothing(tmp_path: Path, stream: ImageStream) -> None:
    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    counting = CountingStore(store_at(tmp_path))
    stats = UploadStats()
    upload_frames(counting, stream.frames, segment_size=SEG, metadata=stream.metadata, stats=stats)
    assert counting.puts == [] and stats.uploaded_segments == 0 and stats.skipped_segments > 0


def test_changed_segment_is_uploaded_again(tmp_path: Path, stream: ImageStream) -> None:
    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    other = ImageStream(seed=12, chunks=40, chunk_size=128 * 1024)
    counting = CountingStore(store_at(tmp_path))
    upload_frames(counting, other.frames, segment_size=SEG, metadata=other.metadata)
    assert counting.puts  # different bytes: not skipped
    restore(store_at(tmp_path), tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == other.raw


def test_corrupted_segment_is_an_integrity_error(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    upload_frames(store, stream.frames, segment_size=SEG, metadata=stream.metadata)

    def overwrite(index: int) -> None:
        path = tmp_path / "img.segments" / f"{index:08d}.lz4"
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))

    corrupted_segment_detected(store, tmp_path / "out.vhd", overwrite)


def test_wrong_sha256_is_an_integrity_error_and_output_removed(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    meta = dict(stream.metadata, sha256="0" * 64)
    upload_frames(store, stream.frames, segment_size=SEG, metadata=meta)
    out = tmp_path / "out.vhd"
    out.write_bytes(b"previous")
    with pytest.raises(IntegrityError, match="SHA-256"):
        restore(store, out, overwrite=True)
    assert out.read_bytes() == b"previous"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.manifest.json", "img.segments", "out.vhd"]


def test_not_a_vhdcore_image(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.put_segment(0, b"x", hashlib.md5(b"x").hexdigest())
    store.put_manifest([SegmentInfo(0, 1, hashlib.md5(b"x").hexdigest())], {"owner": "someone"})
    with pytest.raises(StoreError, match="not a vhdcore image"):
        restore(store, tmp_path / "out.vhd")
    (tmp_path / "img.manifest.json").write_text('{"hello": 1}')
    with pytest.raises(StoreError, match="not a vhdcore image manifest"):
        restore(store, tmp_path / "out.vhd")
    assert not (tmp_path / "out.vhd").exists()


def test_missing_directory_and_image(tmp_path: Path, stream: ImageStream) -> None:
    gone = open_store(f"file://{tmp_path}/nope/img")
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        upload_frames(gone, stream.frames, segment_size=SEG, metadata=stream.metadata)
    with pytest.raises(StoreNotFoundError):
        restore(f"file://{tmp_path}/nope/img", tmp_path / "out.vhd")
    with pytest.raises(StoreNotFoundError, match="no image manifest"):
        restore(f"file://{tmp_path}/img", tmp_path / "out.vhd")


def test_delete(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    upload_frames(store, stream.frames, segment_size=SEG, metadata=stream.metadata)
    store.delete()
    assert os.listdir(tmp_path) == []
    store.delete()  # nothing left: no error
    with pytest.raises(StoreNotFoundError):
        store.get_manifest()


def test_restore_raw(tmp_path: Path) -> None:
    disk = pytest.importorskip("vhdcore.disk")
    if not hasattr(disk, "vhd_to_raw") or not hasattr(disk, "create_dynamic"):
        pytest.skip("vhdcore.disk.vhd_to_raw is not there yet")
    import random

    size = 8 * MiB
    src = tmp_path / "src.vhd"
    expected = bytearray(size)
    rng = random.Random(4)
    with disk.create_dynamic(src, size) as vhd:
        for sector in (0, 7, 5000, 16383 - 8):
            data = rng.randbytes(8 * 512)
            vhd.write_sectors(sector, data)
            expected[sector * 512 : sector * 512 + len(data)] = data
        vhd.flush()
    vhd_bytes = src.read_bytes()
    chunks = [vhd_bytes[i : i + 1 * MiB] for i in range(0, len(vhd_bytes), 1 * MiB)]
    meta = image_metadata(
        sha256=hashlib.sha256(vhd_bytes).hexdigest(), stream_size=len(vhd_bytes), virtual_size=size
    )
    store = store_at(tmp_path)
    upload_frames(store, [compress_frame(c) for c in chunks], segment_size=SEG, metadata=meta)
    restore(store, tmp_path / "disk.raw", format="raw")
    assert (tmp_path / "disk.raw").read_bytes() == bytes(expected)
    restore(store, tmp_path / "disk.vhd", format="vhd")
    assert (tmp_path / "disk.vhd").read_bytes() == vhd_bytes
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_restore_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        restore(f"file://{tmp_path}/img", tmp_path / "o", format="qcow2")
    with pytest.raises(ValueError):
        restore(f"file://{tmp_path}/img", tmp_path / "o", concurrency=0)


def test_restore_progress(tmp_path: Path, stream: ImageStream) -> None:
    store = store_at(tmp_path)
    upload_frames(store, stream.frames, segment_size=SEG, metadata=stream.metadata)
    seen = []
    restore(
        store, tmp_path / "out.vhd", concurrency=3, progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (len(stream.raw), len(stream.raw))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- packing and the segment uploader -------------------------------------------------------------
def test_pack_segments_keeps_frames_whole() -> None:
    frames = [b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 150, b"e" * 10, b"f" * 100]
    packed = list(pack_segments(frames, 100))
    assert packed == [
        (0, b"a" * 40 + b"b" * 40),
        (1, b"c" * 40),
        (2, b"d" * 150),  # larger than a segment: alone
        (3, b"e" * 10),
        (4, b"f" * 100),
    ]
    assert list(pack_segments(frames, 100, first_index=1))[0][0] == 1
    assert list(pack_segments([], 100)) == []
    with pytest.raises(ValueError):
        list(pack_segments(frames, 0))


def test_pack_segments_is_deterministic(stream: ImageStream) -> None:
    a = [(i, hashlib.md5(d).hexdigest()) for i, d in pack_segments(stream.frames, SEG)]
    b = [(i, hashlib.md5(d).hexdigest()) for i, d in pack_segments(iter(list(stream.frames)), SEG)]
    assert a == b
    assert all(len(d) <= SEG for _, d in pack_segments(stream.frames, SEG))


def test_packer_frames_are_the_joined_segment() -> None:
    """``flush_frames`` closes the same segments as ``flush``, as the frames
    themselves (the same objects, not copies)."""
    frames = [bytes([i]) * (10 + 7 * i) for i in range(12)]
    a, b = SegmentPacker(100), SegmentPacker(100)
    joined, listed = [], []
    for i, f in enumerate(frames):
        if a.pending_bytes and a.pending_bytes + len(f) > 100:
            joined.append(a.flush(i))
            listed.append(b.flush_frames(i))
        a.add(i, f)
        b.add(i, f)
    joined.append(a.flush(len(frames)))
    listed.append(b.flush_frames(len(frames)))
    assert [(i, first, n, d) for i, first, n, d in joined] == \
        [(i, first, n, fl.tobytes()) for i, first, n, fl in listed]
    assert all(len(fl) == len(fl.tobytes()) for *_, fl in listed)
    assert all(p is frames[k] for _, first, _, fl in listed for k, p in enumerate(fl, first))


def test_writes_of_a_list_of_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_io.pwrite_all`` of a list writes the buffers back to back, with
    more buffers than one ``pwritev`` takes and through short writes; under
    the fault injector it is one operation."""
    from vhdcore import _io

    parts = [bytes([i % 251]) * (i % 5) for i in range(2500)] + [memoryview(b"xyz"), bytearray(b"q")]
    want = b"".join(bytes(p) for p in parts)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        _io.pwrite_all(fd, parts, 5)
        assert path.read_bytes() == bytes(5) + want
        real = os.pwritev
        calls = []

        def short(fd: int, bufs: list, offset: int) -> int:  # at most 7 bytes a call
            calls.append(len(bufs))
            out = b"".join(bytes(b) for b in bufs)[:7]
            return real(fd, [out], offset)

        monkeypatch.setattr(_io.os, "pwritev", short)
        os.ftruncate(fd, 0)
        _io.pwrite_all(fd, parts, 0)
        assert path.read_bytes() == want
        assert max(calls) <= 1024 and len(calls) >= len(want) // 7
        monkeypatch.setattr(_io.os, "pwritev", real)
        with _io.inject(_io.FaultPlan(at=0)) as plan:
            _io.pwrite_all(fd, parts, 0)
        assert plan.ops == ["pwrite"]
    finally:
        os.close(fd)


def test_frame_reader_reads_the_frames_in_order() -> None:
    from vhdcore.store.base import FrameReader

    parts = [b"abc", b"", bytearray(b"defgh"), memoryview(b"ij")]
    r = FrameReader(FrameList(parts))
    assert len(r) == 10
    got = []
    while chunk := r.read(4):
        assert 0 < len(chunk) <= 4
        got.append(bytes(chunk))
    assert b"".join(got) == b"abcdefghij" and r.tell() == 10
    assert r.read() == b""
    assert r.seek(0) == 0 and bytes(r.read()) == b"abc" and bytes(r.read(100)) == b"defgh"
    assert r.seek(4) == 4 and bytes(r.read(3)) == b"efg" and r.tell() == 7
    assert r.seek(-2, 2) == 8 and bytes(r.read()) == b"ij"
    assert r.seek(-5, 1) == 5 and bytes(r.read(1)) == b"f"
    with pytest.raises(OSError):
        r.seek(-1)


def test_a_retried_segment_is_sent_whole_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swift gets a fresh reader over the frames for every attempt: an
    attempt that read the body and then failed does not leave the next one
    an exhausted reader."""
    from swiftclient.exceptions import ClientException

    from vhdcore.store.retry import RetryPolicy
    from vhdcore.store.swift import SwiftStore

    frames = [b"a" * 5000, b"b" * 3000, b"c" * 7]
    joined = b"".join(frames)
    md5 = hashlib.md5(joined).hexdigest()
    bodies: list[bytes] = []

    class Conn:
        def put_object(self, container, obj, contents, content_length, etag, content_type):
            got = b"".join(bytes(c) for c in iter(lambda: contents.read(1024), b""))
            bodies.append(got)
            assert content_length == len(joined)
            if len(bodies) == 1:
                raise ClientException("busy", http_status=503)
            return hashlib.md5(got).hexdigest()

    s = SwiftStore("c", "img", retry=RetryPolicy(attempts=3, initial_delay=0.0, jitter=0.0),
                   auth_url="http://127.0.0.1:9/auth/v1.0", user="u", key="k")
    monkeypatch.setattr(s, "_conn", lambda: Conn())
    monkeypatch.setattr(s, "_ensure_segment_container", lambda: None)
    assert s.put_segment(0, FrameList(frames), md5) == md5
    assert bodies == [joined, joined]


def test_segment_as_frames_is_stored_like_its_bytes(tmp_path: Path) -> None:
    """A segment handed over as a FrameList is stored, and MD5'd by the
    uploader, exactly as the joined bytes would be."""
    frames = [compress_frame(os.urandom(3000) + bytes(5000)) for _ in range(5)]
    joined = b"".join(frames)
    md5 = hashlib.md5(joined).hexdigest()
    store = DirectoryStore(tmp_path, "img", durable=False)
    store.prepare_write()
    with SegmentUploader(store, concurrency=2) as up:
        up.submit(0, FrameList(frames))
        got = up.wait()
    assert got == [SegmentInfo(0, len(joined), md5)]
    assert store.get_segment(0) == joined


def test_spill_segment_reads_back_what_was_appended(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment packed into a scratch file: its length, its chunks and a
    reader give back the appended bytes; nothing named is left in the
    directory, and close frees it."""
    from vhdcore.store import SpillSegment
    from vhdcore.store.base import segment_body, segment_parts

    monkeypatch.setattr(SpillSegment, "CHUNK", 4)
    parts = [b"abc", b"", bytearray(b"defgh"), memoryview(b"ij")]
    seg = spill_segment(parts, tmp_path)
    assert len(seg) == 10 and list(tmp_path.iterdir()) == []
    assert [bytes(c) for c in segment_parts(seg)] == [b"abcd", b"efgh", b"ij"]
    assert seg.tobytes() == b"abcdefghij"
    r = segment_body(seg)
    assert len(r) == 10  # type: ignore[arg-type]
    got = []
    while chunk := r.read(3):
        assert 0 < len(chunk) <= 3
        got.append(bytes(chunk))
    assert b"".join(got) == b"abcdefghij" and r.tell() == 10 and r.read() == b""
    assert r.seek(0) == 0 and r.read() == b"abcd"  # capped at a chunk
    assert r.seek(-2, 2) == 8 and r.read(100) == b"ij"
    assert r.seek(-5, 1) == 5 and r.read(1) == b"f"
    with pytest.raises(OSError):
        r.seek(-1)
    r2 = segment_body(seg)  # a fresh reader per attempt, a position of its own
    assert r2.tell() == 0 and r2.read(2) == b"ab"
    seg.close()
    assert seg.closed


def test_spill_segment_failures_are_upload_errors(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No scratch directory, or a full disk while packing: UploadError
    naming the directory, not a bare OSError."""
    import errno

    from vhdcore import _io
    from vhdcore.store import SpillSegment

    with pytest.raises(UploadError, match="no scratch file"):
        SpillSegment(str(tmp_path / "missing"))
    seg = SpillSegment(str(tmp_path))
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        seg.append(b"abc")  # scratch, not user data: no operation for the fault plan
    assert plan.ops == []

    def full(fd: int, data: object, off: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(UploadError, match=str(tmp_path)):
        seg.append(b"def")
    monkeypatch.undo()
    assert len(seg) == 3 and seg.tobytes() == b"abc"
    seg.close()


def test_spilled_segment_is_stored_like_its_bytes(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment handed over as its scratch file is MD5'd by the uploader
    and stored exactly as the joined bytes would be; the uploader closes it
    once stored, and after a failed store too."""
    from vhdcore.store import SpillSegment

    monkeypatch.setattr(SpillSegment, "CHUNK", 1000)
    frames = [compress_frame(os.urandom(3000) + bytes(5000)) for _ in range(5)]
    joined = b"".join(frames)
    md5 = hashlib.md5(joined).hexdigest()
    store = DirectoryStore(tmp_path / "d", "img", durable=False)
    store.prepare_write()
    seg = spill_segment(frames)
    with SegmentUploader(store, concurrency=2) as up:
        up.submit(0, seg)
        got = up.wait()
    assert got == [SegmentInfo(0, len(joined), md5)]
    assert store.get_segment(0) == joined
    assert seg.closed

    class Failing(DirectoryStore):
        def put_segment(self, index, data, md5_hex):  # type: ignore[no-untyped-def]
            raise UploadError("refused")

    bad = Failing(tmp_path / "e", "img", durable=False)
    bad.prepare_write()
    seg2 = spill_segment(frames)
    with pytest.raises(UploadError):
        with SegmentUploader(bad, concurrency=1) as up:
            up.submit(0, seg2)
            up.wait()
            up.finish({})
    assert seg2.closed


def test_packer_spills_segments_to_scratch(tmp_path: Path) -> None:
    """With spill, the packer keeps no frame: each segment is handed on as
    its scratch file, numbered and cut exactly as without."""
    from vhdcore.store import SpillSegment

    rng = np.random.default_rng(4)
    frames = [bytes(rng.integers(0, 256, int(n), dtype=np.uint8))
              for n in rng.integers(1, 5000, 60)]
    plain, spill = SegmentPacker(12000), SegmentPacker(12000, spill_dir=str(tmp_path))
    a, b = [], []
    for i, f in enumerate(frames):
        for packer, out in ((plain, a), (spill, b)):
            done = packer.flush_frames(i) if packer.pending_bytes + len(f) > 12000 and \
                packer.pending_bytes else None
            if done is not None:
                out.append(done)
            packer.add(i, f)
            assert not packer._parts or packer is plain
    a.append(plain.flush_frames(len(frames)))
    b.append(spill.flush_frames(len(frames)))
    assert len(a) == len(b) > 3
    for (i1, f1, c1, d1), (i2, f2, c2, d2) in zip(a, b):
        assert isinstance(d2, SpillSegment)
        assert (i1, f1, c1) == (i2, f2, c2) and d1.tobytes() == d2.tobytes()
        d2.close()
    spill.add(len(frames), b"x" * 10)
    open_seg = spill._spilled
    spill.discard()
    assert open_seg is not None and open_seg.closed and spill.pending_bytes == 0


def test_head_segment_uploaded_last(tmp_path: Path, stream: ImageStream) -> None:
    """The imaging pipeline's order: body segments 1..n first, the head (segment 0) at the end."""
    store = CountingStore(store_at(tmp_path))
    head = compress_frame(b"HEAD" * 1000)
    body = pack_segments(stream.frames, SEG, first_index=1)
    raw = b"HEAD" * 1000 + stream.raw
    meta = image_metadata(sha256=hashlib.sha256(raw).hexdigest(), stream_size=len(raw))
    with SegmentUploader(store, concurrency=3, max_pending=2) as up:
        for index, data in body:
            up.submit(index, data)
        up.wait()
        up.submit(0, head)
        manifest = up.finish(meta)
    assert store.puts[-1] == 0
    restore(store, tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == raw
    assert manifest.segments[0].size == len(head)


def test_uploader_rejects_gaps_and_duplicates(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    with SegmentUploader(store) as up:
        up.submit(0, compress_frame(b"a"))
        with pytest.raises(ValueError, match="already submitted"):
            up.submit(0, compress_frame(b"a"))
        up.submit(2, compress_frame(b"c"))
        with pytest.raises(UploadError, match="segment 1 is missing"):
            up.finish({"sha256": "0" * 64, "stream-size": "2"})
    with pytest.raises(StoreNotFoundError):
        store.get_manifest()


def test_uploader_bounds_memory_and_uses_threads(tmp_path: Path) -> None:
    inflight = 0
    peak = 0
    threads = set()
    lock = threading.Lock()

    class Slow(CountingStore):
        def put_segment(self, index, data, md5_hex):
            nonlocal inflight, peak
            with lock:
                inflight += 1
                peak = max(peak, inflight)
                threads.add(threading.get_ident())
            time.sleep(0.02)
            try:
                return super().put_segment(index, data, md5_hex)
            finally:
                with lock:
                    inflight -= 1

    store = Slow(store_at(tmp_path))
    up = SegmentUploader(store, concurrency=3, max_pending=4)
    submitted_ahead = []
    for i in range(20):
        up.submit(i, compress_frame(bytes([i]) * 1000))
        submitted_ahead.append(len(up._futures) - len(store.puts))
    up.wait()
    up.close()
    assert peak <= 3 and len(threads) >= 2
    assert max(submitted_ahead) <= 4 + 3  # bounded by max_pending (plus ones already done)


def test_upload_error_propagates_and_stops(tmp_path: Path, stream: ImageStream) -> None:
    store = CountingStore(store_at(tmp_path), fail_after=0)
    with pytest.raises(UploadError, match="injected failure"):
        upload_frames(store, stream.frames, segment_size=SEG, metadata=stream.metadata)


def test_progress_callback(tmp_path: Path, stream: ImageStream) -> None:
    seen = []
    upload_frames(
        store_at(tmp_path),
        stream.frames,
        segment_size=SEG,
        metadata=stream.metadata,
        progress=lambda info, uploaded: seen.append((info.index, uploaded)),
    )
    assert sorted(i for i, _ in seen) == list(range(len(seen))) and all(u for _, u in seen)


def test_metadata_rules(tmp_path: Path, stream: ImageStream) -> None:
    with pytest.raises(ValueError, match="sha256"):
        upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata={"stream-size": "1"})
    with pytest.raises(ValueError, match="metadata key"):
        upload_frames(
            store_at(tmp_path), stream.frames, segment_size=SEG, metadata=dict(stream.metadata, Bad_Key="x")
        )
    meta = image_metadata(sha256="a" * 64, stream_size=5, virtual_size=7, source_name="disk ü.vhd")
    assert (
        meta["source-name"] == "disk ü.vhd" and meta["virtual-size"] == "7" and meta["codec"] == "lz4-frames"
    )


# -- segment sizing ----------------------------------------------------------------------------
SWIFT_DEFAULTS = SegmentLimits(1, 5 * GiB, 1000)
S3_AWS = SegmentLimits(5 * MiB, 5 * GiB, 10_000)
S3_SWIFT = SegmentLimits(5 * MiB, 5 * GiB, 1000)


@pytest.mark.parametrize("limits", [SWIFT_DEFAULTS, S3_AWS, S3_SWIFT])
def test_segment_size_for_a_2_tib_disk(limits: SegmentLimits) -> None:
    chunk = 2 * MiB
    raw = 2 * 1024 * GiB
    bound = stream_bound(raw, chunk)  # incompressible worst case
    size = choose_segment_size(bound, limits)
    assert size % MiB == 0
    assert limits.min_segment_size + chunk <= size <= limits.max_segment_size
    # worst case packing: every segment short by up to one frame
    frame = bound // (raw // chunk) + 1
    worst_segments = -(-bound // (size - frame)) + 1  # plus the head segment
    assert worst_segments <= limits.max_segments


def test_segment_size_prefers_32_mib_for_small_images() -> None:
    assert choose_segment_size(10 * GiB, SWIFT_DEFAULTS) == 32 * MiB
    assert choose_segment_size(0, S3_AWS) == 32 * MiB
    assert choose_segment_size(1 * GiB, SWIFT_DEFAULTS, preferred=8 * MiB) == 8 * MiB
    # tiny minimum segment: an S3 target with a small preferred size still clears 5 MiB + a frame
    assert choose_segment_size(1 * GiB, S3_AWS, preferred=1 * MiB) >= 5 * MiB + 4 * MiB


def test_segment_size_too_large_image() -> None:
    with pytest.raises(ValueError, match="maximum segment size"):
        choose_segment_size(10 * 1024 * GiB, SWIFT_DEFAULTS)


# -- generations, leftovers, modes, the _io layer ------------------------------------------------
def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def test_no_stale_segments_after_a_smaller_image(tmp_path: Path, stream: ImageStream) -> None:
    """A second image with fewer segments over a first one, and the temporary
    files a crash leaves: after the upload only what the manifest uses is left."""
    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    small = ImageStream(seed=5, chunks=6, chunk_size=128 * 1024)
    # debris of an earlier crash: a half-written segment and manifest
    (tmp_path / "img.segments" / ".00000001.lz4.deadbeef.tmp").write_bytes(b"x")
    (tmp_path / ".img.manifest.json.deadbeef.tmp").write_bytes(b"{")
    man = upload_frames(store_at(tmp_path), small.frames, segment_size=SEG, metadata=small.metadata)
    assert len(man.segments) < len(pack_list := list(pack_segments(stream.frames, SEG)))
    assert len(_files(tmp_path)) == 2 * len(man.segments) + 1, sorted(_files(tmp_path))
    restore(store_at(tmp_path), tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == small.raw
    assert pack_list  # the first image had more segments


def test_stopped_upload_over_an_image_keeps_it(tmp_path: Path, stream: ImageStream) -> None:
    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    before = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)}
    other = ImageStream(seed=12, chunks=40, chunk_size=128 * 1024)
    with pytest.raises(UploadError):
        upload_frames(CountingStore(store_at(tmp_path), fail_after=3), other.frames,
                      segment_size=SEG, metadata=other.metadata, concurrency=1)
    for p, data in before.items():
        assert (tmp_path / p).read_bytes() == data, f"{p} of the complete image changed"
    restore(store_at(tmp_path), tmp_path / "old.vhd")
    assert (tmp_path / "old.vhd").read_bytes() == stream.raw
    # the re-run resumes the stopped upload (its 3 segments are not sent again)
    again = CountingStore(store_at(tmp_path))
    upload_frames(again, other.frames, segment_size=SEG, metadata=other.metadata)
    total = sum(1 for _ in pack_segments(other.frames, SEG))
    assert len(again.puts) == total - 3
    restore(store_at(tmp_path), tmp_path / "new.vhd")
    assert (tmp_path / "new.vhd").read_bytes() == other.raw
    assert len(_files(tmp_path)) == 2 * total + 1 + 2  # + the two restored files


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_honour_the_umask(tmp_path: Path, stream: ImageStream, umask: int) -> None:
    old = os.umask(umask)
    try:
        upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
        restore(store_at(tmp_path), tmp_path / "out.vhd")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for p in _files(tmp_path):
        assert (tmp_path / p).stat().st_mode & 0o777 == want, f"{p}: {oct((tmp_path / p).stat().st_mode)}"


def test_restore_writes_through_the_io_layer(tmp_path: Path, stream: ImageStream) -> None:
    """Restore's writes, fsyncs and rename go through vhdcore._io: a fault
    injected there fails the restore and leaves no output."""
    from vhdcore import _io

    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        restore(store_at(tmp_path), tmp_path / "counted.vhd")
    assert {"pwrite", "fsync", "replace"} <= set(plan.ops), plan.ops
    # the last operation is the directory fsync after the rename
    assert plan.ops[-2] == "replace"
    for at in (1, plan.count // 2, plan.count - 1):
        out = tmp_path / f"out{at}.vhd"
        with _io.inject(_io.FaultPlan(at=at, kind="eio")):
            with pytest.raises(OSError):
                restore(store_at(tmp_path), out)
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(f".out{at}")]


def test_delete_removes_every_generation(tmp_path: Path, stream: ImageStream) -> None:
    upload_frames(store_at(tmp_path), stream.frames, segment_size=SEG, metadata=stream.metadata)
    other = ImageStream(seed=13, chunks=20, chunk_size=128 * 1024)
    with pytest.raises(UploadError):  # a stopped re-upload: a second generation
        upload_frames(CountingStore(store_at(tmp_path), fail_after=2), other.frames,
                      segment_size=SEG, metadata=other.metadata, concurrency=1)
    assert any(p.is_dir() for p in (tmp_path / "img.segments").iterdir())
    store_at(tmp_path).delete()
    assert list(tmp_path.iterdir()) == []
