"""The stages of the image stream, each a small object that can be used and
tested alone:

:class:`StreamSource` (read/merge)
    Produces the uncompressed stream in order as numbered frames: the head
    (footer copy, dynamic header, BAT), one frame per planned block (merged
    once through the chain by :func:`~vhdcore.coalesce.iter_image_blocks`'s
    threads, with the filesystem map applied) and the footer; keeps the
    SHA-256 of the stream and an xxh3 per frame.
:class:`~vhdcore.compress.FrameCompressor` (compress)
    The ordered lz4 window on a thread pool; a frame of a segment that a
    resumed job already stored passes through as ``None``.
:class:`SegmentSink` (pack segments, upload, commit)
    Packs frames into segments (:class:`~vhdcore.store.SegmentPacker`),
    adopts the segments an earlier run stored, hands the others to the
    :class:`~vhdcore.store.SegmentUploader` (its upload threads and bounded
    queue) and records every stored segment in the job state.

The queues between them are bounded: the merge window of the source, the
compressor's frames in flight, one open segment and the uploader's pending
segments -- so memory does not grow with the disk.
"""
from __future__ import annotations

import bisect
import hashlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from ..chain import Chain
from ..ops.stream import FreeMap, iter_image_blocks
from ..errors import IntegrityError, JobStateError
from ..store import SegmentPacker, SegmentUploader
from ..store.base import Buffer, FrameList, SegmentInfo, SpillSegment

__all__ = ["RawFrame", "StreamHasher", "StreamSource", "SegmentSink", "segments_digest"]


@dataclass
class RawFrame:
    """One frame of the uncompressed stream: its number (0 = head), size,
    xxh3 (-1 until hashed) and the block rank it holds (-1 for head and
    footer)."""

    index: int
    size: int
    xxh3: int
    rank: int


def segments_digest(frame_digests: list[int]) -> str:
    """The xxh3 a segment record carries: over its frames' xxh3 values."""
    h = xxhash.xxh3_64()
    for d in frame_digests:
        h.update(d.to_bytes(8, "little"))
    return h.hexdigest()


