"""lz4 frame encoding of an image stream.

An image stream is stored as a sequence of *frames*.  Each frame is one
complete, independent, standard lz4 frame (``lz4.frame``): blocks are not
linked, there is no content checksum (the image as a whole is covered by a
SHA-256 in the manifest, and every segment by its MD5), and the frame records
its content size.  Because lz4 frames concatenate, the whole compressed object
-- or any segment, which always holds a whole number of frames -- decompresses
with the stock ``lz4 -d`` tool into the matching part of the raw stream.

* :func:`compress_frame` compresses one chunk into one frame.
* :class:`FrameCompressor` compresses an iterator of raw chunks on a thread
  pool (lz4 releases the GIL), in order, with a bounded number of chunks in
  flight.
* :func:`decompress_frames` decompresses a buffer of whole frames;
  :class:`StreamDecompressor` does the same for data that arrives in pieces.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import struct
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Union, cast

import lz4.frame

from .errors import IntegrityError

__all__ = [
    "CODEC",
    "FRAME_BLOCK_SIZE",
    "compress_frame",
    "frame_bound",
    "stream_bound",
    "frame_length",
    "decompress_frames",
    "decompress_frame_list",
    "FrameCompressor",
    "StreamDecompressor",
]

Buffer = Union[bytes, bytearray, memoryview]

#: the codec name recorded in an image's metadata
CODEC = "lz4-frames"

#: lz4 block size inside each frame (256 KiB decompresses fastest here)
FRAME_BLOCK_SIZE = lz4.frame.BLOCKSIZE_MAX256KB
_BLOCK_BYTES = 256 * 1024

_MAGIC = 0x184D2204
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_U32 = struct.Struct("<I")


def compress_frame(data: Buffer) -> bytes:
    """Compress ``data`` into one independent lz4 frame.

    The frame has independent blocks, no content checksum and stores the
    content size, so :func:`decompress_frames` can allocate its output at once.
    """
    frame: bytes = lz4.frame.compress(  # lz4 ships no type information
        data,
        compression_level=0,
        block_size=FRAME_BLOCK_SIZE,
        block_linked=False,
        content_checksum=False,
        block_checksum=False,
        store_size=True,
    )
    return frame


def frame_bound(raw_size: int) -> int:
    """Upper bound of the size of the frame :func:`compress_frame` makes of ``raw_size`` bytes."""
    if raw_size < 0:
        raise ValueError(f"raw_size must not be negative, got {raw_size}")
    blocks = max(1, -(-raw_size // _BLOCK_BYTES))
    # frame header (max 19) + per block: 4-byte size + worst-case expansion; end mark 4
    return 19 + 4 + raw_size + blocks * (4 + _BLOCK_BYTES // 255 + 16)


def stream_bound(raw_size: int, chunk_size: int) -> int:
    """Upper bound of the compressed size of ``raw_size`` bytes cut into ``chunk_size`` frames.

    Use it as ``expected_stream_bytes`` when choosing a segment size before the
    compressed size is known.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    full, rest = divmod(raw_size, chunk_size)
    return full * frame_bound(chunk_size) + (frame_bound(rest) if rest else 0)


def frame_length(buf: Buffer, pos: int = 0) -> int | None:
    """Length of the lz4 (or skippable) frame starting at ``buf[pos]``.

    Returns ``None`` when ``buf`` ends before the frame does.  Raises
    :class:`IntegrityError` when the bytes at ``pos`` are not an lz4 frame.
    """
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf
    end = len(mv)
    if end - pos < 4:
        return None
    magic = _U32.unpack_from(mv, pos)[0]
    if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
        if end - pos < 8:
            return None
        length = 8 + _U32.unpack_from(mv, pos + 4)[0]
        return length if end - pos >= length else None
    if magic != _MAGIC:
        raise IntegrityError(f"no lz4 frame at offset {pos}: magic number {magic:#010x}")
    if end - pos < 7:
        return None
    flg = mv[pos + 4]
    if flg >> 6 != 1:
        raise IntegrityError(f"lz4 frame at offset {pos} has unsupported version {flg >> 6}")
    block_checksum = bool(flg & 0x10)
    content_checksum = bool(flg & 0x04)
    header = 7 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
    p = pos + header
    while True:
        if end - p < 4:
            return None
        word = _U32.unpack_from(mv, p)[0]
        p += 4
        if word == 0:
            break
        p += (word & 0x7FFFFFFF) + (4 if block_checksum else 0)
    if content_checksum:
        p += 4
    if p > end:
        return None
    return p - pos


def _decompress_one(mv: memoryview, pos: int, length: int) -> bytes:
    try:
        return cast("bytes", lz4.frame.decompress(mv[pos : pos + length]))
    except RuntimeError as exc:
        raise IntegrityError(f"damaged lz4 frame at offset {pos}: {exc}") from exc


