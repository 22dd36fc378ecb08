"""``coalesce``: merge a differencing child into its immediate parent, in
place, resumably.

The run, in order: resolve the chain and reopen the two files (the same
ones, the parent's UUID checked again); refuse a parent with other children;
check growth, addressable offsets and free space before anything is
written; record and make the parent's growth (:mod:`vhdcore.ops.grow`);
then the write loop, batch by batch (:func:`_write_loop`): one reserve for
the batch's new blocks, each block merged (:mod:`vhdcore.ops.coalesce_block`),
the BAT entries, one fsync, then the checkpoint (:mod:`vhdcore.ops.checkpoint`);
last, the child's children relinked to the parent and the checkpoint
removed.
"""
from __future__ import annotations

import mmap
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..chain import Chain
from ..vhd.file import PathLike, VhdFile
from ..errors import (CoalesceError, NoSpaceError, ParentMismatchError, VhdError,
                      VhdTimeoutError)
from ..vhd.format import FOOTER_SIZE, SECTOR, check_virtual_size
from . import checkpoint as _ck
from .checkpoint import _batches, _write_json_atomic, checkpoint_path, fingerprint
from .coalesce_block import _merge_one, _reserve_batch
from .flatwrite import Progress, _fsync_dir
from .grow import _check_parent_offsets, _grow_parent, _space_needed
from .readahead import Prefetch, release_block_pages
from .relink import _find_children, _find_siblings, _relink_unchecked, _search_dirs, _uuid_str

__all__ = ["coalesce", "CoalesceResult"]

#: start the parent's writeback after every this many bytes merged
_WRITEBACK_BYTES = 32 * 1024 * 1024


@dataclass
class CoalesceResult:
    """What :func:`coalesce` did.

    ``child`` was merged into ``parent``: ``blocks_merged`` of the child's
    blocks, ``sectors_written`` sectors written into the parent,
    ``sectors_skipped_equal`` sectors skipped because the parent already held
    the same bytes, ``blocks_allocated`` new blocks in the parent.  ``grown``
    when the parent's virtual size was raised to the child's, ``resumed`` when
    the run continued from a checkpoint, ``relinked`` the grandchildren
    re-pointed at the parent, and ``seconds`` the run's wall time.
    """

    child: str
    parent: str
    blocks_merged: int
    sectors_written: int
    sectors_skipped_equal: int
    blocks_allocated: int
    grown: bool
    resumed: bool
    relinked: list[str]
    seconds: float


def coalesce(child: PathLike, *, relink_children: Sequence[PathLike] = (),
             siblings: Sequence[PathLike] = (), deadline: float | None = None,
             timeout: float | None = None, checkpoint_dir: PathLike | None = None,
             progress: Progress | None = None, batch_blocks: int | None = None,
             chain_options: dict[str, Any] | None = None, skip_space_check: bool = False,
             durable: bool = True) -> CoalesceResult:
    """Merge the differencing disk ``child`` into its immediate parent, in place.

    Per sector: the parent's bitmap is ORed with the child's and the child's
    data wins.  Only the child's sector runs are written, straight from its
    mapping; the parent's data is never read to be copied back.  A parent
    block the parent lacks is placed in fresh space that reads as zeros and
    written sparsely (the child's sectors and its bitmap, no zeros).  Child
    sectors equal to the parent's are not written when the parent's copy is
    in the page cache (comparing costs no I/O then).  The BAT is written at
    checkpoints after the data: every ``batch_blocks`` blocks, or by default
    after every 256 MiB of child data (at most 4096 blocks), so that a child
    with little data in many blocks costs few fsyncs.

    Refuses (``CoalesceError``) when the child is not differencing or the
    parent has other children (in its directory, or among ``siblings``).
    Grows the parent first when the child is larger.  Checks free space up
    front (``NoSpaceError``).

    Resumable: progress is recorded in a checkpoint file (see
    :func:`checkpoint_path`); a ``deadline`` (``time.monotonic()`` value) or
    ``timeout`` (seconds) stops at the next block with a checkpoint and raises
    :class:`VhdTimeoutError`, and so does Ctrl-C.  Re-running continues from
    the checkpoint and refuses (``CheckpointError``) when either file changed
    meanwhile.  Afterwards the child's own children are re-pointed to the
    parent: those named in ``relink_children`` and every other one found in
    the directories it may search (the child's and ``chain_options``'
    ``allowed_dirs``); ``CoalesceResult.relinked`` lists them.  A named disk
    that is not a child of ``child`` is refused before anything is written.
    The child can then be deleted, unless it has children elsewhere.

    The parent is opened for writing after the chain was resolved: it must
    be the same file, and its UUID is checked again.

    ``durable=False`` skips the fsyncs at checkpoints: the write order still
    protects against the process dying, but not against losing power (for
    benchmarks in the page cache and scratch copies).
    """
    t0 = time.monotonic()
    if timeout is not None:
        deadline = min(deadline, t0 + timeout) if deadline is not None else t0 + timeout
    child = os.fspath(child)
    opts = dict(chain_options or {})
    with Chain.open(child, **opts) as chain:
        cvhd = chain.leaf
        if not cvhd.is_differencing:
            raise CoalesceError(f"{child}: a {cvhd.footer.type_name} disk has no parent to "
                                "coalesce into")
        parent_path = chain.layers[1].path
        keys = [(st.st_dev, st.st_ino) for st in (os.fstat(ly._fd) for ly in chain.layers[:2])]
        want_parent = cvhd.header.parent_uuid if cvhd.header is not None else b""
    cpath = checkpoint_path(child, checkpoint_dir)
    ck = _ck.read_checkpoint(cpath)
    cvhd, pvhd = _open_pair(child, parent_path, durable)
    try:
        _check_reopened(cvhd, pvhd, keys, want_parent)
        dirs = _search_dirs(child, opts)
        children = _children_to_relink(cvhd, pvhd, relink_children, dirs)
        return _coalesce_open(cvhd, pvhd, ck, cpath, children, siblings, deadline,
                              progress, batch_blocks, t0, skip_space_check, durable, dirs)
    finally:
        pvhd.close()
        cvhd.close()


