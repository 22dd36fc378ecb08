"""lz4 frame encoding: independent frames, parallel compression, (streaming) decompression."""

from __future__ import annotations

import random
import subprocess
import threading

import lz4.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _swift import disk_like_chunk, lz4_tool
from vhdcore.compress import (
    CODEC,
    FrameCompressor,
    StreamDecompressor,
    compress_frame,
    decompress_frames,
    frame_bound,
    frame_length,
    stream_bound,
)
from vhdcore.errors import IntegrityError


@pytest.fixture(scope="module")
def chunks() -> list[bytes]:
    rng = random.Random(7)
    return [disk_like_chunk(rng, rng.randint(1, 300_000)) for _ in range(24)] + [b""]


def test_codec_name() -> None:
    assert CODEC == "lz4-frames"


def test_frame_is_independent_sized_and_unchecksummed() -> None:
    frame = compress_frame(b"vhd" * 100_000)
    assert frame[:4] == b"\x04\x22\x4d\x18"
    flg = frame[4]
    assert flg >> 6 == 1  # version
    assert flg & 0x20  # blocks independent
    assert flg & 0x08  # content size stored
    assert not flg & 0x04  # no content checksum
    assert int.from_bytes(frame[6:14], "little") == 300_000
    assert frame_length(frame) == len(frame)


def test_round_trip_concatenated(chunks: list[bytes]) -> None:
    frames = [compress_frame(c) for c in chunks]
    assert decompress_frames(b"".join(frames)) == b"".join(chunks)
    assert decompress_frames(memoryview(b"".join(frames))) == b"".join(chunks)
    assert decompress_frames(b"") == b""


def test_compressor_preserves_order_with_threads(chunks: list[bytes]) -> None:
    with FrameCompressor(threads=2) as fc:
        frames = list(fc.compress(chunks))
    assert frames == [compress_frame(c) for c in chunks]
    with FrameCompressor(threads=1) as fc:
        assert list(fc.compress(chunks)) == frames


def test_compressor_default_threads() -> None:
    import os

    fc = FrameCompressor()
    assert fc.threads == (os.cpu_count() or 1)
    assert fc.max_in_flight == 2 * fc.threads
    fc.close()
    with pytest.raises(ValueError):
        FrameCompressor(threads=2, max_in_flight=-1)


def test_compressor_bounds_chunks_in_flight() -> None:
    consumed = 0
    yielded = 0
    peak = 0
    lock = threading.Lock()

    def source():
        nonlocal consumed, peak
        for i in range(200):
            with lock:
                consumed += 1
                peak = max(peak, consumed - yielded)
            yield bytes([i % 256]) * 50_000

    with FrameCompressor(threads=2, max_in_flight=3) as fc:
        for _ in fc.compress(source()):
            yielded += 1
    assert yielded == 200
    assert peak <= 3 + 1


def test_compressor_stops_cleanly_when_abandoned() -> None:
    with FrameCompressor(threads=2) as fc:
        gen = fc.compress(bytes(100_000) for _ in range(1000))
        next(gen)
        gen.close()


@lz4_tool
def test_stock_lz4_tool_decompresses_concatenated_frames(chunks: list[bytes], tmp_path) -> None:
    path = tmp_path / "stream.lz4"
    with FrameCompressor(threads=2) as fc:
        path.write_bytes(b"".join(fc.compress(chunks)))
    out = subprocess.run(["lz4", "-d", "-c", str(path)], check=True, capture_output=True).stdout
    assert out == b"".join(chunks)


@lz4_tool
def test_frames_made_by_lz4_tool_decompress(tmp_path) -> None:
    """Standard frames with linked blocks and checksums, as the CLI writes them."""
    data = disk_like_chunk(random.Random(3), 1_000_000)
    (tmp_path / "a").write_bytes(data)
    frame = subprocess.run(
        ["lz4", "-c", "-BD", "--content-size", str(tmp_path / "a")], check=True, capture_output=True
    ).stdout
    assert decompress_frames(frame + frame) == data + data
    sd = StreamDecompressor()
    assert sd.feed(frame[:1000]) == b""
    assert sd.feed(frame[1000:]) == data
    sd.finish()


def test_skippable_frames_are_skipped() -> None:
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    frame = compress_frame(b"abc")
    assert decompress_frames(skippable + frame + skippable) == b"abc"


def test_truncated_stream_is_an_integrity_error(chunks: list[bytes]) -> None:
    data = b"".join(compress_frame(c) for c in chunks[:3])
    with pytest.raises(IntegrityError, match="ends inside a frame"):
        decompress_frames(data[:-1])
    sd = StreamDecompressor()
    sd.feed(data[:-1])
    with pytest.raises(IntegrityError, match="inside a frame"):
        sd.finish()


def test_garbage_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="no lz4 frame at offset 0"):
        decompress_frames(b"this is not lz4 at all")
    frame = bytearray(compress_frame(disk_like_chunk(random.Random(1), 100_000)))
    frame[15:19] = (0x3FFFFF).to_bytes(4, "little")  # damage the first block's size
    with pytest.raises(IntegrityError):
        decompress_frames(bytes(frame))
    # lz4 has no checksum over block contents here: damaged payloads are caught by the
    # segment MD5 and the stream SHA-256 (see the store tests)
    with pytest.raises(IntegrityError, match="stream offset"):
        StreamDecompressor().feed(b"\x00" * 16)


def test_frame_length_of_partial_frames() -> None:
    frame = compress_frame(bytes(range(256)) * 4000)
    for cut in (0, 3, 6, 10, len(frame) - 1):
        assert frame_length(frame[:cut]) is None
    assert frame_length(frame + b"xx") == len(frame)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 50_000), min_size=1, max_size=20),
    seed=st.integers(0, 1000),
)
def test_stream_decompressor_any_piece_sizes(sizes: list[int], cuts: list[int], seed: int) -> None:
    rng = random.Random(seed)
    raw = [disk_like_chunk(rng, n) for n in sizes]
    data = b"".join(compress_frame(c) for c in raw)
    sd = StreamDecompressor()
    out = []
    pos = 0
    for cut in cuts:
        out.append(sd.feed(data[pos : pos + cut]))
        pos += cut
    out.append(sd.feed(data[pos:]))
    sd.finish()
    assert b"".join(out) == b"".join(raw)
    assert sd.raw_bytes == sum(sizes) and sd.compressed_bytes == len(data)


def test_bounds_hold_for_incompressible_data() -> None:
    rng = random.Random(5)
    for n in (0, 1, 1000, 262_144, 262_145, 2 * 1024 * 1024):
        data = rng.randbytes(n)
        assert len(compress_frame(data)) <= frame_bound(n)
        # lz4's own bound for one block, plus frame overhead, is the reference
        assert frame_bound(n) >= lz4.frame.compress(data, store_size=True).__len__()
    assert stream_bound(10 * 2**20, 2**20) == 10 * frame_bound(2**20)
    assert stream_bound(10 * 2**20 + 5, 2**20) == 10 * frame_bound(2**20) + frame_bound(5)
