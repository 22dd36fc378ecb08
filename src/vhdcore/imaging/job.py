"""The imaging job: opens the chain and the target, checks and records the
job state, then runs the stages -- the plan (coalescing, 25%), the stream
(uploading, 50%: :mod:`vhdcore.imaging.stages`), the manifest (done, 100%).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..chain import Chain
from ..ops.stream import FreeMap
from ..vhd.layout import DynamicLayout
from ..compress import FrameCompressor
from ..vhd.file import PathLike
from ..errors import JobStateError, VhdTimeoutError
from ..store import UploadStats, image_metadata
from ..store.base import Manifest, Store
from .events import ProgressCallback, _Reporter, monotonic
from .plan import BlockPlanner
from .stages import SegmentSink, StreamSource
from .state import (
    STATE_VERSION,
    STREAM_FORMAT,
    _chain_identity,
    _job_id,
    _load_state,
    _remove_state,
    _save_state,
    job_state_path,
    plan_blocks,
)
from .target import _api, check_target, choose_generation, open_target, segment_size_for

__all__ = ["ImageResult", "create_image"]


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

    Long only for this docstring: the code is a short sequence of steps
    (open the chain and the target, then :class:`_Job`'s open, plan, upload).
    """
    t0 = monotonic()
    rep = _Reporter(progress)
    rep.enter("queued", message=f"imaging {os.fspath(leaf)} to {target_url}")
    deadline = t0 + timeout if timeout is not None else None
    chain = Chain.open(leaf, **(chain_options or {}))
    store = open_target(chain, target_url, store_options)
    try:
        job = _Job(chain, store, target_url, rep, t0=t0, deadline=deadline,
                   coalesce_timeout=coalesce_timeout, threads=threads,
                   compress_threads=compress_threads or threads, concurrency=concurrency,
                   segment_size=segment_size, state_dir=state_dir,
                   extra_metadata=extra_metadata or {}, upload_gate=upload_gate)
        job.open(resume=resume, restart=restart, replace=replace, fs_aware=fs_aware,
                 free_map=free_map)
        stored = job.plan()
        return job.upload(stored)
    except BaseException as exc:
        rep.fail(exc)
        raise
    finally:
        store.close()
        chain.close()