def _open_pair(child: str, parent_path: str, durable: bool) -> tuple[VhdFile, VhdFile]:
    """Open the child read-only and its parent for writing, both mapped
    ``MADV_RANDOM``: the parent is read a bitmap (and a compared cached
    sector) at a time, and without it each page fault reads the device's
    whole read-ahead window around it (8 MiB on some virtual disks), mostly
    data the child replaces.  The child's sectors are fetched ahead with
    ``posix_fadvise`` (:class:`~vhdcore.ops.readahead.Prefetch`), so a fault
    waits for its own page at most."""
    cvhd = VhdFile.open(child)
    try:
        pvhd = VhdFile.open(parent_path, writable=True)
    except BaseException:
        cvhd.close()
        raise
    pvhd.durable = durable
    rnd = getattr(mmap, "MADV_RANDOM", None)
    if rnd is not None:
        for v in (pvhd, cvhd):
            v.map_advice = rnd
            v._map()
    return cvhd, pvhd


def _check_reopened(cvhd: VhdFile, pvhd: VhdFile, keys: list[tuple[int, int]],
                    want_parent: bytes) -> None:
    """The files opened are the ones the chain resolved, and the parent's
    UUID is still the one the child names."""
    for v, key in ((cvhd, keys[0]), (pvhd, keys[1])):
        st = os.fstat(v._fd)
        if (st.st_dev, st.st_ino) != key:
            raise ParentMismatchError(f"{v.path} was replaced while the chain was opened; "
                                      "refusing to coalesce")
    if pvhd.footer.unique_id != want_parent:
        raise ParentMismatchError(
            f"{pvhd.path}: UUID is {pvhd.uuid}, not {cvhd.path}'s parent UUID "
            f"{_uuid_str(want_parent)}; refusing to coalesce")


def _children_to_relink(cvhd: VhdFile, pvhd: VhdFile, named_children: Sequence[PathLike],
                        dirs: Sequence[str]) -> list[str]:
    """The child's own children: those named (each checked to be one), and
    those in the directories a coalesce may search (the child's and
    ``--allow-dir`` ones)."""
    found = _find_children(cvhd, dirs, (), [cvhd.path, pvhd.path])
    named = []
    for g in named_children:
        g = os.fspath(g)
        try:
            with VhdFile.open(g) as gv:
                ok = (gv.is_differencing and gv.header is not None
                      and gv.header.parent_uuid in (cvhd.footer.unique_id,
                                                    pvhd.footer.unique_id))
        except VhdError as exc:
            raise CoalesceError(f"{g}: cannot relink it: {exc}") from None
        if not ok:
            raise CoalesceError(f"{g}: not a child of {cvhd.path}; refusing to relink it")
        named.append(g)
    reals = {os.path.realpath(g) for g in named}
    return named + [g for g in found if os.path.realpath(g) not in reals]


