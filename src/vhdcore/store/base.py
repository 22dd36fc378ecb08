"""The one small interface every object store target implements.

An *image* in a store is a list of *segments* (numbered 0, 1, 2, ...; each a
whole number of lz4 frames) plus a *manifest* naming them in order with the
image metadata.  Writing the manifest is the last step of an upload: an image
without one is incomplete, and its uploaded segments are kept so that a
re-run can skip them (resume).

*Generations*: the segments of one image live under a generation name
(``""``, the primary one, or ``g`` + hex digits), and the manifest names the
generation it uses.  A new image over a complete one writes its segments
under another generation than the current manifest's (see
:meth:`Store.new_generation`), switches the manifest last (one atomic write)
and only then deletes what the old generation alone used
(:meth:`Store.prune`): until the switch the old image stays complete and
restorable, and a stopped upload stays resumable.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from .._io import Buffer as Buffer  # re-exported: the stores and the stream use it
from .._version import __version__
from ..errors import StoreError, StoreNotFoundError, UploadError, VhdError
from .retry import RetryExhausted, RetryPolicy, call_with_retry
# a segment's bytes (frames or a scratch file) live in .segment; re-exported
# here, where the stores and the stream have always found them
from .segment import (FrameList as FrameList, FrameReader as FrameReader,
                      SegmentData as SegmentData, SpillReader as SpillReader,
                      SpillSegment as SpillSegment, segment_body as segment_body,
                      segment_parts as segment_parts)

__all__ = [
    "MiB",
    "GiB",
    "FrameList",
    "FrameReader",
    "SpillSegment",
    "SegmentInfo",
    "SegmentLimits",
    "ImageEntry",
    "Manifest",
    "Store",
    "choose_segment_size",
    "image_metadata",
    "md5_hex",
    "check_metadata",
    "is_vhdcore_metadata",
    "META_VERSION",
    "META_FORMAT",
    "META_CODEC",
    "META_VIRTUAL_SIZE",
    "META_SHA256",
    "META_STREAM_SIZE",
]

MiB = 1 << 20
GiB = 1 << 30

T = TypeVar("T")


META_VERSION = "vhdcore-version"
META_FORMAT = "format"
META_CODEC = "codec"
META_VIRTUAL_SIZE = "virtual-size"
META_SHA256 = "sha256"
META_STREAM_SIZE = "stream-size"

#: image format recorded by the imaging pipeline
FORMAT_VHD_DYNAMIC = "vhd-dynamic"

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_GENERATION_RE = re.compile(r"^(|g[0-9a-f]{12})$")
# printable ASCII except '%' stays as is in headers; everything else is %-encoded
_SAFE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%")


def md5_hex(data: Buffer) -> str:
    """Hex MD5 of ``data`` (the ETag Swift and S3 give a segment)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_base64(md5_hexdigest: str) -> str:
    """The base64 form of an MD5 (S3's ``Content-MD5``)."""
    return base64.b64encode(bytes.fromhex(md5_hexdigest)).decode("ascii")


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Validate metadata keys (lower-case letters, digits, '-') and values (strings)."""
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"metadata key {key!r} must be 1-64 lower-case letters, digits or '-' "
                "(it becomes an HTTP header name)"
            )
        if not isinstance(value, str):
            raise ValueError(f"metadata value for {key!r} must be a string, got {type(value).__name__}")
        out[key] = value
    return out


def encode_meta_value(value: str) -> str:
    """Header-safe form of a metadata value (printable ASCII kept, the rest %-encoded)."""
    return urllib.parse.quote(value, safe=_SAFE_CHARS)


def decode_meta_value(value: str) -> str:
    """Inverse of :func:`encode_meta_value`."""
    return urllib.parse.unquote(value)


def is_vhdcore_metadata(metadata: Mapping[str, str]) -> bool:
    """True if ``metadata`` marks a vhdcore image."""
    return META_VERSION in metadata and META_CODEC in metadata


def image_metadata(
    *, sha256: str, stream_size: int, virtual_size: int | None = None, **extra: str
) -> dict[str, str]:
    """The standard metadata of an image, with ``extra`` keys (``_`` becomes ``-``)."""
    from ..compress import CODEC

    meta = {
        META_VERSION: __version__,
        META_FORMAT: FORMAT_VHD_DYNAMIC,
        META_CODEC: CODEC,
        META_SHA256: sha256,
        META_STREAM_SIZE: str(int(stream_size)),
    }
    if virtual_size is not None:
        meta[META_VIRTUAL_SIZE] = str(int(virtual_size))
    for key, value in extra.items():
        meta[key.replace("_", "-")] = str(value)
    return check_metadata(meta)


@dataclass(frozen=True)
class SegmentInfo:
    """One uploaded segment: its index, size in bytes and ETag (hex MD5 of its bytes)."""

    index: int
    size: int
    etag: str


@dataclass(frozen=True)
class ImageEntry:
    """One image found by :meth:`Store.list_images`: its ``name`` and ``url``,
    ``size`` (bytes stored: the segments), ``segments``, ``modified`` (POSIX
    seconds, or None when the target does not tell), ``complete`` (a manifest
    exists) and ``virtual_size`` (from the metadata, None for an incomplete
    image)."""

    name: str
    url: str
    size: int
    segments: int
    modified: float | None
    complete: bool
    virtual_size: int | None = None


class SegmentLimits(NamedTuple):
    """What a target accepts: smallest segment (except the last), largest, most segments."""

    min_segment_size: int
    max_segment_size: int
    max_segments: int


@dataclass(frozen=True)
class Manifest:
    """A complete image: its segments in order and its metadata."""

    segments: list[SegmentInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    #: the generation whose segments the image uses (``""``: the primary one)
    generation: str = ""

    @property
    def compressed_size(self) -> int:
        """Total bytes of all segments."""
        return sum(s.size for s in self.segments)

    @property
    def stream_size(self) -> int | None:
        """Size of the uncompressed stream, if recorded."""
        value = self.metadata.get(META_STREAM_SIZE)
        return int(value) if value is not None else None

    @property
    def sha256(self) -> str | None:
        """SHA-256 (hex) of the uncompressed stream, if recorded."""
        return self.metadata.get(META_SHA256)


def check_segment_sequence(segments: list[SegmentInfo], limits: SegmentLimits, where: str) -> None:
    """Raise :class:`UploadError` unless segments are 0..n-1 and within ``limits``."""
    if not segments:
        raise UploadError(f"{where}: an image needs at least one segment")
    for pos, seg in enumerate(segments):
        if seg.index != pos:
            raise UploadError(f"{where}: segment {pos} is missing (found index {seg.index} there)")
    if len(segments) > limits.max_segments:
        raise UploadError(
            f"{where}: {len(segments)} segments exceed the target's limit of {limits.max_segments}; "
            "choose a larger segment size (see choose_segment_size)"
        )
    for seg in segments[:-1]:
        if seg.size < limits.min_segment_size:
            raise UploadError(
                f"{where}: segment {seg.index} has {seg.size} bytes, below the target's minimum of "
                f"{limits.min_segment_size} for every segment but the last"
            )


def choose_segment_size(
    expected_stream_bytes: int,
    limits: SegmentLimits | tuple[int, int, int],
    preferred: int = 32 * MiB,
    *,
    max_frame_size: int = 4 * MiB,
    reserved_segments: int = 2,
) -> int:
    """Pick a segment size so that an image of ``expected_stream_bytes`` fits ``limits``.

    ``expected_stream_bytes`` is an upper bound of the compressed stream (see
    :func:`vhdcore.compress.stream_bound`).  Segments hold whole frames, so a
    segment may be up to ``max_frame_size`` short of the segment size (and must
    still reach the target's minimum);
    ``reserved_segments`` are kept free for the image head and the last,
    partial segment.  The result is ``preferred`` when that fits, otherwise the
    smallest whole number of MiB that does.  Raises :class:`ValueError` if no
    size within the limits can hold the image.
    """
    limits = SegmentLimits(*limits)
    if expected_stream_bytes < 0:
        raise ValueError(f"expected_stream_bytes must not be negative, got {expected_stream_bytes}")
    usable = limits.max_segments - reserved_segments
    if usable < 1:
        raise ValueError(f"the target allows only {limits.max_segments} segments")
    needed = -(-expected_stream_bytes // usable) + max_frame_size
    if needed > limits.max_segment_size:
        raise ValueError(
            f"an image stream of {expected_stream_bytes} bytes needs segments of at least {needed} "
            f"bytes to stay within {limits.max_segments} segments, above the target's maximum "
            f"segment size of {limits.max_segment_size} bytes"
        )
    # segments close short of the size by up to one frame and must still reach the minimum
    floor = limits.min_segment_size + max_frame_size if limits.min_segment_size > 1 else 1
    size = max(min(preferred, limits.max_segment_size), floor, needed)
    size = -(-size // MiB) * MiB
    return min(size, limits.max_segment_size)


class Store(ABC):
    """An image in an object store: segments plus a manifest.

    Implementations are safe to call from several threads at once
    (``put_segment`` and ``get_segment`` run on upload/download pools).
    Failures raise :class:`~vhdcore.errors.StoreError` subclasses whose message
    names the target: :class:`~vhdcore.errors.StoreAuthError` for rejected
    credentials, :class:`~vhdcore.errors.StoreNotFoundError` for a missing
    container, bucket, directory or object, :class:`~vhdcore.errors.UploadError`
    when a write fails after retries.
    """

    #: URL scheme the store answers to
    scheme: str = ""

    def __init__(self, url: str, retry: RetryPolicy | None = None) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        #: the generation that put_segment/list_segments/put_manifest use
        self.generation = ""

    # -- generations --------------------------------------------------------
    def set_generation(self, generation: str) -> None:
        """Write (and list) segments under ``generation`` from now on."""
        if not _GENERATION_RE.match(generation):
            raise ValueError(f"invalid generation name {generation!r}")
        self.generation = generation

    def current_generation(self) -> str | None:
        """The generation of the complete image there now (None: no image).
        A manifest that cannot be read counts as an image of an unknown
        generation (``"?"``): a new upload then never touches the primary
        one."""
        try:
            return self.get_manifest().generation
        except StoreNotFoundError:
            return None
        except StoreError:
            return "?"

    def new_generation(self, seed: str | None = None) -> str:
        """A generation for a new image that the current image does not use:
        the primary one (``""``) unless the current image lives there, else
        ``g`` + 12 hex digits (derived from ``seed``, random without)."""
        if self.current_generation() not in ("", "?"):
            return ""
        if seed is None:
            return "g" + secrets.token_hex(6)
        return "g" + hashlib.sha256(seed.encode()).hexdigest()[:12]

    def prune(self) -> int:
        """Delete every segment (and unfinished upload) of this image that its
        current manifest does not use: older generations, stopped uploads,
        leftovers.  Returns how many objects went.  Call it only after the
        manifest was switched.  This base version keeps everything (for
        stores that keep nothing besides the manifest's segments)."""
        return 0

    # -- the interface ----------------------------------------------------
    @abstractmethod
    def put_segment(self, index: int, data: SegmentData, md5_hex: str) -> str:
        """Store segment ``index`` (a buffer or a :class:`FrameList`); the
        store verifies ``md5_hex``; return its ETag."""

    @abstractmethod
    def list_segments(self) -> dict[int, SegmentInfo]:
        """Segments already uploaded for this image (complete or not), by index."""

    @abstractmethod
    def get_segment(self, index: int) -> bytes:
        """The bytes of segment ``index``."""

    @abstractmethod
    def put_manifest(self, segments: list[SegmentInfo], metadata: Mapping[str, str]) -> None:
        """Mark the image complete: segments in order plus metadata."""

    @abstractmethod
    def get_manifest(self) -> Manifest:
        """The manifest; :class:`StoreNotFoundError` if the image does not exist (or is incomplete)."""

    @abstractmethod
    def delete(self) -> None:
        """Remove the manifest and every segment (no error if there is nothing)."""

    @abstractmethod
    def segment_limits(self) -> SegmentLimits:
        """``(min_segment_size, max_segment_size, max_segments)`` of this target."""

    def prepare_write(self, *, create: bool = True) -> None:
        """Check, before a job starts, that the target takes this image:
        credentials accepted, endpoint reachable, the directory, container or
        bucket there -- created (with its parents, or the Swift segment
        container) when ``create`` and the target can.  Raises the usual
        :class:`~vhdcore.errors.StoreError` subclasses.  The default lists
        the image's segments."""
        self.list_segments()

    def list_images(self, prefix: str) -> list[ImageEntry]:
        """Images (complete or not) whose names start with ``prefix`` in this
        store's directory, container or bucket, by name."""
        raise StoreError(f"{self.describe()}: listing images is not supported by this target")

    def describe(self) -> str:
        """The target, for messages (never includes credentials)."""
        return self.url

    def close(self) -> None:
        """Release connections."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- helpers for implementations ----------------------------------------
    def _is_transient(self, exc: BaseException) -> bool:
        """True if ``exc`` is worth retrying.  Overridden per back end."""
        return isinstance(exc, (ConnectionError, TimeoutError))

    def _translate(self, exc: BaseException, what: str, upload: bool) -> VhdError:
        """Turn a back end exception into a :class:`StoreError` subclass."""
        cls = UploadError if upload else StoreError
        return cls(f"{self.describe()}: {what} failed: {exc}")

    def _on_retry(self, exc: BaseException, retry: int, delay: float) -> None:
        """Hook run before each retry (e.g. to drop a broken connection)."""

    def _call(self, what: str, fn: Callable[[], T], *, upload: bool = False) -> T:
        """Run ``fn`` with this store's retry policy and error translation."""
        try:
            return call_with_retry(fn, self.retry, self._is_transient, on_retry=self._on_retry)
        except VhdError:
            raise
        except RetryExhausted as exc:
            cls = UploadError if upload else StoreError
            raise cls(f"{self.describe()}: {what} failed: {exc}") from exc.last
        except Exception as exc:
            raise self._translate(exc, what, upload) from exc
