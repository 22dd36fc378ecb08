"""Upload an image stream: pack frames into segments, upload them in parallel, resume.

* :class:`SegmentPacker` / :func:`pack_segments` group frames into segments (whole frames only).
* :class:`SegmentUploader` uploads numbered segments on a thread pool with a
  bounded number in memory, skipping those already in the store (resume), and
  writes the manifest at the end.  Segments may arrive in any order; the
  imaging pipeline sends them in stream order, the image head first.
* :func:`upload_frames` does both for a plain frame sequence.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from ..errors import StoreError, UploadError
from .base import (
    META_CODEC,
    META_FORMAT,
    META_SHA256,
    META_STREAM_SIZE,
    META_VERSION,
    FORMAT_VHD_DYNAMIC,
    Buffer,
    FrameList,
    Manifest,
    SegmentData,
    SegmentInfo,
    Store,
    check_metadata,
    check_segment_sequence,
    SpillSegment,
    segment_parts,
)

__all__ = ["SegmentPacker", "SegmentUploader", "UploadStats", "pack_segments", "upload_frames"]

_log = logging.getLogger("vhdcore.store")

#: ``progress(info, uploaded)``: called from upload threads after each segment;
#: ``uploaded`` is False when the segment was already in the store (skipped).
#: A per-segment notice, not the job's progress: that is
#: ``vhdcore.imaging.events.ProgressCallback`` (called with a ``ProgressEvent``),
#: which the imaging job derives from these notices.
SegmentCallback = Callable[[SegmentInfo, bool], None]


class SegmentPacker:
    """Groups frames into segments (whole frames only), one frame at a time.

    A segment closes when adding the next frame would take it past
    ``segment_size``; a single frame larger than ``segment_size`` gets a
    segment of its own.  Numbering depends only on the frame sizes, so the
    same image always packs the same way.  :meth:`add` returns the segment
    the frame closed, if any; :meth:`flush` closes the open one.  A caller
    that resumes can :meth:`skip` segments an earlier run already stored.
    """

    def __init__(self, segment_size: int, first_index: int = 0, *,
                 spill_dir: str | None = None) -> None:
        if segment_size <= 0:
            raise ValueError(f"segment_size must be positive, got {segment_size}")
        self.segment_size = segment_size
        #: number of the open (next) segment and number of its first frame
        self.index = first_index
        self.first_frame = 0
        self._parts: list[Buffer] = []
        self._size = 0
        #: with ``spill_dir``, :meth:`flush_frames` hands on each segment as
        #: a :class:`~vhdcore.store.base.SpillSegment` there: a frame goes to
        #: its scratch file as it is added and is not kept
        self.spill_dir = spill_dir
        self._spilled: SpillSegment | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of the open segment."""
        return self._size

    def add(self, frame_index: int, frame: Buffer) -> tuple[int, int, int, bytes] | None:
        """Add frame ``frame_index``; return ``(segment, first frame, frame
        count, bytes)`` of the segment it closed, else None."""
        out = None
        if self._open() and self._size + len(frame) > self.segment_size:
            out = self.flush(frame_index)
        if not self._open():
            self.first_frame = frame_index
        if self.spill_dir is not None:
            if self._spilled is None:
                self._spilled = SpillSegment(self.spill_dir)
            self._spilled.append(frame)
        else:
            self._parts.append(frame)
        self._size += len(frame)
        return out

    def flush(self, next_frame: int) -> tuple[int, int, int, bytes] | None:
        """Close the open segment (its frames end before ``next_frame``)."""
        out = self.flush_frames(next_frame)
        if out is None:
            return None
        index, first, count, frames = out
        return index, first, count, frames.tobytes()

    def _open(self) -> bool:
        return bool(self._parts) or self._spilled is not None

    def flush_frames(self, next_frame: int) -> tuple[int, int, int, FrameList | SpillSegment] | None:
        """Like :meth:`flush`, with the segment as its frames (not joined:
        every store takes a :class:`~vhdcore.store.base.FrameList`), or as
        its scratch file with ``spill_dir``."""
        if not self._open():
            self.first_frame = next_frame
            return None
        data: FrameList | SpillSegment
        if self._spilled is not None:
            data, self._spilled = self._spilled, None
        else:
            data = FrameList(self._parts)
        out = (self.index, self.first_frame, next_frame - self.first_frame, data)
        self.index += 1
        self._parts, self._size = [], 0
        self.first_frame = next_frame
        return out

    def discard(self) -> None:
        """Drop the open segment (a job that stops): its scratch file too."""
        if self._spilled is not None:
            self._spilled.close()
            self._spilled = None
        self._parts, self._size = [], 0

    def skip(self, frame_index: int, count: int) -> int:
        """Count segment :attr:`index` as stored already: it holds frames
        ``[frame_index, frame_index + count)``; the open segment must be
        empty.  Returns the skipped segment's number."""
        if self._open():
            raise ValueError("a segment is open")
        index = self.index
        self.index += 1
        self.first_frame = frame_index + count
        return index


