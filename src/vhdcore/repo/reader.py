"""Reading images back: restore (VHD or raw) and export to the stream format.

Readers go in the reverse order of writers: manifest, then index (checked
against the manifest's digest), then chunks (each checked against its ID).
A lease pins the image while it is read, so a concurrent ``forget`` + ``gc``
cannot remove its chunks.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .._util import aligned_buffer
from ..errors import VhdError
from .core import ImageRef, Repository, open_repo
from .format import ID_SIZE, RepoFormatError, chunk_key, decode_chunk, nonzero_rows, parse_ref

__all__ = ["restore", "export", "iter_chunks", "iter_stream", "fetch_chunk"]


def fetch_chunk(repo: Repository, cid: bytes, where: str = "") -> bytes:
    """The raw bytes of chunk ``cid``, checked against its ID."""
    from ..errors import StoreNotFoundError

    key = chunk_key(cid)
    try:
        obj = repo.backend.get(key)
    except StoreNotFoundError:
        raise RepoFormatError(f"{repo.url}: chunk {cid.hex()} is missing{where}") from None
    raw = decode_chunk(obj, f"{repo.url}: chunk {cid.hex()}{where}")
    if repo.chunk_id(raw) != cid:
        raise RepoFormatError(f"{repo.url}: chunk {cid.hex()}{where} does not hash to its ID "
                              "(damaged)")
    return raw


def iter_chunks(repo: Repository, ids: np.ndarray, *, concurrency: int = 4,
                where: str = "") -> Iterator[tuple[int, bytes]]:
    """``(position, raw bytes)`` of every non-zero chunk of ``ids``, in order,
    fetched ``concurrency`` at a time (at most ``2 * concurrency`` in memory)."""
    nonzero = np.nonzero(nonzero_rows(ids))[0]
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="vhdcore-repo-get") as pool:
        window: deque[tuple[int, Future[bytes]]] = deque()
        it = iter(nonzero.tolist())
        try:
            for c in it:
                window.append((c, pool.submit(fetch_chunk, repo, ids[c].tobytes(), where)))
                if len(window) >= 2 * concurrency:
                    break
            while window:
                c, fut = window.popleft()
                raw = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(fetch_chunk, repo, ids[nxt].tobytes(),
                                                    where)))
                yield c, raw
        finally:
            for _, f in window:
                f.cancel()


def _open(repo_url: str | Repository | None, ref: str | ImageRef
          ) -> tuple[Repository, bool, ImageRef]:
    repo = repo_url if isinstance(repo_url, Repository) else open_repo(repo_url)
    own = not isinstance(repo_url, Repository)
    try:
        if isinstance(ref, ImageRef):
            r = ref
        else:
            name, image_id = parse_ref(ref)
            r = repo.resolve(name, image_id)
    except BaseException:
        if own:
            repo.close()
        raise
    return repo, own, r


def _stream_layout(man: dict[str, Any]) -> Any:
    """The dynamic VHD layout of the stream, with the UUID and time stamp the
    manifest recorded (a new UUID and now when they are missing or invalid)."""
    from ..vhd.layout import DynamicLayout

    stream = man.get("stream")
    stream = stream if isinstance(stream, dict) else {}
    uid: bytes | None = None
    try:
        uid = bytes.fromhex(stream["uuid"])
    except (KeyError, TypeError, ValueError):
        pass
    if uid is not None and len(uid) != 16:
        uid = None
    ts = stream.get("timestamp")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 1 << 32:
        ts = None
    return DynamicLayout(man["virtual_size"], man["block_size"], unique_id=uid, timestamp=ts)


def _stored_blocks(ids: np.ndarray, cs: int, bs: int, nblocks: int) -> np.ndarray:
    """The blocks overlapping a non-zero chunk, ascending."""
    nonzero = nonzero_rows(ids)
    if cs <= bs:
        per = bs // cs
        pad = np.zeros(nblocks * per, dtype=bool)
        pad[:len(nonzero)] = nonzero
        stored_mask = pad.reshape(nblocks, per).any(axis=1)
    else:
        per = cs // bs
        stored_mask = np.repeat(nonzero, per)[:nblocks]
    result: np.ndarray = np.nonzero(stored_mask)[0]
    return result


class _Blocks:
    """Assembles each stored block (its bitmap and data) from the chunks, which
    come in ascending order; the buffers are reused from block to block."""

    def __init__(self, chunks: Iterator[tuple[int, bytes]], cs: int, bs: int, vsize: int,
                 bitmap_size: int) -> None:
        self.chunks, self.cs, self.bs, self.vsize = chunks, cs, bs, vsize
        self.zeros = bytes(bs)
        self.bm = aligned_buffer(bitmap_size)
        self.data = aligned_buffer(bs)
        self.pending: tuple[int, bytes] | None = next(chunks, None)

    def block(self, b: int) -> tuple[memoryview, memoryview]:
        from .. import kernels

        cs, bs, bm, data = self.cs, self.bs, self.bm, self.data
        n = min(bs // 512, -(-(self.vsize - b * bs) // 512))
        data[:] = self.zeros
        start, end = b * bs, b * bs + bs
        # copy every chunk overlapping [start, end)
        while self.pending is not None and self.pending[0] * cs < end:
            c, raw = self.pending
            cstart = c * cs
            lo, hi = max(start, cstart), min(end, cstart + len(raw))
            if hi > lo:
                data[lo - start:hi - start] = raw[lo - cstart:hi - cstart]
            if cstart + cs <= end:
                self.pending = next(self.chunks, None)
            else:
                break
        bm[:] = bytes(len(bm))
        full, rest = divmod(n, 8)
        bm[:full] = b"\xff" * full
        if rest:
            bm[full] = (0xFF << (8 - rest)) & 0xFF
        kernels.clear_zero_sectors(bm, data, n)
        return bm, data


def iter_stream(repo: Repository, man: dict[str, Any], ids: np.ndarray, *,
                concurrency: int = 4, where: str = ""
                ) -> Iterator[tuple[str, bytes | memoryview, memoryview | None]]:
    """The image as the uncompressed stream of ``image --to``: ``("head",
    footer copy + dynamic header + BAT, None)``, then ``("block", bitmap,
    data)`` per block holding data, then ``("tail", footer, None)``.  Block
    pieces are views of reused buffers (valid until the next item)."""
    bs, cs, vsize = man["block_size"], man["chunk_size"], man["virtual_size"]
    layout = _stream_layout(man)
    stored = _stored_blocks(ids, cs, bs, -(-vsize // bs))
    # blocks of a non-zero chunk larger than a block may be all zero: still
    # stored (with an empty bitmap), since the head is written first
    yield "head", layout.head(stored.tolist()), None
    blocks = _Blocks(iter_chunks(repo, ids, concurrency=concurrency, where=where), cs, bs,
                     vsize, layout.bitmap_size)
    for b in stored.tolist():
        bm, data = blocks.block(b)
        yield "block", bm, data
    yield "tail", layout.tail(), None


def _load(repo: Repository, r: ImageRef) -> tuple[dict[str, Any], np.ndarray]:
    man = repo.manifest(r)
    ids = repo.index(r, man)
    # repo.index() checked the ID array against its digest and the manifest's
    return man, ids


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def restore(repo_url: str | Repository | None, ref: str | ImageRef, out: str | os.PathLike[str],
            *, format: str = "vhd", concurrency: int = 4,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write image ``ref`` (``NAME`` for the newest, or ``NAME@ID``) of the
    repository to ``out`` as a sparse dynamic VHD (the same bytes ``image
    --to`` stores) or a raw disk.  Every chunk is checked against its ID and
    the index against the image digest; on any mismatch (or other failure)
    nothing is left at ``out``.  Returns the image's manifest."""
    if format not in ("vhd", "raw"):
        raise VhdError(f"format must be vhd or raw, not {format!r}")
    repo, own, r = _open(repo_url, ref)
    out = os.fspath(out)
    tmp: str | None = None
    try:
        with repo.lease("restore", image=str(r)):
            man, ids = _load(repo, r)
            where = f" (image {r})"
            d = os.path.dirname(os.path.abspath(out))
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(out)}.",
                                       suffix=".partial")
            try:
                if format == "raw":
                    cs, vsize = man["chunk_size"], man["virtual_size"]
                    os.ftruncate(fd, vsize)
                    done = 0
                    for c, raw in iter_chunks(repo, ids, concurrency=concurrency, where=where):
                        os.pwrite(fd, raw, c * cs)
                        done += len(raw)
                        if progress is not None:
                            progress(c * cs + len(raw), vsize)
                else:
                    pos = 0
                    for _kind, a, b in iter_stream(repo, man, ids, concurrency=concurrency,
                                                   where=where):
                        for piece in (a, b):
                            if piece is None:
                                continue
                            mv = memoryview(piece)
                            while mv:
                                k = os.pwrite(fd, mv, pos)
                                pos += k
                                mv = mv[k:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
            tmp = None
            return man
    finally:
        _remove(tmp)
        if own:
            repo.close()


def _export_segment_size(store: Any, man: dict[str, Any], ids: np.ndarray) -> int:
    """The segment size for the stream of an image (as ``image --to`` chooses it)."""
    from ..vhd.layout import DynamicLayout
    from ..compress import frame_bound
    from ..store import choose_segment_size

    layout = DynamicLayout(man["virtual_size"], man["block_size"])
    nonzero_blocks = nonzero_rows(ids).sum() * max(1, man["chunk_size"] // man["block_size"])
    stream_bound = layout.stream_size(int(nonzero_blocks))
    seg = choose_segment_size(frame_bound(stream_bound) + 64 * int(nonzero_blocks),
                              store.segment_limits(),
                              max_frame_size=frame_bound(layout.block_stride))
    limits = store.segment_limits()
    if limits.min_segment_size > 1:
        seg = max(seg, -(-(limits.min_segment_size + frame_bound(
            layout.block_stride) + 4096) // (1 << 20)) << 20)
    return int(seg)


class _Frames:
    """The stream of an image as lz4 frames, in order, compressed by a pool of
    ``threads``; hashes and counts the uncompressed stream as it goes."""

    def __init__(self, repo: Repository, man: dict[str, Any], ids: np.ndarray,
                 concurrency: int, threads: int, where: str) -> None:
        self.repo, self.man, self.ids = repo, man, ids
        self.concurrency, self.threads, self.where = concurrency, threads, where
        self.sha = hashlib.sha256()
        self.size = 0
        self.nblocks = 0

    def __iter__(self) -> Iterator[bytes]:
        from ..compress import FrameCompressor

        with FrameCompressor(threads=max(1, self.threads)) as fc:
            yield from fc.compress(self._raw())

    def _raw(self) -> Iterator[bytes]:
        for _kind, a, b in iter_stream(self.repo, self.man, self.ids,
                                       concurrency=self.concurrency, where=self.where):
            if b is not None:
                buf = b"".join((a, b))
                self.nblocks += 1
            else:
                buf = bytes(a)
            self.sha.update(buf)
            self.size += len(buf)
            yield buf


def export(repo_url: str | Repository | None, ref: str | ImageRef, to_url: str, *,
           concurrency: int = 4, threads: int = 2,
           store_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Write image ``ref`` to ``to_url`` in the single-object stream format of
    ``image --to`` (lz4 frames, segmented; ``lz4 -d`` and ``restore URL``
    open it).  For an image of a chain, the stream is byte for byte what
    ``image --to`` of that chain stores.  Returns the stream's metadata."""
    from ..store import SegmentUploader, image_metadata, open_store
    from ..store.upload import pack_segments

    repo, own, r = _open(repo_url, ref)
    try:
        with repo.lease("export", image=str(r)):
            man, ids = _load(repo, r)
            store = open_store(to_url, **(store_options or {}))
            try:
                seg = _export_segment_size(store, man, ids)
                frames = _Frames(repo, man, ids, concurrency, threads, f" (image {r})")
                with SegmentUploader(store, concurrency=concurrency) as up:
                    for index, data in pack_segments(iter(frames), seg):
                        up.submit(index, data)
                    meta = image_metadata(sha256=frames.sha.hexdigest(), stream_size=frames.size,
                                          virtual_size=man["virtual_size"],
                                          **{"block-size": str(man["block_size"]),
                                             "blocks-stored": str(frames.nblocks),
                                             "fs-aware": "yes" if man.get("fs_aware") else "no",
                                             "repo-image": str(r)})
                    manifest = up.finish(meta)
                return dict(manifest.metadata)
            finally:
                store.close()
    finally:
        if own:
            repo.close()


_ = ID_SIZE