def _coalesce_open(cvhd: VhdFile, pvhd: VhdFile, ck: dict[str, Any] | None, cpath: str,
                   relink_children: Sequence[PathLike], siblings: Sequence[PathLike],
                   deadline: float | None, progress: Progress | None, batch_blocks: int | None,
                   t0: float, skip_space_check: bool, durable: bool = True,
                   dirs: Sequence[str] = ()) -> CoalesceResult:
    """The coalesce on the two open files, step by step (the module's
    docstring lists them)."""
    child_fp = fingerprint(cvhd, contents=True)
    assert cvhd.header is not None and cvhd.bat is not None
    if ck is not None:
        _ck.check_resume(ck, cpath, cvhd, pvhd, child_fp)
    else:
        sib = _find_siblings(pvhd, cvhd.path, siblings, dirs)
        if sib:
            raise CoalesceError(
                f"{pvhd.path} has other children ({', '.join(sib)}); coalescing {cvhd.path} "
                "into it would change what they read")
    new_size = max(pvhd.virtual_size, cvhd.virtual_size)
    grow = new_size > pvhd.virtual_size
    _check_before_writing(cvhd, pvhd, ck, new_size, skip_space_check)
    state = _ck.new_state(cvhd, pvhd, ck, child_fp)
    _grow_step(pvhd, ck, state, cpath, new_size, grow, durable)
    blocks = [int(b) for b in cvhd.allocated_blocks()]
    start = state["next_block"]
    todo = [b for b in blocks if b >= start] if state["stage"] == "merging" else []
    counts = _write_loop(cvhd, pvhd, todo, len(blocks), state, cpath, deadline, progress,
                         batch_blocks, durable)
    relinked = [os.fspath(g) for g in relink_children]
    for g in relinked:
        _relink_unchecked(g, pvhd.path, expected_old_parent=cvhd.footer.unique_id,
                          expected_new_parent=pvhd.footer.unique_id,
                          expected_key=os.fstat(pvhd._fd))
    os.unlink(cpath)
    _fsync_dir(cpath)
    return CoalesceResult(cvhd.path, pvhd.path, counts.merged, counts.written, counts.skipped,
                          counts.allocated, grow, ck is not None, relinked,
                          time.monotonic() - t0)


def _check_before_writing(cvhd: VhdFile, pvhd: VhdFile, ck: dict[str, Any] | None,
                          new_size: int, skip_space_check: bool) -> None:
    """Refuse, before anything is written: a fixed parent that cannot grow
    safely, a size or block offsets the format cannot hold, too little free
    space."""
    grow = new_size > pvhd.virtual_size
    resuming_fixed_growth = (ck is not None and ck.get("stage") == "growing"
                             and pvhd.footer_offset == ck.get("grow_to"))
    if (grow and pvhd.is_fixed and pvhd.footer_offset != pvhd.virtual_size
            and not resuming_fixed_growth):
        # growing writes the footer at the new size and zeroes the old one's
        # place: bytes between the virtual size and the footer would show
        raise CoalesceError(
            f"{pvhd.path}: fixed disk holds {pvhd.footer_offset} bytes of data but its footer "
            f"says {pvhd.virtual_size}; refusing to grow it ('vhdcore check' shows this)")
    if grow:
        check_virtual_size(new_size, f"{cvhd.path}: the parent would grow to a virtual size")
    _check_parent_offsets(cvhd, pvhd, new_size)
    if not skip_space_check:
        need = _space_needed(cvhd, pvhd, new_size)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(pvhd.path))).free
        if need > free:
            raise NoSpaceError(
                f"coalescing {cvhd.path} into {pvhd.path} needs up to {need} bytes of free "
                f"space; {free} are available", needed=need, available=free)


def _grow_step(pvhd: VhdFile, ck: dict[str, Any] | None, state: dict[str, Any], cpath: str,
               new_size: int, grow: bool, durable: bool) -> None:
    """Write the run's first checkpoint; when the parent must grow (or a
    growth was under way), announce the growth in it before making it, so
    that a crash in between is recognised on resume (the parent then has
    either size), and record the grown parent's fingerprint after."""
    if not (grow or (ck and ck.get("stage") == "growing")):
        _write_json_atomic(cpath, state, durable)
        return
    grow_from = int(ck["grow_from"]) if ck and ck.get("stage") == "growing" \
        else pvhd.virtual_size
    state.update(stage="growing", grow_from=grow_from, grow_to=new_size)
    _write_json_atomic(cpath, state, durable)
    if pvhd.virtual_size < new_size:
        _grow_parent(pvhd, new_size)
    elif pvhd.is_fixed:
        # the new footer was written, so the zeros over the old one's
        # place were durable before it (see _grow_parent); writing them
        # again costs nothing and needs no fsync of its own
        pvhd._pwrite(bytes(FOOTER_SIZE), grow_from)
    else:
        # the footer grew; its copy at offset 0 may not have
        pvhd.sync_footer_copy()
    state.update(stage="merging", parent_fingerprints=[fingerprint(pvhd, contents=False)])
    state.pop("grow_from", None)
    state.pop("grow_to", None)
    _write_json_atomic(cpath, state, durable)