def pack_segments(
    frames: Iterable[Buffer], segment_size: int, first_index: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Group ``frames`` into ``(index, segment bytes)``, numbered from
    ``first_index`` (see :class:`SegmentPacker`)."""
    packer = SegmentPacker(segment_size, first_index)
    n = 0
    for n, frame in enumerate(frames):
        done = packer.add(n, frame)
        if done is not None:
            yield done[0], done[3]
    last = packer.flush(n + 1)
    if last is not None:
        yield last[0], last[3]


@dataclass
class UploadStats:
    """Counts of one upload run."""

    uploaded_segments: int = 0
    uploaded_bytes: int = 0
    skipped_segments: int = 0
    skipped_bytes: int = 0
    #: objects of older generations and stopped uploads deleted after the manifest
    pruned_objects: int = 0


class SegmentUploader:
    """Upload numbered segments of one image in parallel, with resume.

    ``concurrency`` threads upload; at most ``max_pending`` segments (default
    ``2 * concurrency``) are held at once -- :meth:`submit` blocks when that
    many are queued or uploading, so memory stays at about ``max_pending *
    segment size``.  With ``resume`` (default) the store's segments are listed
    once, at the first submit, and a segment already there with the same size
    and MD5 is not uploaded again.

    Usage::

        with SegmentUploader(store, concurrency=4) as up:
            for index, data in segments:
                up.submit(index, data)
            manifest = up.finish(metadata)

    The first failure of any upload is raised by the next :meth:`submit`,
    :meth:`wait` or :meth:`finish`, and stops further uploads.
    """

    def __init__(
        self,
        store: Store,
        *,
        concurrency: int = 4,
        max_pending: int | None = None,
        resume: bool = True,
        progress: SegmentCallback | None = None,
        stats: UploadStats | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.store = store
        self.concurrency = concurrency
        self.max_pending = max_pending or 2 * concurrency
        self.resume = resume
        self.progress = progress
        self.stats = stats if stats is not None else UploadStats()
        self._existing: dict[int, SegmentInfo] | None = None
        self._done: dict[int, SegmentInfo] = {}
        self._submitted: set[int] = set()
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._futures: list[concurrent.futures.Future[None]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="vhdcore-upload")
        self._closed = False

    def existing_segments(self) -> dict[int, SegmentInfo]:
        """The segments the store already had when this upload started (listed once)."""
        if self._existing is None:
            self._existing = self.store.list_segments() if self.resume else {}
        return self._existing

    def _raise_error(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, StoreError):
                raise err
            raise UploadError(f"{self.store.describe()}: upload failed: {err}") from err

    def submit(self, index: int, data: SegmentData, md5_hex: str | None = None) -> None:
        """Queue segment ``index``; blocks while ``max_pending`` segments are in flight."""
        if self._closed:
            raise RuntimeError("this SegmentUploader is closed")
        if index < 0:
            raise ValueError(f"segment index must not be negative, got {index}")
        if index in self._submitted:
            raise ValueError(f"segment {index} was already submitted")
        self._raise_error()
        self.existing_segments()
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            self._raise_error()
        self._submitted.add(index)
        try:
            self._futures.append(self._pool.submit(self._upload, index, data, md5_hex))
        except BaseException:
            self._slots.release()
            raise

    def adopt(self, info: SegmentInfo) -> None:
        """Count a segment that an earlier run already stored (resume) without
        handing over its bytes; it is part of the manifest like any other."""
        with self._lock:
            if info.index in self._submitted:
                raise ValueError(f"segment {info.index} was already submitted")
            self._submitted.add(info.index)
            self._done[info.index] = info
            self.stats.skipped_segments += 1
            self.stats.skipped_bytes += info.size

    def _upload(self, index: int, data: SegmentData, md5_hex: str | None) -> None:
        try:
            if self._error is not None:
                return
            if md5_hex is None:
                md5 = hashlib.md5(usedforsecurity=False)
                for part in segment_parts(data):
                    md5.update(part)
                md5_hex = md5.hexdigest()
            size = len(data)
            assert self._existing is not None
            have = self._existing.get(index)
            if have is not None and have.size == size and have.etag == md5_hex:
                info, uploaded = have, False
            else:
                etag = self.store.put_segment(index, data, md5_hex)
                info, uploaded = SegmentInfo(index, size, etag), True
            with self._lock:
                self._done[index] = info
                if uploaded:
                    self.stats.uploaded_segments += 1
                    self.stats.uploaded_bytes += size
                else:
                    self.stats.skipped_segments += 1
                    self.stats.skipped_bytes += size
            if self.progress is not None:
                self.progress(info, uploaded)
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
        finally:
            if isinstance(data, SpillSegment):
                data.close()  # stored or failed: its scratch file is not needed again
            self._slots.release()

    def wait(self) -> list[SegmentInfo]:
        """Wait for every submitted segment; return all done so far, by index."""
        futures, self._futures = self._futures, []
        concurrent.futures.wait(futures)
        self._raise_error()
        return [self._done[i] for i in sorted(self._done)]

    def finish(self, metadata: Mapping[str, str]) -> Manifest:
        """Wait for all segments, check they are 0..n-1, write the manifest and
        return it; then delete what the image no longer uses (an older
        generation, leftovers: :meth:`Store.prune`).  A failure of that
        clean-up is logged, not raised: the image is complete, and the next
        upload cleans up again."""
        meta = check_metadata(metadata)
        segments = self.wait()
        check_segment_sequence(segments, self.store.segment_limits(), self.store.describe())
        self.store.put_manifest(segments, meta)
        self.close()
        try:
            self.stats.pruned_objects += self.store.prune()
        except StoreError as exc:
            _log.warning("%s: the image is complete, but removing what it no longer uses failed: %s",
                         self.store.describe(), exc)
        return Manifest(segments, meta, self.store.generation)

    def close(self) -> None:
        """Stop: cancel queued uploads and wait for running ones."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SegmentUploader:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and self._error is None:
            self._error = RuntimeError("upload abandoned")
        self.close()


def _complete_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    from .._version import __version__
    from ..compress import CODEC

    meta = dict(metadata)
    meta.setdefault(META_VERSION, __version__)
    meta.setdefault(META_FORMAT, FORMAT_VHD_DYNAMIC)
    meta.setdefault(META_CODEC, CODEC)
    missing = [k for k in (META_SHA256, META_STREAM_SIZE) if k not in meta]
    if missing:
        raise ValueError(f"image metadata needs {', '.join(missing)} (of the uncompressed stream)")
    return check_metadata(meta)


def _same_image(store: Store, meta: Mapping[str, str]) -> Manifest | None:
    """The store's complete image if it has exactly this metadata (so the
    same stream) and every segment its manifest names is stored, else None."""
    try:
        current = store.get_manifest()
    except StoreError:
        return None
    if current.metadata != dict(meta) or not current.segments:
        return None
    store.set_generation(current.generation)
    have = store.list_segments()
    if any(have.get(s.index) != s for s in current.segments):
        return None
    return current


def upload_frames(
    store: Store,
    frames: Iterable[Buffer],
    *,
    segment_size: int,
    metadata: Mapping[str, str],
    concurrency: int = 4,
    progress: SegmentCallback | None = None,
    max_pending: int | None = None,
    resume: bool = True,
    stats: UploadStats | None = None,
) -> Manifest:
    """Upload a sequence of lz4 frames as one image and write its manifest.

    ``metadata`` must hold ``sha256`` and ``stream-size`` of the uncompressed
    stream; ``vhdcore-version``, ``format`` and ``codec`` are filled in when
    absent.  Segments already in the store with the same size and MD5 are
    skipped, so re-running an interrupted upload of the same image only sends
    what is missing.  ``stats``, if given, receives the counts of uploaded
    and skipped segments.  Returns the manifest written.
    """
    meta = _complete_metadata(metadata)
    current = _same_image(store, meta)
    if current is not None:
        # this very image is there, complete: nothing to send
        if stats is not None:
            stats.skipped_segments += len(current.segments)
            stats.skipped_bytes += current.compressed_size
        return current
    # over a complete image, write another generation (the same for the same
    # stream and segment size, so that a re-run resumes)
    store.set_generation(store.new_generation(seed=f"{meta[META_SHA256]}/{segment_size}"))
    with SegmentUploader(
        store,
        concurrency=concurrency,
        progress=progress,
        max_pending=max_pending,
        resume=resume,
        stats=stats,
    ) as uploader:
        for index, data in pack_segments(frames, segment_size):
            uploader.submit(index, data)
        return uploader.finish(meta)
