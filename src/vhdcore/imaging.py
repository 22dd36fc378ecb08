"""The imaging job: a VHD chain to a compressed, segmented image in an object
store, with the familiar stages, fine progress, timeouts and resume.

The job runs in the three published stages:

``coalescing`` (25%)
    The chain is read once, youngest layer first per block, through the
    merge kernel; blocks whose visible content is all zeros (or, with
    ``fs_aware``, that the guest filesystem marks free) are dropped.  The
    result is the *plan*: which blocks the image stores, each with an xxh3
    fingerprint.  Reading is parallel and fast (no compression here).
``uploading`` (50%)
    The image stream -- a sparse dynamic VHD: head (footer copy, dynamic
    header, BAT), one frame per stored block, footer -- is produced in order:
    merge threads, an lz4 pool and an upload pool run concurrently with
    bounded queues, so the slowest stage sets the pace and memory stays
    bounded.  The SHA-256 of the uncompressed stream is computed on the way.
``done`` (100%)
    The manifest (the "image is complete" marker) is written with the
    image's metadata and the job state is removed.

A job state file records the plan and every segment uploaded.  A timeout,
Ctrl-C, a crash or a lost server leaves it behind; ``resume=True``
continues: blocks of segments already in the store are merged again (for the
stream digest) but never compressed or sent again.

Over a complete image, the new segments go to another *generation* of the
target (recorded in the job state) and the old image stays complete and
restorable until the new manifest replaces it; then what only the old image
used is deleted (see :mod:`vhdcore.store.base`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from . import _io
from ._version import __version__
from .chain import Chain
from .coalesce import DynamicLayout, FreeMap, fs_free_map, iter_image_blocks
from .compress import compress_frame, frame_bound
from .disk import PathLike
from .errors import (
    IntegrityError,
    JobStateError,
    OutputExistsError,
    StoreError,
    StoreNotFoundError,
    VhdTimeoutError,
)
from .store import SegmentUploader, choose_segment_size, image_metadata, open_store
from .store.base import Store

__all__ = [
    "ProgressEvent",
    "ImageResult",
    "create_image",
    "job_state_path",
    "STAGES",
    "STAGE_PERCENT",
    "STREAM_FORMAT",
    "EVENT_VERSION",
]

#: the stages of a job and the percentage the imaging service publishes for each
STAGES = ("queued", "coalescing", "uploading", "done", "failed")
STAGE_PERCENT = {"queued": 0, "coalescing": 25, "uploading": 50, "done": 100}
#: identifies the layout of the image stream (a change makes old states invalid)
STREAM_FORMAT = "vhd-dynamic-ascending/1"
STATE_VERSION = 1
#: version of the JSON form of a ProgressEvent (``vhdcore image --json``);
#: raised when a field changes meaning or disappears
EVENT_VERSION = 1
#: the rate is measured over this many seconds of progress, and reported
#: only once a stage has run for RATE_MIN_SECONDS
RATE_WINDOW_SECONDS = 5.0
RATE_MIN_SECONDS = 1.0
#: the fields of one ``"event": "progress"`` line of ``vhdcore image --json``
#: (schema version EVENT_VERSION): name, JSON type, meaning.  docs/cli.md is
#: generated from this table and a test checks the emitted lines against it.
EVENT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("event", "string", '"progress" (other lines: "error" with exit_code, error, message and '
                        'resumable; "result" with the ImageResult fields)'),
    ("version", "integer", f"schema version of the line, {EVENT_VERSION}"),
    ("stage", "string", "queued, coalescing, uploading, done or failed"),
    ("percent", "integer", "the published figure of the stage: 0, 25, 50, 100"),
    ("fraction", "number", "progress inside the stage, 0 to 1 (bytes_done / bytes_total)"),
    ("bytes_done", "integer", "bytes of the stage done (coalescing: virtual disk; uploading: "
                              "image stream)"),
    ("bytes_total", "integer", "bytes of the stage in all"),
    ("blocks_done", "integer", "blocks of the stage done"),
    ("blocks_total", "integer", "blocks of the stage in all"),
    ("rate", "number", f"bytes per second over the last {RATE_WINDOW_SECONDS:g} s; absent "
                       "until the stage has run long enough for it to mean something"),
    ("eta", "number", "seconds until the job is done; absent while unknown"),
    ("elapsed", "number", "seconds since the job started"),
    ("message", "string", "what the job is doing, or why it failed"),
)


@dataclass
class ProgressEvent:
    """One progress report of an imaging job.

    ``percent`` is the published figure of the stage (25, 50, 100);
    ``fraction`` is the fine progress inside the stage (0..1) computed from
    ``bytes_done``/``bytes_total``.  ``rate`` is bytes per second in this
    stage, measured over the last few seconds (None until the stage has run
    long enough for it to mean something); ``eta`` the estimated seconds
    until the job is done (None while unknown).
    """

    stage: str
    percent: int
    bytes_done: int = 0
    bytes_total: int = 0
    blocks_done: int = 0
    blocks_total: int = 0
    rate: float | None = None
    eta: float | None = None
    elapsed: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        """``bytes_done / bytes_total`` of the current stage (0.0 when the total is 0)."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (one line of ``vhdcore image
        --json``, schema version :data:`EVENT_VERSION`; ``rate`` and ``eta``
        are left out while unknown)."""
        d: dict[str, Any] = {"version": EVENT_VERSION, **asdict(self)}
        d["fraction"] = round(self.fraction, 6)
        if self.rate is None:
            del d["rate"]
        else:
            d["rate"] = round(self.rate, 1)
        if self.eta is None:
            del d["eta"]
        else:
            d["eta"] = round(self.eta, 2)
        d["elapsed"] = round(self.elapsed, 3)
        return d


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class ImageResult:
    """What a finished job stored."""

    url: str
    virtual_size: int
    blocks_stored: int
    stream_size: int
    compressed_size: int
    segments: int
    segments_uploaded: int
    segments_skipped: int
    sha256: str
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
def _state_home() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return os.path.join(base, "vhdcore", "jobs")


def job_state_path(target_url: str, state_dir: PathLike | None = None) -> str:
    """Where the state of a job imaging to ``target_url`` lives: beside the
    output for a ``file://`` target, else in ``state_dir`` (default
    ``$XDG_STATE_HOME/vhdcore/jobs``)."""
    from urllib.parse import unquote, urlparse

    tag = hashlib.sha256(target_url.encode()).hexdigest()[:12]
    parsed = urlparse(target_url)
    if state_dir is None and parsed.scheme in ("file", ""):
        path = unquote(parsed.path) if parsed.scheme == "file" else target_url
        return os.path.join(os.path.dirname(os.path.abspath(path)),
                            os.path.basename(path) + ".vhdcore-job.json")
    d = os.fspath(state_dir) if state_dir is not None else _state_home()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target_url)[-80:]
    return os.path.join(d, f"{safe}-{tag}.vhdcore-job.json")


def _chain_identity(chain: Chain) -> list[dict[str, Any]]:
    out = []
    for ly in chain.layers:
        st = os.fstat(ly._fd)
        out.append({"path": os.path.realpath(ly.path), "uuid": str(ly.uuid),
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _job_id(identity: list[dict[str, Any]], target: str, options: dict[str, Any]) -> str:
    blob = json.dumps({"chain": identity, "target": target, "options": options,
                       "format": STREAM_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_state(path: str, state: dict[str, Any]) -> None:
    _io.make_dirs(os.path.dirname(path))
    _io.atomic_write(path, json.dumps(state).encode(), private=True)


def _remove_state(path: str) -> None:
    """Remove the job state for good (a finished or discarded job)."""
    os.unlink(path)
    _io.fsync_dir(os.path.dirname(path))


def _block_fingerprint(blk: Any) -> str:
    """xxh3 of a merged block as stored (bitmap + data): the plan records it in
    the coalescing pass and the upload pass checks the chain still agrees."""
    fp = xxhash.xxh3_64(blk.bitmap)
    fp.update(blk.data)
    return fp.hexdigest()


def _load_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JobStateError(f"{path}: unreadable job state ({exc}); remove it or run with "
                            "--restart") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise JobStateError(f"{path}: not a vhdcore job state of version {STATE_VERSION}")
    return state


# --------------------------------------------------------------------------
class _Reporter:
    """Turns counters into rate-limited ProgressEvents with an ETA."""

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.2) -> None:
        self.callback = callback
        self.interval = interval
        self.t0 = time.monotonic()
        self.stage_t0 = self.t0
        self.last = 0.0
        self.stage = "queued"
        self.coalesce_rate: float | None = None
        self.upload_estimate: float | None = None
        self.last_event: ProgressEvent | None = None
        # (time, bytes_done) samples of the current stage, for the rate
        self.samples: deque[tuple[float, int]] = deque()

    def enter(self, stage: str, message: str = "", **kw: int) -> None:
        if self.stage == "coalescing" and stage != "coalescing" and self.last_event:
            self.coalesce_rate = self.last_event.rate
        self.stage = stage
        self.stage_t0 = time.monotonic()
        self.samples.clear()
        self.emit(force=True, message=message, **kw)

    def _rate(self, now: float, bytes_done: int) -> float | None:
        """Bytes per second over the last RATE_WINDOW_SECONDS of this stage,
        None until the stage has run RATE_MIN_SECONDS (a rate over a few
        milliseconds -- or over bytes a resumed job skipped -- means nothing)."""
        s = self.samples
        if not s or bytes_done != s[-1][1] or now - s[-1][0] >= 0.1:
            s.append((now, bytes_done))
        while len(s) > 2 and now - s[1][0] >= RATE_WINDOW_SECONDS:
            s.popleft()
        t_first, b_first = s[0]
        span = now - t_first
        if span < RATE_MIN_SECONDS or now - self.stage_t0 < RATE_MIN_SECONDS:
            return None
        return max(0.0, (bytes_done - b_first) / span)

    def emit(self, *, force: bool = False, message: str = "", bytes_done: int = 0,
             bytes_total: int = 0, blocks_done: int = 0, blocks_total: int = 0,
             upload_total: int | None = None) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = self._rate(now, bytes_done)
        eta: float | None = None
        if rate and bytes_total:
            eta = (bytes_total - bytes_done) / rate
            if self.stage == "coalescing" and upload_total:
                # assume the upload stage runs at about a third of the scan
                eta += upload_total / (rate / 3)
        if self.stage == "done":
            eta = 0.0
        ev = ProgressEvent(self.stage, STAGE_PERCENT.get(self.stage, 0), bytes_done, bytes_total,
                           blocks_done, blocks_total, rate, eta, now - self.t0, message)
        if self.stage == "failed" and self.last_event is not None:
            ev.percent = self.last_event.percent
        self.last_event = ev
        if self.callback is not None:
            self.callback(ev)


# --------------------------------------------------------------------------
def create_image(leaf: PathLike, target_url: str, *, threads: int = 2,
                 compress_threads: int | None = None, concurrency: int = 4,
                 segment_size: int | None = None, timeout: float | None = None,
                 coalesce_timeout: float | None = None, resume: bool = False,
                 restart: bool = False, state_dir: PathLike | None = None,
                 progress: ProgressCallback | None = None, fs_aware: bool = True,
                 free_map: FreeMap | None = None, chain_options: dict[str, Any] | None = None,
                 store_options: dict[str, Any] | None = None,
                 extra_metadata: dict[str, str] | None = None,
                 replace: bool = False,
                 upload_gate: Callable[[int], None] | None = None) -> ImageResult:
    """Image the chain of ``leaf`` to ``target_url`` (``file://``,
    ``swift://``, ``s3://``).  See the module docstring for the stages.

    ``timeout`` bounds the whole job and ``coalesce_timeout`` the coalescing
    stage (seconds); reaching either stops at a safe point, saves the job
    state and raises :class:`VhdTimeoutError`.  Ctrl-C does the same.
    ``resume=True`` continues from the state (which must belong to this job);
    ``restart=True`` discards an old state.  Without either, an existing state
    is an error (so a job is never resumed or discarded by accident).

    ``fs_aware`` (the default, as for :func:`~vhdcore.coalesce.flatten`
    and :func:`~vhdcore.estimate.estimate`) drops what the guest's
    filesystems mark free (see :mod:`vhdcore.fsmap`); ``free_map`` supplies
    such a map directly.

    Before anything is read or recorded the target is checked (credentials,
    reachability; a missing ``file://`` directory is created with its
    parents, a missing Swift container and segment container are created), so
    a job that cannot start leaves no job state behind.  An image that
    already exists at ``target_url`` is refused
    (:class:`~vhdcore.errors.OutputExistsError`) unless ``replace``.

    ``upload_gate(nbytes)``, if given, is called with each segment's size
    before the segment is handed to the uploader and may block (the fleet's
    shared bandwidth budget waits here, see :mod:`vhdcore.fleet`).

    The source chain is only read.
    """
    t0 = time.monotonic()
    rep = _Reporter(progress)
    rep.enter("queued", message=f"imaging {os.fspath(leaf)} to {target_url}")
    stage_seconds: dict[str, float] = {}
    deadline = t0 + timeout if timeout is not None else None
    chain = Chain.open(leaf, **(chain_options or {}))
    try:
        store = open_store(target_url, **(store_options or {}))
    except BaseException:
        chain.close()
        raise
    try:
        return _run(chain, store, target_url, rep, t0, deadline, coalesce_timeout, threads,
                    compress_threads or threads, concurrency, segment_size, resume, restart,
                    state_dir, fs_aware, free_map, extra_metadata or {}, stage_seconds, replace,
                    upload_gate)
    except BaseException as exc:
        rep.stage = "failed"
        rep.emit(force=True, message=str(exc) or type(exc).__name__)
        raise
    finally:
        store.close()
        chain.close()


def _run(chain: Chain, store: Store, target_url: str, rep: _Reporter, t0: float,
         deadline: float | None, coalesce_timeout: float | None, threads: int,
         compress_threads: int, concurrency: int, segment_size: int | None, resume: bool,
         restart: bool, state_dir: PathLike | None, fs_aware: bool, free_map: FreeMap | None,
         extra_metadata: dict[str, str], stage_seconds: dict[str, float],
         replace: bool = False,
         upload_gate: Callable[[int], None] | None = None) -> ImageResult:
    options = {"block_size": chain.block_size, "fs_aware": bool(fs_aware or free_map)}
    identity = _chain_identity(chain)
    job_id = _job_id(identity, target_url, options)
    spath = job_state_path(target_url, state_dir)
    old = _load_state(spath)
    resume_hint = f"run the same command with --resume to continue (job state: {spath})"
    if resume and restart:
        raise JobStateError("--resume and --restart exclude each other")
    if old is not None and not resume and not restart:
        raise JobStateError(
            f"an interrupted job to {target_url} left its state in {spath}; run with --resume "
            "to continue it or --restart to start over")
    if old is None and resume:
        raise JobStateError(f"nothing to resume: no job state at {spath}")
    if old is not None and resume and old.get("job_id") != job_id:
        raise JobStateError(
            f"{spath} belongs to another job (other source chain, target or options, or the "
            "chain changed since); run with --restart to start over")
    # the target, before anything is recorded: a job that cannot start leaves
    # no state behind (and nothing to resume)
    store.prepare_write(create=True)
    if not resume:
        _refuse_existing_image(store, target_url, replace)
    if old is not None and restart:
        _remove_state(spath)
        old = None
    state: dict[str, Any] = old or {
        "version": STATE_VERSION, "tool": f"vhdcore {__version__}", "job_id": job_id,
        "target": target_url, "leaf": os.path.abspath(chain.leaf.path), "chain": identity,
        "options": options, "created": time.time(), "stage": "coalescing",
        "scanned_to": 0, "plan": [], "segments": {},
    }
    resumed = old is not None
    fs_info: dict[str, Any] | None = None
    if fs_aware and free_map is None:
        free_map, fs_info = fs_free_map(chain)
    _save_state(spath, state)

    # ---------------------------------------------------------- coalescing
    tc = time.monotonic()
    candidates = [int(b) for b in chain.allocated_blocks()]
    total_blocks = len(candidates)
    vsize = chain.virtual_size
    if state["stage"] == "coalescing":
        plan: list[list[Any]] = state["plan"]
        start = int(state["scanned_to"])
        todo = [b for b in candidates if b >= start]
        done_blocks = total_blocks - len(todo)
        rep.enter("coalescing", message="merging the chain and dropping empty blocks",
                  bytes_done=start * chain.block_size, bytes_total=vsize,
                  blocks_done=done_blocks, blocks_total=total_blocks)
        c_deadline = tc + coalesce_timeout if coalesce_timeout is not None else None
        stopped: str | None = None
        it = iter_image_blocks(chain, threads=threads, blocks=todo, free_map=free_map)
        pos = 0
        try:
            for blk in it:
                while pos < len(todo) and todo[pos] <= blk.index:
                    pos += 1
                plan.append([blk.index, _block_fingerprint(blk), blk.sectors_set])
                now = time.monotonic()
                done = min(vsize, (blk.index + 1) * chain.block_size)
                rep.emit(bytes_done=done, bytes_total=vsize, blocks_done=done_blocks + pos,
                         blocks_total=total_blocks, upload_total=len(plan) * chain.block_size)
                if c_deadline is not None and now >= c_deadline:
                    stopped = "coalesce timeout"
                if deadline is not None and now >= deadline:
                    stopped = "timeout"
                if stopped:
                    state["scanned_to"] = blk.index + 1
                    break
            else:
                state["scanned_to"] = chain.nblocks
                rep.emit(force=True, bytes_done=vsize, bytes_total=vsize,
                         blocks_done=total_blocks, blocks_total=total_blocks)
        except KeyboardInterrupt:
            state["scanned_to"] = plan[-1][0] + 1 if plan else start
            _save_state(spath, state)
            raise VhdTimeoutError(f"imaging interrupted while coalescing; {resume_hint}") from None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if stopped:
            _save_state(spath, state)
            raise VhdTimeoutError(f"imaging stopped at its {stopped} while coalescing "
                                  f"({len(plan)} blocks planned); {resume_hint}")
        state["stage"] = "uploading"
        _save_state(spath, state)
    stage_seconds["coalescing"] = time.monotonic() - tc

    # ---------------------------------------------------------- uploading
    tu = time.monotonic()
    plan = state["plan"]
    stored = [int(p[0]) for p in plan]
    # the stream depends only on the chain's content and the options: the
    # image's UUID comes from the chain's identity and its time stamp is the
    # leaf's, so two runs of the same chain store byte-identical images
    image_id = hashlib.sha256(json.dumps(
        {"chain": [(c["uuid"], c["size"], c["mtime_ns"]) for c in identity],
         "options": options, "format": STREAM_FORMAT}, sort_keys=True).encode()).digest()[:16]
    layout = DynamicLayout(vsize, chain.block_size, unique_id=image_id,
                           timestamp=chain.leaf.footer.timestamp)
    head = layout.head(stored)
    tail = layout.tail()
    stream_size = layout.stream_size(len(stored))
    if segment_size is None:
        segment_size = int(state.get("segment_size") or 0) or choose_segment_size(
            frame_bound(stream_size) + 64 * len(stored), store.segment_limits(),
            max_frame_size=frame_bound(layout.block_stride))
    limits = store.segment_limits()
    floor = limits.min_segment_size + frame_bound(layout.block_stride) + 4096 \
        if limits.min_segment_size > 1 else 1
    if segment_size < floor:
        # segments close before a frame that does not fit: leave room for one
        # frame above the target's minimum part size (S3: 5 MiB)
        segment_size = -(-floor // (1 << 20)) << 20
    if state.get("segment_size") not in (None, segment_size):
        raise JobStateError(f"{spath}: the job used segments of {state['segment_size']} bytes, "
                            f"not {segment_size}; resume without --segment-size")
    state["segment_size"] = segment_size
    rep.enter("uploading", message=f"compressing and uploading {len(stored)} blocks",
              bytes_done=0, bytes_total=stream_size, blocks_total=len(stored))
    sha = hashlib.sha256()
    seg_lock = threading.Lock()
    done_segments: dict[str, dict[str, Any]] = state["segments"]
    pending_ranges: dict[int, tuple[int, int]] = {}

    def on_segment(info: Any, uploaded: bool) -> None:
        with seg_lock:
            first, count = pending_ranges.pop(info.index)
            done_segments[str(info.index)] = {"first": first, "count": count, "size": info.size,
                                              "etag": info.etag}

    # the new image's segments go under a generation the image now at the
    # target does not use: that one stays complete and restorable until the
    # new manifest replaces it (then its segments are deleted)
    generation = state.get("generation")
    if generation is None or generation == store.current_generation():
        if generation is not None:
            done_segments.clear()  # that generation now holds a complete image
        generation = store.new_generation(seed=job_id)
        state["generation"] = generation
        _save_state(spath, state)
    store.set_generation(generation)
    uploader = SegmentUploader(store, concurrency=concurrency,
                               max_pending=max(1, min(2 * concurrency,
                                                      (256 << 20) // max(1, segment_size))),
                               progress=on_segment)
    existing = uploader.existing_segments()
    # segments of the state that the store still has, by first frame
    reusable: dict[int, tuple[int, dict[str, Any]]] = {}
    k: str | int  # a key of the job state (str) here, a segment number (int) below
    for k, rec in done_segments.items():
        have = existing.get(int(k))
        if have is not None and have.size == rec["size"] and have.etag == rec["etag"]:
            reusable[int(rec["first"])] = (int(k), rec)
    done_segments.clear()
    for k, rec in reusable.values():
        done_segments[str(k)] = rec

    nframes = len(stored) + 2
    pool = ThreadPoolExecutor(max_workers=max(1, compress_threads),
                              thread_name_prefix="vhdcore-lz4")
    window: deque[tuple[int, Future[bytes] | None]] = deque()
    max_window = 2 * max(1, compress_threads)
    seg_index = 0
    seg_first = 0
    seg_parts: list[bytes] = []
    seg_bytes = 0
    skip_until = -1  # frames < this belong to a reused segment
    stopped = None
    bytes_done = 0
    last_save = time.monotonic()

    def flush_segment(next_first: int) -> None:
        nonlocal seg_index, seg_parts, seg_bytes, seg_first
        if not seg_parts:
            return
        data = b"".join(seg_parts)
        if upload_gate is not None:
            upload_gate(len(data))
        with seg_lock:
            pending_ranges[seg_index] = (seg_first, next_first - seg_first)
        uploader.submit(seg_index, data)
        rep.emit(force=True, bytes_done=bytes_done, bytes_total=stream_size,
                 blocks_done=min(len(stored), max(0, next_first - 1)), blocks_total=len(stored))
        seg_index += 1
        seg_parts, seg_bytes = [], 0
        seg_first = next_first

    def take_frame(fidx: int, frame: bytes | None) -> None:
        """Pack frame ``fidx`` (None when it belongs to a reused segment)."""
        nonlocal seg_first, seg_bytes
        if frame is None:
            return
        if seg_parts and seg_bytes + len(frame) > segment_size:
            flush_segment(fidx)
        if not seg_parts:
            seg_first = fidx
        seg_parts.append(frame)
        seg_bytes += len(frame)

    def drain(limit: int) -> None:
        while len(window) > limit:
            fidx, fut = window.popleft()
            take_frame(fidx, fut.result() if fut is not None else None)

    def frames_raw() -> Iterator[tuple[int, bytes | memoryview, int]]:
        """(frame index, uncompressed bytes, block rank or -1) in stream order."""
        yield 0, head, -1
        rank = 0
        for blk in iter_image_blocks(chain, threads=threads, blocks=stored, free_map=free_map):
            if blk.index != stored[rank]:
                raise IntegrityError(f"block {blk.index} of {chain.leaf.path} appeared where "
                                     f"the plan has block {stored[rank]}: the chain changed")
            # one allocation and one copy (bytes(a) + bytes(b) made three, and the
            # 2 MiB temporaries went through mmap/munmap: ~1.5 vs ~14 GB/s)
            buf = b"".join((blk.bitmap, blk.data))
            if _block_fingerprint(blk) != plan[rank][1]:
                raise IntegrityError(
                    f"block {blk.index} of {chain.leaf.path} differs from what the coalescing "
                    "stage read: the chain changed during imaging")
            yield rank + 1, buf, rank
            rank += 1
        if rank != len(stored):
            raise IntegrityError(f"{chain.leaf.path}: {len(stored) - rank} planned blocks "
                                 "now read as empty: the chain changed during imaging")
        yield nframes - 1, tail, -1

    try:
        try:
            for fidx, raw, rank in frames_raw():
                sha.update(raw)
                bytes_done += len(raw)
                if fidx in reusable:
                    # the segment holding frames [first, first+count) is in the store
                    drain(0)
                    flush_segment(fidx)
                    k, rec = reusable[fidx]
                    if k != seg_index:
                        raise JobStateError(f"{spath}: segment {k} recorded at frame {fidx} "
                                            f"but this run numbers it {seg_index}")
                    uploader.adopt(existing[k])
                    skip_until = fidx + int(rec["count"])
                    seg_index += 1
                    seg_first = skip_until
                if fidx < skip_until:
                    window.append((fidx, None))
                else:
                    window.append((fidx, pool.submit(compress_frame, raw)))
                drain(max_window)
                rep.emit(bytes_done=bytes_done, bytes_total=stream_size,
                         blocks_done=max(0, rank + 1), blocks_total=len(stored))
                now = time.monotonic()
                if deadline is not None and now >= deadline and fidx < nframes - 1:
                    stopped = "timeout"
                    break
                if now - last_save > 2.0:
                    with seg_lock:
                        _save_state(spath, state)
                    last_save = now
            if stopped is None:
                drain(0)
                flush_segment(nframes)
        except KeyboardInterrupt:
            stopped = "interrupt"
        if stopped is not None:
            # let what was already handed to the uploader finish, then save
            window.clear()
            try:
                uploader.wait()
            finally:
                uploader.close()
                with seg_lock:
                    _save_state(spath, state)
            what = "was interrupted" if stopped == "interrupt" else "stopped at its timeout"
            raise VhdTimeoutError(f"imaging {what} while uploading ({len(done_segments)} "
                                  f"segments stored); {resume_hint}")
        digest = sha.hexdigest()
        meta = image_metadata(sha256=digest, stream_size=stream_size, virtual_size=vsize,
                              **{"block-size": str(chain.block_size),
                                 "blocks-stored": str(len(stored)),
                                 "fs-aware": "yes" if options["fs_aware"] else "no",
                                 "job": job_id[:16]})
        if fs_info is not None:
            meta.update(_fs_metadata(fs_info))
        meta.update(extra_metadata)
        try:
            manifest = uploader.finish(meta)
            rep.emit(force=True, bytes_done=stream_size, bytes_total=stream_size,
                     blocks_done=len(stored), blocks_total=len(stored))
        finally:
            with seg_lock:
                _save_state(spath, state)
    except BaseException:
        uploader.close()
        with seg_lock:
            try:
                _save_state(spath, state)
            except OSError:
                pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    stage_seconds["uploading"] = time.monotonic() - tu
    _remove_state(spath)
    stats = uploader.stats
    rep.enter("done", message=f"image stored at {target_url}", bytes_done=stream_size,
              bytes_total=stream_size, blocks_done=len(stored), blocks_total=len(stored))
    return ImageResult(
        url=target_url, virtual_size=vsize, blocks_stored=len(stored), stream_size=stream_size,
        compressed_size=manifest.compressed_size, segments=len(manifest.segments),
        segments_uploaded=stats.uploaded_segments,
        segments_skipped=stats.skipped_segments, sha256=digest,
        seconds=time.monotonic() - t0, stage_seconds=stage_seconds, resumed=resumed,
        metadata=dict(manifest.metadata))


def _refuse_existing_image(store: Store, target_url: str, replace: bool) -> None:
    """Raise :class:`OutputExistsError` when an image (or any object) is
    already stored at the target and ``replace`` is not set."""
    if replace:
        return
    try:
        store.get_manifest()
    except StoreNotFoundError:
        return
    except StoreError:
        raise OutputExistsError(
            f"{target_url}: something that is not a vhdcore image is stored there; "
            "pass --replace (replace=True) to replace it") from None
    raise OutputExistsError(
        f"{target_url}: an image is already stored there; pass --replace (replace=True) to "
        "replace it, or choose another name")


def _fs_metadata(fs_info: dict[str, Any]) -> dict[str, str]:
    """Per-partition filesystem facts as short metadata values (object stores
    limit a value to a few hundred bytes)."""
    out: dict[str, str] = {}
    for i, p in enumerate(fs_info.get("partitions", [])):
        val = ",".join(f"{k}={p.get(k)}" for k in ("fs", "uuid", "state", "skipped_bytes")
                       if p.get(k) is not None)
        reason = p.get("reason")
        if reason:
            val += f",reason={reason}"
        out[f"fs-part{i}"] = val[:250]
    return out

