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
import xxhash

from .._version import __version__
from ..chain import Chain
from ..coalesce import FreeMap, fs_free_map, iter_image_blocks
from ..vhd.file import PathLike, VhdFile
from ..errors import StoreNotFoundError, VhdError, VhdTimeoutError
from .core import ImageRef, Repository, new_image_id, open_repo
from .format import (
    ID_SIZE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ZERO_ID,
    RepoFormatError,
    check_name,
    chunk_key,
    encode_chunk,
    encode_index_header,
    ids_as_keys,
    nonzero_rows,
    sorted_unique,
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


def layer_identity(vhd: VhdFile) -> dict[str, Any]:
    """What proves a layer unchanged: UUID, size, times, inode and a digest of
    its footer, header and BAT."""
    st = os.fstat(vhd._fd)
    h = xxhash.xxh3_128(vhd.footer.pack())
    if not vhd.is_fixed:
        assert vhd.header is not None
        h.update(vhd.header.pack())
        if vhd.bat is not None:
            h.update(np.ascontiguousarray(vhd.bat).tobytes())
    return {"path": os.path.realpath(vhd.path), "uuid": str(vhd.uuid), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "meta": h.hexdigest()}


_IDENTITY_FIELDS = ("uuid", "size", "mtime_ns", "ctime_ns", "ino", "dev", "meta")


def _same_layer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _IDENTITY_FIELDS)