def decompress_frame_list(data: Buffer) -> list[bytes]:
    """Decompress a buffer of whole lz4 frames into one ``bytes`` per frame.

    Cheaper than :func:`decompress_frames` when the caller writes the pieces
    out anyway (no joined copy).  Raises :class:`IntegrityError` if the
    buffer is damaged or ends inside a frame.
    """
    mv = memoryview(data).cast("B")
    parts = []
    pos = 0
    end = len(mv)
    while pos < end:
        length = frame_length(mv, pos)
        if length is None:
            raise IntegrityError(f"lz4 data ends inside a frame at offset {pos} ({end - pos} bytes left)")
        if _U32.unpack_from(mv, pos)[0] == _MAGIC:
            parts.append(_decompress_one(mv, pos, length))
        pos += length
    return parts


def decompress_frames(data: Buffer) -> bytes:
    """Decompress a buffer that holds whole lz4 frames, one after another.

    Raises :class:`IntegrityError` if the buffer is damaged or ends inside a
    frame.
    """
    parts = decompress_frame_list(data)
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


class StreamDecompressor:
    """Decompress a stream of lz4 frames that arrives in pieces of any size.

    ``feed`` returns the raw bytes of every frame completed so far;
    ``finish`` checks that the stream did not stop inside a frame.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._offset = 0  # stream offset of _pending[0], for messages
        self.raw_bytes = 0
        self.compressed_bytes = 0

    def feed(self, data: Buffer) -> bytes:
        """Add compressed bytes; return the decompressed bytes of all now-complete frames."""
        self.compressed_bytes += len(data)
        if self._pending:
            self._pending += data
            buf: Buffer = self._pending
        else:
            buf = data
        mv = memoryview(buf).cast("B")
        out = []
        pos = 0
        try:
            while pos < len(mv):
                try:
                    length = frame_length(mv, pos)
                except IntegrityError as exc:
                    raise IntegrityError(f"{exc} (stream offset {self._offset + pos})") from None
                if length is None:
                    break
                if _U32.unpack_from(mv, pos)[0] == _MAGIC:
                    out.append(_decompress_one(mv, pos, length))
                pos += length
            rest = bytes(mv[pos:])
        finally:
            mv.release()
        self._offset += pos
        self._pending = bytearray(rest)
        raw = out[0] if len(out) == 1 else b"".join(out)
        self.raw_bytes += len(raw)
        return raw

    def finish(self) -> None:
        """Raise :class:`IntegrityError` if the stream ended inside a frame."""
        if self._pending:
            raise IntegrityError(
                f"lz4 stream ends inside a frame at offset {self._offset} "
                f"({len(self._pending)} bytes left over)"
            )


class FrameCompressor:
    """Compress raw chunks into frames on a thread pool, preserving order.

    ``threads`` defaults to ``os.cpu_count()``; at most ``max_in_flight``
    chunks (default ``2 * threads``) are held at once, so memory stays bounded
    however long the input is.  Each chunk must stay unchanged until its frame
    has been yielded (a caller that reuses buffers should reuse at most
    ``max_in_flight + 1`` of them in rotation).

    Use as a context manager, or call :meth:`close`::

        with FrameCompressor(threads=2) as fc:
            for frame in fc.compress(chunks):
                ...
    """

    def __init__(self, threads: int | None = None, max_in_flight: int | None = None,
                 compress: Callable[[Buffer], bytes] | None = None) -> None:
        self.threads = int(threads or os.cpu_count() or 1)
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.max_in_flight = int(max_in_flight or 2 * self.threads)
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        #: the function that makes one frame (:func:`compress_frame`)
        self.compress_one = compress or compress_frame
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="vhdcore-lz4"
                )
            return self._pool

    def compress(self, chunks: Iterable[Buffer]) -> Iterator[bytes]:
        """Yield one frame per chunk of ``chunks``, in order."""
        for frame in self.compress_optional(chunks):
            assert frame is not None
            yield frame

    def compress_optional(self, chunks: Iterable[Buffer | None]
                          ) -> Generator[bytes | None, None, None]:
        """Like :meth:`compress`, but a ``None`` chunk passes through as
        ``None`` in its place (a frame the caller does not need again, e.g.
        one a resumed upload already stored)."""
        if self.threads == 1:
            for chunk in chunks:
                yield None if chunk is None else self.compress_one(chunk)
            return
        pool = self._executor()
        window: collections.deque[concurrent.futures.Future[bytes] | None] = collections.deque()
        try:
            for chunk in chunks:
                if len(window) >= self.max_in_flight:
                    head = window.popleft()
                    yield None if head is None else head.result()
                window.append(None if chunk is None else pool.submit(self.compress_one, chunk))
            while window:
                head = window.popleft()
                yield None if head is None else head.result()
        finally:
            for fut in window:
                if fut is not None:
                    fut.cancel()

    def close(self) -> None:
        """Shut the thread pool down."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FrameCompressor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