class _Stop(Exception):
    """The job reached a timeout or was interrupted at a safe point."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Job:
    """One imaging job: its options, its job state and its stages."""

    def __init__(self, chain: Chain, store: Store, target_url: str, rep: _Reporter, *,
                 t0: float, deadline: float | None, coalesce_timeout: float | None,
                 threads: int, compress_threads: int, concurrency: int,
                 segment_size: int | None, state_dir: PathLike | None,
                 extra_metadata: dict[str, str],
                 upload_gate: Callable[[int], None] | None) -> None:
        self.chain, self.store, self.target_url, self.rep = chain, store, target_url, rep
        self.t0, self.deadline, self.coalesce_timeout = t0, deadline, coalesce_timeout
        self.threads, self.compress_threads = threads, compress_threads
        self.concurrency, self.segment_size = concurrency, segment_size
        self.state_dir, self.extra_metadata, self.upload_gate = state_dir, extra_metadata, \
            upload_gate
        self.stage_seconds: dict[str, float] = {}
        self.free_map: FreeMap | None = None
        self.fs_info: dict[str, Any] | None = None
        self.lock = threading.Lock()

    # ------------------------------------------------------------ job state
    def open(self, *, resume: bool, restart: bool, replace: bool, fs_aware: bool,
             free_map: FreeMap | None) -> None:
        """Check the job state rules and the target, then record the state."""
        chain, target_url = self.chain, self.target_url
        self.options = {"block_size": chain.block_size, "fs_aware": bool(fs_aware or free_map)}
        self.identity = _chain_identity(chain)
        self.job_id = _job_id(self.identity, target_url, self.options)
        spath = self.spath = job_state_path(target_url, self.state_dir)
        old = _load_state(spath)
        self.resume_hint = f"run the same command with --resume to continue (job state: {spath})"
        if resume and restart:
            raise JobStateError("--resume and --restart exclude each other")
        if old is not None and not resume and not restart:
            raise JobStateError(
                f"an interrupted job to {target_url} left its state in {spath}; run with "
                "--resume to continue it or --restart to start over")
        if old is None and resume:
            raise JobStateError(f"nothing to resume: no job state at {spath}")
        if old is not None and resume and old.get("job_id") != self.job_id:
            raise JobStateError(
                f"{spath} belongs to another job (other source chain, target or options, or "
                "the chain changed since); run with --restart to start over")
        # the target, before anything is recorded: a job that cannot start
        # leaves no state behind (and nothing to resume)
        check_target(self.store, target_url, resume=resume, replace=replace)
        if old is not None and restart:
            _remove_state(spath)
            old = None
        self.state: dict[str, Any] = old or {
            "version": STATE_VERSION, "tool": f"vhdcore {__version__}", "job_id": self.job_id,
            "target": target_url, "leaf": os.path.abspath(chain.leaf.path),
            "chain": self.identity, "options": self.options, "created": _api().time.time(),
            "stage": "coalescing", "scanned_to": 0, "plan": [], "segments": {},
        }
        self.resumed = old is not None
        self.free_map = free_map
        if fs_aware and free_map is None:
            # imported here: the filesystem readers are a tenth of the
            # start-up of ``image``, and a job without the map needs none
            from ..fsmap import fs_free_map

            self.free_map, self.fs_info = fs_free_map(chain)
        self.save()

    def save(self) -> None:
        with self.lock:
            _save_state(self.spath, self.state)

    # ------------------------------------------------------------ coalescing
    def plan(self) -> list[int]:
        """The coalescing stage: decide which blocks the image stores (the
        BAT of the head); resumable at any block.  Returns them."""
        chain, rep, state = self.chain, self.rep, self.state
        tc = monotonic()
        planner = BlockPlanner(chain, self.free_map, threads=self.threads)
        candidates = planner.candidates()
        total_blocks = len(chain.allocated_blocks())
        if state["stage"] == "coalescing":
            plan: list[Any] = state["plan"]
            start = int(state["scanned_to"])
            todo = [b for b in candidates if b >= start]
            vsize = chain.virtual_size
            rep.enter("coalescing", message="planning the image: which blocks hold data",
                      bytes_done=min(vsize, start * chain.block_size), bytes_total=vsize,
                      blocks_done=total_blocks - len(todo), blocks_total=total_blocks)
            c_deadline = tc + self.coalesce_timeout if self.coalesce_timeout is not None \
                else None
            try:
                self._scan(planner, todo, plan, total_blocks - len(todo), c_deadline)
            except KeyboardInterrupt:
                self.save()
                raise VhdTimeoutError("imaging interrupted while coalescing; "
                                      f"{self.resume_hint}") from None
            except _Stop as stop:
                self.save()
                raise VhdTimeoutError(f"imaging stopped at its {stop.why} while coalescing "
                                      f"({len(plan)} blocks planned); {self.resume_hint}") \
                    from None
            state["stage"] = "uploading"
            self.save()
        self.stage_seconds["coalescing"] = monotonic() - tc
        return plan_blocks(state["plan"])

    def _scan(self, planner: BlockPlanner, todo: list[int], plan: list[Any], done0: int,
              c_deadline: float | None) -> None:
        chain, rep, state = self.chain, self.rep, self.state
        vsize, total_blocks = chain.virtual_size, len(chain.allocated_blocks())
        scan = planner.scan(todo)
        try:
            for pos, (blk, stored) in enumerate(scan, 1):
                if stored:
                    plan.append(blk)
                state["scanned_to"] = blk + 1
                now = monotonic()
                rep.emit(bytes_done=min(vsize, (blk + 1) * chain.block_size), bytes_total=vsize,
                         blocks_done=done0 + pos, blocks_total=total_blocks,
                         upload_total=len(plan) * chain.block_size)
                if c_deadline is not None and now >= c_deadline:
                    raise _Stop("coalesce timeout")
                if self.deadline is not None and now >= self.deadline:
                    raise _Stop("timeout")
        finally:
            scan.close()
        state["scanned_to"] = chain.nblocks
        rep.emit(force=True, bytes_done=vsize, bytes_total=vsize, blocks_done=total_blocks,
                 blocks_total=total_blocks)

    # ------------------------------------------------------------ uploading
    def _layout(self, stored: list[int]) -> tuple[DynamicLayout, int]:
        """The image's layout and the segment size (fixed for the job)."""
        chain, identity, store = self.chain, self.identity, self.store
        # the stream depends only on the chain's content and the options: the
        # image's UUID comes from the chain's identity and its time stamp is
        # the leaf's, so two runs of the same chain store byte-identical images
        image_id = hashlib.sha256(json.dumps(
            {"chain": [(c["uuid"], c["size"], c["mtime_ns"]) for c in identity],
             "options": self.options, "format": STREAM_FORMAT},
            sort_keys=True).encode()).digest()[:16]
        layout = DynamicLayout(chain.virtual_size, chain.block_size, unique_id=image_id,
                               timestamp=chain.leaf.footer.timestamp)
        segment_size = segment_size_for(store, layout, len(stored), self.segment_size,
                                        self.state, self.spath)
        return layout, segment_size

    def _sink(self, segment_size: int) -> SegmentSink:
        """The packing/upload stage, with what an earlier run stored adopted."""
        records: dict[str, dict[str, Any]] = self.state["segments"]
        # segments above the memory budget (a target that allows few
        # segments makes them large) are packed into scratch files beside
        # the job state, not in memory; those handed on are then bounded by
        # scratch space instead
        spill = segment_size > _PENDING_BYTES
        budget = _SPILL_PENDING_BYTES if spill else _PENDING_BYTES
        uploader = _api().SegmentUploader(
            self.store, concurrency=self.concurrency,
            max_pending=max(1, min(2 * self.concurrency, budget // max(1, segment_size))))
        existing = uploader.existing_segments()
        # segments of the state that the store still has, by first frame
        reusable: dict[int, tuple[int, dict[str, Any]]] = {}
        for k, rec in records.items():
            have = existing.get(int(k))
            if have is not None and have.size == rec["size"] and have.etag == rec["etag"]:
                reusable[int(rec["first"])] = (int(k), rec)
        records.clear()
        for k2, rec in reusable.values():
            records[str(k2)] = rec
        sink = SegmentSink(uploader, segment_size, records, self.lock, reusable=reusable,
                           existing=existing, gate=self.upload_gate, where=self.spath,
                           spill_dir=os.path.dirname(os.path.abspath(self.spath)) if spill else None)
        uploader.progress = sink.on_uploaded
        return sink

    def upload(self, stored: list[int]) -> ImageResult:
        """The uploading stage (the stream, compressed, packed and stored),
        then the manifest and the done stage."""
        tu = monotonic()
        layout, segment_size = self._layout(stored)
        stream_size = layout.stream_size(len(stored))
        self.rep.enter("uploading", message=f"compressing and uploading {len(stored)} blocks",
                       bytes_done=0, bytes_total=stream_size, blocks_total=len(stored))
        choose_generation(self.store, self.state, self.job_id, self.save)
        sink = self._sink(segment_size)
        source = StreamSource(self.chain, stored, layout.head(stored), layout.tail(),
                              threads=self.threads, free_map=self.free_map)
        compressor = FrameCompressor(self.compress_threads,
                                     compress=lambda b: _api().compress_frame(b))
        sink.hashed = source.hasher.wait_for
        try:
            digest, manifest = self._store_stream(source, compressor, sink, stream_size,
                                                  len(stored))
        finally:
            compressor.close()
            sink.packer.discard()  # a segment left open by a failure: its scratch file
            try:
                source.close()
            except Exception:
                pass  # the job already failed; its own error is raised
        self.stage_seconds["uploading"] = monotonic() - tu
        _remove_state(self.spath)
        return self._done(len(stored), stream_size, digest, manifest, sink.uploader.stats)

    def _store_stream(self, source: StreamSource, compressor: FrameCompressor,
                      sink: SegmentSink, stream_size: int, nstored: int
                      ) -> tuple[str, Manifest]:
        """The stream stored, then the manifest; the job state saved on the
        way out.  A timeout or Ctrl-C lets what the uploader holds finish
        first, then raises :class:`VhdTimeoutError`.  Returns the stream's
        SHA-256 and the manifest."""
        uploader = sink.uploader
        try:
            try:
                self._stream(source, compressor, sink, stream_size)
            except (_Stop, KeyboardInterrupt) as exc:
                # let what was already handed to the uploader finish, then save
                try:
                    uploader.wait()
                finally:
                    uploader.close()
                    self.save()
                what = "stopped at its timeout" if isinstance(exc, _Stop) else "was interrupted"
                raise VhdTimeoutError(f"imaging {what} while uploading "
                                      f"({len(self.state['segments'])} segments stored); "
                                      f"{self.resume_hint}") from None
            source.close()
            digest = source.sha.hexdigest()
            try:
                manifest = uploader.finish(self._metadata(digest, stream_size, nstored))
                self.rep.emit(force=True, bytes_done=stream_size, bytes_total=stream_size,
                              blocks_done=nstored, blocks_total=nstored)
            finally:
                self.save()
        except BaseException:
            uploader.close()
            try:
                self.save()
            except OSError:
                pass
            raise
        return digest, manifest

    def _done(self, nstored: int, stream_size: int, digest: str, manifest: Manifest,
              stats: UploadStats) -> ImageResult:
        """The done stage, and what the job stored."""
        self.rep.enter("done", message=f"image stored at {self.target_url}",
                       bytes_done=stream_size, bytes_total=stream_size, blocks_done=nstored,
                       blocks_total=nstored)
        return ImageResult(
            url=self.target_url, virtual_size=self.chain.virtual_size, blocks_stored=nstored,
            stream_size=stream_size, compressed_size=manifest.compressed_size,
            segments=len(manifest.segments), segments_uploaded=stats.uploaded_segments,
            segments_skipped=stats.skipped_segments, sha256=digest,
            seconds=monotonic() - self.t0, stage_seconds=self.stage_seconds,
            resumed=self.resumed, metadata=dict(manifest.metadata))

    def _stream(self, source: StreamSource, compressor: FrameCompressor, sink: SegmentSink,
                stream_size: int) -> None:
        """Run the stream through the stages: source -> compressor -> sink;
        stops (``_Stop``) at the job's timeout at a safe point: right after a
        segment was handed to the uploader, or while no segment is open (so
        no compressed frame is thrown away; the overshoot is at most the time
        one segment takes to produce)."""
        rep, nblocks = self.rep, len(source.stored)
        last_save = monotonic()
        done = 0
        frames = compressor.compress_optional(source.frames(sink.wanted))
        try:
            for frame in frames:
                meta = source.meta.popleft()
                sent = sink.take(meta, frame)
                source.release(meta.index)
                done += meta.size
                rep.emit(force=sent, bytes_done=done, bytes_total=stream_size,
                         blocks_done=max(0, meta.rank + 1), blocks_total=nblocks)
                now = monotonic()
                if meta.index == source.nframes - 1:
                    break
                safe = sent or sink.packer.pending_bytes == 0
                if safe and self.deadline is not None and now >= self.deadline:
                    raise _Stop("timeout")
                if now - last_save > 2.0:
                    self.save()
                    last_save = now
        finally:
            frames.close()
        if sink.flush(source.nframes):
            rep.emit(force=True, bytes_done=done, bytes_total=stream_size,
                     blocks_done=nblocks, blocks_total=nblocks)

    def _metadata(self, digest: str, stream_size: int, nstored: int) -> dict[str, str]:
        chain = self.chain
        meta = image_metadata(sha256=digest, stream_size=stream_size,
                              virtual_size=chain.virtual_size,
                              **{"block-size": str(chain.block_size),
                                 "blocks-stored": str(nstored),
                                 "fs-aware": "yes" if self.options["fs_aware"] else "no",
                                 "job": self.job_id[:16]})
        if self.fs_info is not None:
            meta.update(_fs_metadata(self.fs_info))
        meta.update(self.extra_metadata)
        return meta


#: segments handed to the uploader (queued or being sent) are held in memory
#: up to about this many bytes (at least one segment), besides the one being packed
_PENDING_BYTES = 32 << 20
#: segments larger than that are packed into scratch files (SpillSegment):
#: those handed to the uploader take up to about this much scratch space
_SPILL_PENDING_BYTES = 1 << 30


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

