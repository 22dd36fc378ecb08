"""A segment's bytes on their way to a store: as the frames that make it up
(:class:`FrameList`, never joined) or, above the imaging job's memory
budget, in a scratch file (:class:`SpillSegment`); and the two read-only
files (:class:`FrameReader`, :class:`SpillReader`) that HTTP clients send
as a request body.  :mod:`vhdcore.store.base` re-exports them."""
from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Union

from .. import _io
from .._io import Buffer
from ..errors import UploadError

__all__ = ["FrameList", "FrameReader", "SpillSegment", "SpillReader", "SegmentData",
           "segment_parts", "segment_body"]


class FrameList:
    """A segment's bytes as the frames that make it up, in order, never
    joined: a segment is 8 MiB or more, and joining would copy it into
    freshly mapped memory (the kernel then faults and zeroes every page).
    ``len()`` is its size in bytes; iterating yields the frames.  The
    imaging job hands segments to :meth:`Store.put_segment` in this form;
    every store takes it besides a plain buffer (see :func:`segment_parts`).
    """

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts: tuple[Buffer, ...] = tuple(parts)
        self.nbytes = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def __iter__(self) -> Iterator[Buffer]:
        return iter(self.parts)

    def tobytes(self) -> bytes:
        """The segment as one ``bytes`` (a copy, unless it is one already)."""
        if len(self.parts) == 1 and isinstance(self.parts[0], bytes):
            return self.parts[0]
        return b"".join(self.parts)


class _BodyReader:
    """A read-only, seekable file of ``_size`` bytes for HTTP clients that
    send a body read from a file (and rewind it to sign it or to send it
    again); subclasses read."""

    _size = 0
    _pos = 0

    def __len__(self) -> int:
        return self._size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        if base + pos < 0:
            raise OSError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


class FrameReader(_BodyReader):
    """A read-only, seekable file over a :class:`FrameList`: :meth:`read`
    returns views of the frames (no copy)."""

    def __init__(self, frames: FrameList) -> None:
        self._parts = [memoryview(p).cast("B") for p in frames.parts if len(p)]
        self._starts = list(itertools.accumulate((len(p) for p in self._parts), initial=0))
        self._size = frames.nbytes
        self._pos = 0

    def read(self, size: int = -1) -> memoryview | bytes:
        if self._pos >= self._size or size == 0:
            return b""
        k = bisect.bisect_right(self._starts, self._pos) - 1
        off = self._pos - self._starts[k]
        part = self._parts[k]
        end = len(part) if size is None or size < 0 else min(len(part), off + size)
        self._pos += end - off
        return part[off:end]


class SpillSegment:
    """A segment's bytes in a scratch file rather than in memory: for
    segments larger than the job's memory budget (a target that allows few
    segments makes them large: Swift's 1000 per manifest, S3's 10,000 parts),
    so that memory does not grow with the image.  Frames are appended as they
    are packed and then let go; MD5, the directory store and the HTTP bodies
    read the file back a chunk at a time (:meth:`chunks`, :meth:`reader`), a
    fresh reader per attempt.

    The file is unnamed where the system allows it (``O_TMPFILE``, so a
    crash leaves nothing behind), in ``directory`` (the job's state
    directory: on disk, not in a RAM-backed temporary directory); it is
    scratch, never user data.  :meth:`close` frees it (the uploader does,
    once the segment is stored or has failed)."""

    #: bytes read back at a time
    CHUNK = 1 << 20

    def __init__(self, directory: str | None = None) -> None:
        import tempfile

        self.directory = directory or tempfile.gettempdir()
        try:
            self._file = tempfile.TemporaryFile(dir=directory)
        except OSError as exc:
            raise UploadError(f"no scratch file for a segment in {self.directory}: {exc}") from exc
        self.fd = self._file.fileno()
        self.nbytes = 0

    def append(self, data: Buffer) -> None:
        """Add ``data`` at the end (the bytes are copied to the file).  A
        failed write (a full disk) raises :class:`UploadError`."""
        try:
            _io.scratch_write(self.fd, data, self.nbytes)
        except OSError as exc:
            raise UploadError(f"writing a segment's scratch file in {self.directory} "
                              f"failed: {exc}") from exc
        self.nbytes += memoryview(data).nbytes

    def __len__(self) -> int:
        return self.nbytes

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end)."""
        size = max(0, min(size, self.nbytes - offset))
        out = os.pread(self.fd, size, offset)  # a regular file reads whole
        if len(out) != size:  # pragma: no cover - only if the file was cut behind our back
            raise UploadError(f"a segment's scratch file in {self.directory} ended at "
                              f"{offset + len(out)} of {self.nbytes}")
        return out

    def chunks(self) -> Iterator[bytes]:
        """The bytes in order, :attr:`CHUNK` at a time."""
        for off in range(0, self.nbytes, self.CHUNK):
            yield self.read_at(off, self.CHUNK)

    def reader(self) -> "SpillReader":
        return SpillReader(self)

    def tobytes(self) -> bytes:
        """The whole segment in memory (tests and small segments only)."""
        return self.read_at(0, self.nbytes)

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


class SpillReader(_BodyReader):
    """A read-only, seekable file over a :class:`SpillSegment` with a
    position of its own; reads are capped at :attr:`SpillSegment.CHUNK`, so
    that a ``read()`` of the whole body never loads the segment at once."""

    def __init__(self, seg: SpillSegment) -> None:
        self._seg = seg
        self._size = seg.nbytes
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if self._pos >= self._size or size == 0:
            return b""
        n = SpillSegment.CHUNK if size is None or size < 0 else min(size, SpillSegment.CHUNK)
        out = self._seg.read_at(self._pos, n)
        self._pos += len(out)
        return out


#: what :meth:`Store.put_segment` takes
SegmentData = Union[Buffer, FrameList, SpillSegment]


def segment_parts(data: SegmentData) -> tuple[Buffer, ...] | Iterator[bytes]:
    """The buffers of a segment, in order: a plain buffer or the frames of
    a :class:`FrameList` (a tuple, for one vectored write), or a
    :class:`SpillSegment` read back a chunk at a time (an iterator)."""
    if isinstance(data, SpillSegment):
        return data.chunks()
    return data.parts if isinstance(data, FrameList) else (data,)


def segment_body(data: SegmentData) -> bytes | FrameReader | SpillReader:
    """A segment as an HTTP request body: bytes as they are, a
    :class:`FrameList` as a fresh :class:`FrameReader` (not joined), a
    :class:`SpillSegment` as a fresh :class:`SpillReader` (make one per
    attempt, a reader is consumed by sending it)."""
    if isinstance(data, FrameList):
        return FrameReader(data)
    if isinstance(data, SpillSegment):
        return data.reader()
    return data if isinstance(data, bytes) else bytes(data)
