"""``image --repo``: a chain into the repository, incremental from the chain.

One pass over the chain: every chunk is either *reused without reading*
(its ID comes from the previous image of the same name, see
:func:`reusable_chunks`), or read through the merge kernel, hashed (keyed
BLAKE3), and -- only when its ID is not known from a committed index --
compressed and written once.  Then the index, then the manifest.

Progress uses the published stages: ``coalescing`` (25%) while the layers,
the filesystems and the previous image are examined, ``uploading`` (50%)
while chunks are read, hashed and written, ``done`` (100%).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..chain import Chain
from ..ops.stream import iter_image_blocks
from ..vhd.file import PathLike
from ..errors import StoreNotFoundError, VhdError, VhdTimeoutError
from .core import ImageRef, Repository, new_image_id, open_repo
from .format import (
    ID_SIZE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    check_name,
    chunk_key,
    encode_chunk,
    encode_index_header,
    ids_as_keys,
    nonzero_rows,
    sorted_unique,
)
from .incremental import (
    Plan,
    blocks_to_read,
    chain_tag,
    layer_identity,
    plan_image,
    reusable_chunks,
)

__all__ = ["RepoImage", "create_image", "layer_identity", "reusable_chunks"]

CHECKPOINT_INTERVAL = 5.0


@dataclass
class RepoImage:
    """A committed image: ``str()`` gives ``NAME@ID``."""

    name: str
    id: str
    virtual_size: int = 0
    nchunks: int = 0
    parent: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    digest: str = ""
    resumed: bool = False

    def __str__(self) -> str:
        return f"{self.name}@{self.id}"

    @property
    def ref(self) -> ImageRef:
        return ImageRef(self.name, self.id)


class _Recent:
    """A bounded set of chunk IDs written in this run (dedup inside one image)."""

    def __init__(self, cap: int = 65536) -> None:
        self.cap = cap
        self.d: OrderedDict[bytes, None] = OrderedDict()
        self.lock = threading.Lock()

    def __contains__(self, cid: bytes) -> bool:
        with self.lock:
            return cid in self.d

    def add(self, cid: bytes) -> None:
        with self.lock:
            self.d[cid] = None
            if len(self.d) > self.cap:
                self.d.popitem(last=False)


def create_image(leaf: PathLike, repo_url: str | None, name: str, *,
                 progress: Callable[[Any], None] | None = None, timeout: float | None = None,
                 fs_aware: bool = True, rehash: bool = False, threads: int = 2,
                 concurrency: int = 4, chain_options: dict[str, Any] | None = None,
                 backend_options: dict[str, Any] | None = None,
                 cancel: threading.Event | None = None, **options: Any) -> RepoImage:
    """Image the chain of ``leaf`` into the repository at ``repo_url`` (default
    ``$VHDCORE_REPO``) as a new image of ``name``; returns it (``str()`` is
    ``NAME@ID``).

    Incremental: chunks the previous image of ``name`` covers are reused
    without reading when the chain proves them unchanged (``rehash=True``
    reads and hashes everything); others are read and hashed, and stored only
    when no committed index knows them.  ``timeout`` (seconds) or Ctrl-C stop
    with :class:`VhdTimeoutError`; running the same command again resumes
    without re-uploading what was stored.  ``fs_aware`` drops what the guest
    filesystems mark free.  ``cancel``: an event another thread may set to
    stop the same way as a timeout.  ``resume``/``restart`` (options of
    :func:`vhdcore.create_image`) are accepted and change nothing: resuming is
    automatic.  Other unknown ``options`` are an error.
    """
    options.pop("resume", None)
    options.pop("restart", None)
    if options:
        raise TypeError(f"create_image() got unexpected options: {', '.join(sorted(options))}")
    check_name(name)
    from ..imaging import _Reporter

    t0 = time.monotonic()
    deadline = t0 + timeout if timeout is not None else None
    rep = _Reporter(progress)
    rep.enter("queued", message=f"imaging {os.fspath(leaf)} into {repo_url} as {name}")
    repo = open_repo(repo_url, **(backend_options or {}))
    try:
        chain = Chain.open(leaf, **(chain_options or {}))
        try:
            with repo.lease("image", name=name):
                return _run(repo, chain, name, rep, t0, deadline, fs_aware, rehash, threads,
                            concurrency, cancel)
        except BaseException as exc:
            rep.fail(exc)
            raise
        finally:
            chain.close()
    finally:
        repo.close()



def _in_sorted(arr: np.ndarray | None, cid: bytes) -> bool:
    if arr is None or len(arr) == 0:
        return False
    i = int(np.searchsorted(arr, np.void(cid)))
    return i < len(arr) and bytes(arr[i]) == cid


def _chunk_lengths(nchunks: int, cs: int, vsize: int) -> np.ndarray:
    """Bytes of each chunk (the last one may be short)."""
    lens = np.full(nchunks, cs, dtype=np.int64)
    if nchunks:
        lens[-1] = vsize - (nchunks - 1) * cs
    return lens


class _ChunkSink:
    """The end of stage 2: hash each chunk read, and store it once unless it is
    zero or already known; counts what it did and which chunks this run stored
    (the checkpoint an interrupted run resumes from)."""

    def __init__(self, repo: Repository, plan: Plan, lens: np.ndarray,
                 known: np.ndarray | None, stored_before: bytes, ckey: str) -> None:
        self.repo = repo
        self.ids = plan.ids
        self.known = known
        # a checkpoint is no committed index: its IDs are checked before use
        self.ck_known = sorted_unique(ids_as_keys(np.frombuffer(stored_before, dtype=np.uint8)
                                                  .reshape(-1, ID_SIZE))) if stored_before else None
        self.ckey = ckey
        self.recent = _Recent()
        self.zero_ids: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.stored_new = bytearray(stored_before)
        reuse = plan.reuse
        self.stats = {"new": 0, "reused": int(reuse.sum()), "zero": 0, "read": 0, "existing": 0}
        self.nbytes = {"new": 0, "new_stored": 0, "reused": 0, "zero": 0, "read": 0}
        if plan.prev_ids is not None and reuse.any():
            rz = ~nonzero_rows(plan.prev_ids[reuse])
            self.stats["zero"] += int(rz.sum())
            self.stats["reused"] -= int(rz.sum())
        if reuse.any():  # bytes of reused chunks
            zr = ~nonzero_rows(plan.ids[reuse])
            self.nbytes["zero"] += int(lens[reuse][zr].sum())
            self.nbytes["reused"] += int(lens[reuse][~zr].sum())

    def zero_id(self, n: int) -> bytes:
        z = self.zero_ids.get(n)
        if z is None:
            z = self.zero_ids[n] = self.repo.chunk_id(bytes(n))
        return z

    def is_known(self, cid: bytes) -> bool:
        if _in_sorted(self.known, cid):
            return True
        return _in_sorted(self.ck_known, cid) and self.repo.backend.exists(chunk_key(cid))

    def _count(self, what: str, n: int, what_bytes: str | None = None) -> None:
        with self.lock:
            self.stats[what] += 1
            self.nbytes[what_bytes or what] += n

    def __call__(self, c: int, raw: bytes) -> None:
        repo = self.repo
        cid = repo.chunk_id(raw)
        n = len(raw)
        if cid == self.zero_id(n):
            self._count("zero", n)
            return  # ids[c] stays ZERO_ID
        self.ids[c] = np.frombuffer(cid, dtype=np.uint8)
        if self.is_known(cid) or cid in self.recent:
            self._count("reused", n)
            return
        obj = encode_chunk(raw, repo.codec)
        wrote = repo.backend.put_once(chunk_key(cid), obj)
        self.recent.add(cid)
        with self.lock:
            self.stored_new.extend(cid)
            if wrote:
                self.stats["new"] += 1
                self.nbytes["new"] += n
                self.nbytes["new_stored"] += len(obj)
            else:
                self.stats["existing"] += 1
                self.nbytes["reused"] += n

    def add_read(self, n: int) -> None:
        with self.lock:
            self.nbytes["read"] += n

    def save_checkpoint(self) -> None:
        with self.lock:
            data = bytes(self.stored_new)
        if data:
            self.repo.backend.put(self.ckey, data)


class _Window:
    """A thread pool with a bounded window of chunks in flight (in order)."""

    def __init__(self, sink: _ChunkSink, concurrency: int) -> None:
        self.sink = sink
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency),
                                       thread_name_prefix="vhdcore-repo")
        self.window: deque[Future[None]] = deque()
        self.max_window = max(2, 2 * concurrency)

    def submit(self, c: int, raw: bytes) -> None:
        self.window.append(self.pool.submit(self.sink, c, raw))
        while len(self.window) > self.max_window:
            self.window.popleft().result()

    def close(self) -> BaseException | None:
        """Wait for every chunk in flight and stop the pool; the first failure."""
        err: BaseException | None = None
        for f in self.window:
            try:
                f.result()
            except BaseException as exc:  # keep the first failure
                err = err or exc
        self.window.clear()
        self.pool.shutdown(wait=True)
        return err


class _Chunker:
    """Cuts the blocks read (ascending) into the chunks not reused: a block
    holds several chunks, or a chunk gathers several blocks."""

    def __init__(self, plan: Plan, bs: int, vsize: int, window: _Window) -> None:
        self.cs, self.bs, self.vsize = plan.chunk_size, bs, vsize
        self.nchunks, self.reuse = plan.nchunks, plan.reuse
        self.window = window
        self.cur_c = -1
        self.cur_buf: bytearray | None = None

    def chunk_len(self, c: int) -> int:
        return int(min(self.cs, self.vsize - c * self.cs))

    def add(self, b: int, data: Any) -> None:
        cs, bs = self.cs, self.bs
        if cs <= bs:
            for j in range(bs // cs):
                c = b * (bs // cs) + j
                if c >= self.nchunks or self.reuse[c]:
                    continue
                n = self.chunk_len(c)
                self.window.submit(c, bytes(data[j * cs:j * cs + n]))
            return
        c = b * bs // cs
        if c != self.cur_c:
            self.finish()
            self.cur_c, self.cur_buf = c, bytearray(cs)
        assert self.cur_buf is not None
        off = b * bs - c * cs
        self.cur_buf[off:off + bs] = data[:bs]

    def finish(self) -> None:
        """Hand over the chunk being gathered, if any."""
        if self.cur_buf is not None:
            self.window.submit(self.cur_c, bytes(self.cur_buf[:self.chunk_len(self.cur_c)]))
            self.cur_buf = None


def _read_and_store(chain: Chain, plan: Plan, todo: np.ndarray, sink: _ChunkSink, rep: Any,
                    threads: int, concurrency: int, deadline: float | None,
                    cancel: threading.Event | None) -> str | None:
    """Stage 2: read the blocks ``todo`` through the merge kernel and store their
    chunks, checkpointing every :data:`CHECKPOINT_INTERVAL` seconds.  Returns why
    it stopped early (None when it did not); a failure of a chunk is raised."""
    bs = chain.block_size
    window = _Window(sink, concurrency)
    chunker = _Chunker(plan, bs, chain.virtual_size, window)
    read_total = int(len(todo)) * bs
    stopped: str | None = None
    last_ck = time.monotonic()
    it = iter_image_blocks(chain, threads=threads, blocks=todo.tolist(), free_map=plan.free_map)
    done_blocks = 0
    try:
        for blk in it:
            done_blocks += 1
            chunker.add(blk.index, blk.data)
            sink.add_read(bs)
            rep.emit(bytes_done=done_blocks * bs, bytes_total=read_total,
                     blocks_done=done_blocks, blocks_total=len(todo))
            now = time.monotonic()
            if now - last_ck > CHECKPOINT_INTERVAL:
                sink.save_checkpoint()
                last_ck = now
            if deadline is not None and now >= deadline:
                stopped = "stopped at its timeout"
                break
            if cancel is not None and cancel.is_set():
                stopped = "was cancelled"
                break
        if stopped is None:
            chunker.finish()
    except KeyboardInterrupt:
        stopped = "was interrupted"
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        err = window.close()
        if stopped is not None or err is not None:
            try:
                sink.save_checkpoint()
            except VhdError:
                pass
        if err is not None and stopped is None:
            raise err
    return stopped


def _commit(repo: Repository, chain: Chain, name: str, plan: Plan, sink: _ChunkSink,
            fs_aware: bool, t0: float) -> tuple[str, bytes, float]:
    """Write the index, then the manifest: the image exists from then on.
    Returns its ID, the index digest and the seconds the run took."""
    cs, vsize, nchunks, ids = plan.chunk_size, chain.virtual_size, plan.nchunks, plan.ids
    newest = repo.images(name)
    image_id = new_image_id(after=newest[-1].id if newest else None)
    ref = ImageRef(name, image_id)
    digest = repo.index_digest(ids.data)
    if fs_aware:
        repo.backend.put_once(f"images/{name}/{image_id}.fsmask",
                              plan.masks.astype("<u8").tobytes())
    # header and IDs written one after the other (no copy of the IDs here)
    repo.backend.put_once(repo.index_key(ref), (encode_index_header(cs, vsize, nchunks, digest),
                                                ids.data.cast("B")))
    # what the stream export needs to reproduce `image --to` byte for byte
    from ..imaging import STREAM_FORMAT

    bs = chain.block_size
    opts = {"block_size": bs, "fs_aware": bool(fs_aware)}
    stream_uuid = hashlib.sha256(json.dumps(
        {"chain": [(c["uuid"], c["size"], c["mtime_ns"]) for c in plan.identity],
         "options": opts, "format": STREAM_FORMAT}, sort_keys=True).encode()).digest()[:16]
    seconds = time.monotonic() - t0
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name, "id": image_id,
        "created": time.time(), "tool": f"vhdcore {__version__}", "virtual_size": vsize,
        "chunk_size": cs, "nchunks": nchunks, "digest": digest.hex(), "block_size": bs,
        "chain": plan.identity, "leaf": os.path.abspath(chain.leaf.path), "parent": plan.parent,
        "reuse": plan.why, "fs_aware": bool(fs_aware), "fs": plan.fs_info or {},
        "counts": dict(sink.stats), "bytes": dict(sink.nbytes),
        "stream": {"uuid": stream_uuid.hex(), "timestamp": chain.leaf.footer.timestamp},
        "verify": {"state": "unverified"}, "seconds": round(seconds, 3),
    }
    repo.backend.put_once(repo.manifest_key(ref), json.dumps(manifest, indent=1).encode())
    return image_id, digest, seconds


def _run(repo: Repository, chain: Chain, name: str, rep: Any, t0: float,
         deadline: float | None, fs_aware: bool, rehash: bool, threads: int,
         concurrency: int, cancel: threading.Event | None = None) -> RepoImage:
    """The stages of :func:`create_image`: plan (coalescing), read and store
    (uploading), commit (done)."""
    cs = repo.chunk_size
    bs = chain.block_size
    if not (cs % bs == 0 or bs % cs == 0):
        raise VhdError(f"the repository's chunk size {cs} and the chain's block size {bs} "
                       "must divide one another")
    vsize = chain.virtual_size
    rep.enter("coalescing", message="reading the chain's layers, the filesystems and the "
              "previous image of " + name, bytes_done=0, bytes_total=vsize)
    plan = plan_image(repo, chain, name, fs_aware, rehash)
    all_refs = repo.images()
    # chunks an interrupted run of this chain already stored
    ckey = f"checkpoints/{name}/{chain_tag(plan.identity, fs_aware)}"
    stored_before = b""
    try:
        stored_before = repo.backend.get(ckey)
        stored_before = stored_before[:len(stored_before) - len(stored_before) % ID_SIZE]
    except StoreNotFoundError:
        pass
    first = [plan.prev_ids] if plan.prev_ids is not None else []
    known = repo.known_ids(first, [r for r in all_refs if not (plan.base and r == plan.base)])
    lens = _chunk_lengths(plan.nchunks, cs, vsize)
    sink = _ChunkSink(repo, plan, lens, known, stored_before, ckey)
    todo = blocks_to_read(chain, plan)
    read_total = int(len(todo)) * bs
    rep.enter("uploading", message=f"{plan.why}; reading {len(todo)} blocks, reusing "
              f"{int(plan.reuse.sum())} chunks", bytes_done=0, bytes_total=read_total,
              blocks_total=len(todo))
    stopped = _read_and_store(chain, plan, todo, sink, rep, threads, concurrency, deadline,
                              cancel)
    if stopped is not None:
        raise VhdTimeoutError(
            f"image of {name} {stopped} ({sink.stats['new']} new chunks stored); run the same "
            "command again to resume (stored chunks are not uploaded again)")
    zr = ~nonzero_rows(plan.ids)  # never stored: read as zero, or never allocated
    sink.stats["zero"] = int(zr.sum())
    sink.nbytes["zero"] = int(lens[zr].sum())
    image_id, digest, seconds = _commit(repo, chain, name, plan, sink, fs_aware, t0)
    try:
        repo.backend.delete(ckey)
    except VhdError:
        pass
    ref = ImageRef(name, image_id)
    rep.enter("done", message=f"stored {ref}", bytes_done=read_total, bytes_total=read_total,
              blocks_done=len(todo), blocks_total=len(todo))
    return RepoImage(name, image_id, vsize, plan.nchunks, plan.parent, dict(sink.stats),
                     dict(sink.nbytes), seconds, digest.hex(), bool(stored_before))