class StreamHasher:
    """The SHA-256 of the stream and each frame's xxh3, on a thread of its
    own (hashlib releases the GIL), fed in order through a bounded queue:
    the digests keep pace beside the compressor instead of in front of it.
    :meth:`wait_for` blocks until a frame is hashed (its ``xxh3`` set)."""

    def __init__(self, depth: int = 8) -> None:
        self.sha = hashlib.sha256()
        self._q: queue.Queue[tuple[RawFrame, Buffer] | None] = queue.Queue(maxsize=depth)
        self._cond = threading.Condition()
        self._done = 0  # frames [0, _done) are hashed
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vhdcore-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                meta, raw = item
                self.sha.update(raw)
                meta.xxh3 = xxhash.xxh3_64_intdigest(raw)
                with self._cond:
                    self._done = meta.index + 1
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the waiting side
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def put(self, meta: RawFrame, raw: Buffer) -> None:
        """Queue frame ``meta.index`` (frames come in order)."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._q.put((meta, raw), timeout=0.5)
                return
            except queue.Full:
                continue

    def hashed(self) -> int:
        """How many frames are hashed (frames ``[0, hashed())``)."""
        return self._done

    def wait_for(self, index: int) -> None:
        """Block until frame ``index`` is hashed."""
        with self._cond:
            while self._done <= index:
                if self._error is not None:
                    raise self._error
                if not self._thread.is_alive():
                    raise RuntimeError("the stream hasher stopped")
                self._cond.wait(0.5)

    def close(self) -> None:
        """Stop the thread once the queued frames are hashed."""
        if not self._closed:
            self._closed = True
            while True:
                try:
                    self._q.put(None, timeout=0.5)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
        if self._error is not None:
            raise self._error


class StreamSource:
    """The stream's frames in order (see the module docstring).  Iterate
    :meth:`frames`; each yields ``bytes`` (or ``None`` for a frame the caller
    says it does not need, see ``wanted``) and appends its :class:`RawFrame`
    to :attr:`meta`, which the consumer pops in the same order.  The
    SHA-256 (:attr:`sha`, complete after :meth:`close`) and each frame's
    xxh3 are computed by a :class:`StreamHasher`."""

    def __init__(self, chain: Chain, stored: list[int], head: bytes, tail: bytes, *,
                 threads: int = 2, free_map: FreeMap | None = None) -> None:
        self.chain = chain
        self.stored = stored
        self.head = head
        self.tail = tail
        self.threads = threads
        self.free_map = free_map
        self.hasher = StreamHasher(depth=max(4, 2 * threads))
        self.sha = self.hasher.sha
        self.bytes_read = 0
        self.meta: deque[RawFrame] = deque()
        #: frames whose buffers come back to the merge's pool on release
        self._held: deque[tuple[int, Callable[[], None]]] = deque()

    @property
    def nframes(self) -> int:
        return len(self.stored) + 2

    def _blocks(self) -> Iterator[tuple[Buffer, int, Callable[[], None] | None]]:
        stored, chain = self.stored, self.chain
        rank = 0
        # each frame is merged straight into a buffer of its own (bitmap and
        # data adjacent: no join) and held until :meth:`release`
        for blk in iter_image_blocks(chain, threads=self.threads, blocks=stored,
                                     free_map=self.free_map, frames=True):
            if rank >= len(stored) or blk.index != stored[rank]:
                want = stored[rank] if rank < len(stored) else "none"
                raise IntegrityError(f"block {blk.index} of {chain.leaf.path} appeared where "
                                     f"the plan has block {want}: the chain changed")
            assert blk.frame is not None
            yield blk.frame, rank, blk.hold()
            rank += 1
        if rank != len(stored):
            raise IntegrityError(f"{chain.leaf.path}: {len(stored) - rank} planned blocks "
                                 "now read as empty: the chain changed during imaging")

    def _raw(self) -> Iterator[tuple[Buffer, int, Callable[[], None] | None]]:
        yield self.head, -1, None
        yield from self._blocks()
        yield self.tail, -1, None

    def frames(self, wanted: Callable[[int], bool] | None = None) -> Iterator[Buffer | None]:
        """The frames' bytes in order; ``None`` where ``wanted(index)`` is
        False (the frame is still read and hashed).  A frame's buffer is
        reused once the consumer calls :meth:`release` with its index, after
        the frame was compressed; without releases the merge takes a new
        buffer for every frame."""
        for index, (raw, rank, give_back) in enumerate(self._raw()):
            meta = RawFrame(index, len(raw), -1, rank)
            if give_back is not None:
                self._held.append((index, give_back))
            self.hasher.put(meta, raw)
            self.bytes_read += len(raw)
            self.meta.append(meta)
            yield raw if wanted is None or wanted(index) else None

    def release(self, index: int) -> None:
        """The consumer is done with frames up to ``index``: their buffers
        go back to the merge once the hasher is done with them too (checked
        here, without waiting: one the hasher has not reached yet goes back
        at a later call, and the merge takes a fresh buffer meanwhile; the
        hasher's queue bounds how many that can be)."""
        held, hashed = self._held, self.hasher.hashed
        while held and held[0][0] <= index and held[0][0] < hashed():
            held.popleft()[1]()

    def close(self) -> None:
        """Finish hashing (:attr:`sha` is then the stream's digest)."""
        self.hasher.close()


class SegmentSink:
    """Packs compressed frames into segments and stores them (see the module
    docstring).  ``records`` is the job state's segment table (segment
    number as a string -> first frame, count, size, ETag, xxh3), updated as
    uploads finish; ``reusable`` maps a first frame to the record of a
    segment an earlier run stored that the store still has."""

    def __init__(self, uploader: SegmentUploader, segment_size: int,
                 records: dict[str, dict[str, Any]], lock: threading.Lock, *,
                 reusable: dict[int, tuple[int, dict[str, Any]]] | None = None,
                 existing: dict[int, SegmentInfo] | None = None,
                 gate: Callable[[int], None] | None = None, where: str = "",
                 spill_dir: str | None = None) -> None:
        self.uploader = uploader
        # with spill_dir, segments go to scratch files there, not to memory
        self.packer = SegmentPacker(segment_size, spill_dir=spill_dir)
        self.records = records
        self.lock = lock
        self.reusable = reusable or {}
        self.existing = existing or {}
        self.gate = gate
        self.where = where
        self._pending: dict[int, tuple[int, int, str]] = {}
        self._frames: list[RawFrame] = []  # the open (or skipped) segment's frames
        #: waits until a frame's xxh3 is known (StreamHasher.wait_for)
        self.hashed: Callable[[int], None] = lambda index: None
        self._skip_until = -1
        self._skip: tuple[int, dict[str, Any]] | None = None
        self._starts = sorted(self.reusable)
        self._ends = [f + int(self.reusable[f][1]["count"]) for f in self._starts]

    def wanted(self, index: int) -> bool:
        """False for a frame inside a segment the store already has."""
        i = bisect.bisect_right(self._starts, index) - 1
        return i < 0 or index >= self._ends[i]

    def on_uploaded(self, info: SegmentInfo, uploaded: bool) -> None:
        """The uploader's progress callback (upload threads)."""
        with self.lock:
            first, count, digest = self._pending.pop(info.index)
            self.records[str(info.index)] = {"first": first, "count": count, "size": info.size,
                                             "etag": info.etag, "xxh3": digest}

    def take(self, meta: Any, frame: bytes | None) -> bool:
        """Take frame ``meta.index`` (``None`` when it belongs to a stored
        segment).  True when a segment was handed on."""
        index = meta.index
        sent = False
        if index in self.reusable:
            # the segment holding frames [first, first+count) is in the store
            sent = self._send(self.packer.flush_frames(index))
            k, rec = self.reusable[index]
            if k != self.packer.index:
                raise JobStateError(f"{self.where}: segment {k} recorded at frame {index} "
                                    f"but this run numbers it {self.packer.index}")
            self.packer.skip(index, int(rec["count"]))
            self._skip_until = index + int(rec["count"])
            self._skip = (k, rec)
            self._frames = []
        if index < self._skip_until:
            self._frames.append(meta)
            if index == self._skip_until - 1:
                self._adopt()
            return sent
        assert frame is not None
        if self.packer.pending_bytes and self.packer.pending_bytes + len(frame) > \
                self.packer.segment_size:
            sent = self._send(self.packer.flush_frames(index)) or sent
        self._frames.append(meta)
        self.packer.add(index, frame)
        return sent

    def _adopt(self) -> None:
        assert self._skip is not None
        k, rec = self._skip
        if rec.get("xxh3") not in (None, self._digest(self._frames)):
            raise IntegrityError(f"segment {k} that an earlier run stored no longer matches "
                                 "the chain: the chain changed since; run with --restart")
        self.uploader.adopt(self.existing[k])
        self._skip, self._frames = None, []

    def _send(self, seg: tuple[int, int, int, FrameList | SpillSegment] | None) -> bool:
        if seg is None:
            return False
        index, first, count, data = seg
        digest = self._digest(self._frames[:count])
        del self._frames[:count]
        if self.gate is not None:
            self.gate(len(data))
        with self.lock:
            self._pending[index] = (first, count, digest)
        self.uploader.submit(index, data)
        return True

    def _digest(self, frames: list[RawFrame]) -> str:
        if frames:
            self.hashed(frames[-1].index)
        return segments_digest([f.xxh3 for f in frames])

    def flush(self, nframes: int) -> bool:
        """Close the last segment (after frame ``nframes - 1``)."""
        return self._send(self.packer.flush_frames(nframes))