def fs_mask_digests(free_map: FreeMap | None, nblocks: int, block_size: int) -> np.ndarray:
    """Per VHD block: 0 when nothing is free, 1 when all is, else a digest of
    the block's free-sector mask."""
    out = np.zeros(nblocks, dtype=np.uint64)
    if free_map is None:
        return out
    dmap = getattr(free_map, "disk_map", None)
    if dmap is None:
        for b in range(nblocks):
            m = free_map(b, block_size // 512)
            if m is not None:
                out[b] = xxhash.xxh3_64_intdigest(m) | 2
        return out
    states = dmap.block_states(block_size, nblocks)
    out[states == 2] = 1
    for b in np.nonzero(states == 1)[0].tolist():
        m = dmap.free_bitmap_for_block(b, block_size)
        out[b] = (xxhash.xxh3_64_intdigest(m) | 2) if m is not None else 0
    return out


def reusable_chunks(chain: Chain, identity: list[dict[str, Any]], prev: dict[str, Any],
                    chunk_size: int, masks: np.ndarray, prev_masks: np.ndarray | None
                    ) -> tuple[np.ndarray, str]:
    """Which chunks keep the previous image's ID without being read, and why
    (or why none do).  All three must hold for a chunk: every layer owning a
    sector of it is unchanged since ``prev`` (the previous chain is a suffix of
    this one, layer for layer); its filesystem free-sector mask is unchanged;
    ``prev`` did not verify damaged."""
    nchunks = -(-chain.virtual_size // chunk_size)
    none = np.zeros(nchunks, dtype=bool)
    if prev["verify"].get("state") == "damaged":
        return none, "previous image is damaged"
    if prev["virtual_size"] != chain.virtual_size or prev["block_size"] != chain.block_size:
        return none, "the disk's size or block size changed"
    pchain = prev["chain"]
    k = len(identity) - len(pchain)
    if k < 0 or not all(isinstance(p, dict) and _same_layer(p, n)
                        for p, n in zip(pchain, identity[k:])):
        return none, "the layers of the previous image are not all unchanged (coalesced?)"
    if prev_masks is None or len(prev_masks) != len(masks):
        return none, "no filesystem mask of the previous image"
    bs = chain.block_size
    changed = np.zeros(chain.nblocks, dtype=bool)
    for ly in chain.layers[:k]:
        if ly.is_fixed:
            changed[:] = True
        else:
            a = ly.allocated_blocks()
            changed[a[a < chain.nblocks]] = True
    changed |= masks != prev_masks
    # map blocks to chunks
    if chunk_size <= bs:
        per = bs // chunk_size
        ok = np.repeat(~changed, per)[:nchunks]
    else:
        per = chunk_size // bs
        pad = np.zeros(nchunks * per, dtype=bool)
        pad[:chain.nblocks] = changed
        ok = np.asarray(~pad.reshape(nchunks, per).any(axis=1), dtype=bool)
    return ok, f"{k} new layer(s) since the previous image"


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


def _chain_tag(identity: list[dict[str, Any]], fs_aware: bool) -> str:
    blob = json.dumps([[ly[k] for k in _IDENTITY_FIELDS] for ly in identity] + [fs_aware])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


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
            rep.stage = "failed"
            rep.emit(force=True, message=str(exc) or type(exc).__name__)
            raise
        finally:
            chain.close()
    finally:
        repo.close()


def _previous(repo: Repository, name: str) -> tuple[ImageRef, dict[str, Any]] | None:
    """The newest image of ``name`` not marked damaged (the base)."""
    for ref in reversed(repo.images(name)):
        try:
            man = repo.manifest(ref)
        except (RepoFormatError, StoreNotFoundError):
            continue
        if man["verify"].get("state") != "damaged":
            return ref, man
    return None


def _run(repo: Repository, chain: Chain, name: str, rep: Any, t0: float,
         deadline: float | None, fs_aware: bool, rehash: bool, threads: int,
         concurrency: int, cancel: threading.Event | None = None) -> RepoImage:
    cs = repo.chunk_size
    bs = chain.block_size
    if not (cs % bs == 0 or bs % cs == 0):
        raise VhdError(f"the repository's chunk size {cs} and the chain's block size {bs} "
                       "must divide one another")
    vsize = chain.virtual_size
    nchunks = -(-vsize // cs)
    rep.enter("coalescing", message="reading the chain's layers, the filesystems and the "
              "previous image of " + name, bytes_done=0, bytes_total=vsize)
    identity = [layer_identity(ly) for ly in chain.layers]
    free_map: FreeMap | None = None
    fs_info: dict[str, Any] | None = None
    if fs_aware:
        free_map, fs_info = fs_free_map(chain)
    masks = fs_mask_digests(free_map, chain.nblocks, bs)
    ids = np.zeros((nchunks, ID_SIZE), dtype=np.uint8)
    reuse = np.zeros(nchunks, dtype=bool)
    parent: str | None = None
    why = "no previous image"
    prev_ids: np.ndarray | None = None
    base = _previous(repo, name)
    all_refs = repo.images()
    if base is not None:
        bref, bman = base
        parent = bref.id
        try:
            prev_ids = repo.index(bref, bman)
            pm: np.ndarray | None = None
            try:
                raw = repo.backend.get(f"images/{bref.name}/{bref.id}.fsmask")
                if len(raw) % 8 == 0:
                    pm = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
            except StoreNotFoundError:
                pm = None if bman.get("fs_aware") else np.zeros(chain.nblocks, dtype=np.uint64)
            if rehash:
                why = "--rehash: every chunk read and hashed"
            elif bool(bman.get("fs_aware")) != bool(fs_aware):
                why = "the previous image was made with another --fs-aware setting"
            else:
                reuse, why = reusable_chunks(chain, identity, bman, cs, masks, pm)
                ids[reuse] = prev_ids[reuse]
        except RepoFormatError as exc:
            why = f"previous image unusable ({exc})"
            prev_ids = None
    # chunks an interrupted run of this chain already stored
    tag = _chain_tag(identity, fs_aware)
    ckey = f"checkpoints/{name}/{tag}"
    stored_before = b""
    try:
        stored_before = repo.backend.get(ckey)
        stored_before = stored_before[:len(stored_before) - len(stored_before) % ID_SIZE]
    except StoreNotFoundError:
        pass
    resumed = bool(stored_before)
    first = [prev_ids] if prev_ids is not None else []
    known = repo.known_ids(first, [r for r in all_refs if not (base and r == base[0])])
    # a checkpoint is no committed index: its IDs are checked before use
    ck_known = sorted_unique(ids_as_keys(np.frombuffer(stored_before, dtype=np.uint8)
                                     .reshape(-1, ID_SIZE))) if stored_before else None
    recent = _Recent()
    zero_ids: dict[int, bytes] = {}

    def zero_id(n: int) -> bytes:
        z = zero_ids.get(n)
        if z is None:
            z = zero_ids[n] = repo.chunk_id(bytes(n))
        return z

    def in_sorted(arr: np.ndarray | None, cid: bytes) -> bool:
        if arr is None or len(arr) == 0:
            return False
        i = int(np.searchsorted(arr, np.void(cid)))
        return i < len(arr) and bytes(arr[i]) == cid

    def is_known(cid: bytes) -> bool:
        if in_sorted(known, cid):
            return True
        return in_sorted(ck_known, cid) and repo.backend.exists(chunk_key(cid))

    stats = {"new": 0, "reused": int(reuse.sum()), "zero": 0, "read": 0, "existing": 0}
    nbytes = {"new": 0, "new_stored": 0, "reused": 0, "zero": 0, "read": 0}
    if prev_ids is not None and reuse.any():
        rz = ~nonzero_rows(prev_ids[reuse])
        stats["zero"] += int(rz.sum())
        stats["reused"] -= int(rz.sum())
    # bytes of reused chunks (the last chunk may be short)
    lens = np.full(nchunks, cs, dtype=np.int64)
    if nchunks:
        lens[-1] = vsize - (nchunks - 1) * cs
    if reuse.any():
        zr = ~nonzero_rows(ids[reuse])
        nbytes["zero"] += int(lens[reuse][zr].sum())
        nbytes["reused"] += int(lens[reuse][~zr].sum())
    stored_new = bytearray(stored_before)
    lock = threading.Lock()

    def work(c: int, raw: bytes) -> None:
        cid = repo.chunk_id(raw)
        n = len(raw)
        if cid == zero_id(n):
            with lock:
                stats["zero"] += 1
                nbytes["zero"] += n
            return  # ids[c] stays ZERO_ID
        ids[c] = np.frombuffer(cid, dtype=np.uint8)
        if is_known(cid) or cid in recent:
            with lock:
                stats["reused"] += 1
                nbytes["reused"] += n
            return
        obj = encode_chunk(raw, repo.codec)
        wrote = repo.backend.put_once(chunk_key(cid), obj)
        recent.add(cid)
        with lock:
            stored_new.extend(cid)
            if wrote:
                stats["new"] += 1
                nbytes["new"] += n
                nbytes["new_stored"] += len(obj)
            else:
                stats["existing"] += 1
                nbytes["reused"] += n

    def save_checkpoint() -> None:
        with lock:
            data = bytes(stored_new)
        if data:
            repo.backend.put(ckey, data)

    # blocks to read: those overlapping a chunk not reused, that some layer holds
    need = ~reuse
    need_blocks: np.ndarray
    if cs <= bs:
        per = bs // cs
        pad = np.zeros(chain.nblocks * per, dtype=bool)
        pad[:nchunks] = need
        need_blocks = np.asarray(pad.reshape(chain.nblocks, per).any(axis=1))
    else:
        per = cs // bs
        need_blocks = np.repeat(need, per)[:chain.nblocks]
    alloc = chain.allocated_blocks()
    todo = alloc[need_blocks[alloc]]
    read_total = int(len(todo)) * bs
    rep.enter("uploading", message=f"{why}; reading {len(todo)} blocks, reusing "
              f"{int(reuse.sum())} chunks", bytes_done=0, bytes_total=read_total,
              blocks_total=len(todo))
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="vhdcore-repo")
    window: deque[Future[None]] = deque()
    max_window = max(2, 2 * concurrency)
    stopped: str | None = None
    last_ck = time.monotonic()
    cur_c = -1
    cur_buf: bytearray | None = None

    def submit(c: int, raw: bytes) -> None:
        window.append(pool.submit(work, c, raw))
        while len(window) > max_window:
            window.popleft().result()

    def chunk_len(c: int) -> int:
        return int(min(cs, vsize - c * cs))

    it = iter_image_blocks(chain, threads=threads, blocks=todo.tolist(), free_map=free_map)
    done_blocks = 0
    try:
        try:
            for blk in it:
                b = blk.index
                done_blocks += 1
                if cs <= bs:
                    for j in range(bs // cs):
                        c = b * (bs // cs) + j
                        if c >= nchunks or reuse[c]:
                            continue
                        n = chunk_len(c)
                        submit(c, bytes(blk.data[j * cs:j * cs + n]))
                else:
                    c = b * bs // cs
                    if c != cur_c:
                        if cur_buf is not None:
                            submit(cur_c, bytes(cur_buf[:chunk_len(cur_c)]))
                        cur_c, cur_buf = c, bytearray(cs)
                    assert cur_buf is not None
                    off = b * bs - c * cs
                    cur_buf[off:off + bs] = blk.data[:bs]
                with lock:
                    nbytes["read"] += bs
                rep.emit(bytes_done=done_blocks * bs, bytes_total=read_total,
                         blocks_done=done_blocks, blocks_total=len(todo))
                now = time.monotonic()
                if now - last_ck > CHECKPOINT_INTERVAL:
                    save_checkpoint()
                    last_ck = now
                if deadline is not None and now >= deadline:
                    stopped = "stopped at its timeout"
                    break
                if cancel is not None and cancel.is_set():
                    stopped = "was cancelled"
                    break
            if stopped is None and cur_buf is not None:
                submit(cur_c, bytes(cur_buf[:chunk_len(cur_c)]))
        except KeyboardInterrupt:
            stopped = "was interrupted"
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            err: BaseException | None = None
            for f in window:
                try:
                    f.result()
                except BaseException as exc:  # keep the first failure
                    err = err or exc
            window.clear()
            pool.shutdown(wait=True)
            if stopped is not None or err is not None:
                try:
                    save_checkpoint()
                except VhdError:
                    pass
            if err is not None and stopped is None:
                raise err
        if stopped is not None:
            raise VhdTimeoutError(
                f"image of {name} {stopped} ({stats['new']} new chunks stored); run the same "
                "command again to resume (stored chunks are not uploaded again)")
    except BaseException:
        raise
    zr = ~nonzero_rows(ids)  # never stored: read as zero, or never allocated
    stats["zero"] = int(zr.sum())
    nbytes["zero"] = int(lens[zr].sum())
    # ------------------------------------------------ commit: index, manifest
    newest = repo.images(name)
    image_id = new_image_id(after=newest[-1].id if newest else None)
    ref = ImageRef(name, image_id)
    digest = repo.index_digest(ids.data)
    if fs_aware:
        repo.backend.put_once(f"images/{name}/{image_id}.fsmask",
                              masks.astype("<u8").tobytes())
    # header and IDs written one after the other (no copy of the IDs here)
    repo.backend.put_once(repo.index_key(ref), (encode_index_header(cs, vsize, nchunks, digest),
                                                ids.data.cast("B")))
    # what the stream export needs to reproduce `image --to` byte for byte
    from ..imaging import STREAM_FORMAT

    opts = {"block_size": bs, "fs_aware": bool(fs_aware)}
    stream_uuid = hashlib.sha256(json.dumps(
        {"chain": [(c["uuid"], c["size"], c["mtime_ns"]) for c in identity],
         "options": opts, "format": STREAM_FORMAT}, sort_keys=True).encode()).digest()[:16]
    seconds = time.monotonic() - t0
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name, "id": image_id,
        "created": time.time(), "tool": f"vhdcore {__version__}", "virtual_size": vsize,
        "chunk_size": cs, "nchunks": nchunks, "digest": digest.hex(), "block_size": bs,
        "chain": identity, "leaf": os.path.abspath(chain.leaf.path), "parent": parent,
        "reuse": why, "fs_aware": bool(fs_aware), "fs": fs_info or {},
        "counts": dict(stats), "bytes": dict(nbytes),
        "stream": {"uuid": stream_uuid.hex(), "timestamp": chain.leaf.footer.timestamp},
        "verify": {"state": "unverified"}, "seconds": round(seconds, 3),
    }
    repo.backend.put_once(repo.manifest_key(ref), json.dumps(manifest, indent=1).encode())
    try:
        repo.backend.delete(ckey)
    except VhdError:
        pass
    rep.enter("done", message=f"stored {ref}", bytes_done=read_total, bytes_total=read_total,
              blocks_done=len(todo), blocks_total=len(todo))
    return RepoImage(name, image_id, vsize, nchunks, parent, dict(stats), dict(nbytes), seconds,
                     digest.hex(), resumed)


_ = ZERO_ID, ids_as_keys