@dataclass
class _Counts:
    merged: int = 0
    written: int = 0
    skipped: int = 0
    allocated: int = 0


@contextmanager
def _sigint_stops() -> Iterator[dict[str, bool]]:
    """While inside, Ctrl-C (on the main thread) only sets ``flag["sig"]``:
    the write loop stops at the next block, with a checkpoint."""
    flag = {"sig": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum: int, frame: object) -> None:
            flag["sig"] = True
        try:
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # pragma: no cover
            old_handler = None
    try:
        yield flag
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _write_loop(cvhd: VhdFile, pvhd: VhdFile, todo: list[int], total: int,
                state: dict[str, Any], cpath: str, deadline: float | None,
                progress: Progress | None, batch_blocks: int | None,
                durable: bool) -> _Counts:
    """Merge ``todo`` batch by batch, in the order that keeps the parent
    valid at every moment: one reserve for the batch's new blocks, the
    blocks (data, then bitmaps), then the BAT entries and one fsync, then
    the checkpoint.  No fsync between a batch's blocks and its BAT entries:
    until the checkpoint records the batch, a re-run merges its blocks again
    (idempotent, also into a block a BAT entry already points at).  Stops at
    a deadline or Ctrl-C with a checkpoint and raises
    :class:`VhdTimeoutError`.  Its length: the loop is one sequence of
    ordered writes, clearer read whole."""
    counts = _Counts()
    done_before = total - len(todo)
    runs = np.zeros(2 * (pvhd.sectors_per_block // 2 + 1), dtype=np.uint32)
    cbm = bytearray(cvhd.bitmap_size)
    batches = _batches(cvhd, todo, batch_blocks)
    ends = {e for _, e in batches}
    starts = {s: e for s, e in batches}
    kick = 0
    interrupted: BaseException | None = None

    def checkpoint(next_block: int) -> None:
        pvhd.flush(durable=durable, barrier=False)
        state["next_block"] = next_block
        _write_json_atomic(cpath, state, durable)

    prefetch = Prefetch(cvhd, todo, writeback_fd=pvhd._fd if durable else -1, parent=pvhd)
    with _sigint_stops() as stop:
        try:
            place: dict[int, int] = {}
            for i, blk in enumerate(todo):
                if i in starts and not pvhd.is_fixed:
                    # deciding which blocks are new reads the batch's child
                    # data: fetch it all, then reserve (see VhdFile.reserve)
                    prefetch.advance(i, through=starts[i])
                    place = _reserve_batch(cvhd, pvhd, todo[i : starts[i]], cbm)
                if stop["sig"]:
                    interrupted = KeyboardInterrupt()
                    checkpoint(blk)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    checkpoint(blk)
                    interrupted = VhdTimeoutError(
                        f"coalesce of {cvhd.path} stopped at its deadline after "
                        f"{done_before + i}/{total} blocks; run it again to resume from {cpath}")
                    break
                prefetch.advance(i)
                w, s, a = _merge_one(cvhd, pvhd, blk, cbm, runs, place.get(blk))
                release_block_pages(cvhd, pvhd, blk)
                kick += w
                if kick * SECTOR >= _WRITEBACK_BYTES and durable:
                    prefetch.kick_writeback()
                    kick = 0
                counts.written += w
                counts.skipped += s
                counts.allocated += a
                counts.merged += 1
                if i + 1 in ends and i + 1 < len(todo):
                    checkpoint(blk + 1)
                if progress is not None:
                    progress(done_before + i + 1, total)
            else:
                pvhd.flush(durable=durable, barrier=False)
                state["stage"] = "merged"
                state["next_block"] = cvhd.nblocks
                _write_json_atomic(cpath, state, durable)
        finally:
            prefetch.close()
    if isinstance(interrupted, KeyboardInterrupt):
        raise VhdTimeoutError(f"coalesce of {cvhd.path} interrupted; run it again to resume "
                              f"from {cpath}")
    if interrupted is not None:
        raise interrupted
    return counts
