"""A coalesce's checkpoint file: where it lives, what it records, when one
is taken (batches), and the fingerprints that tell a resumed run whether
the child or the parent changed meanwhile.

The child is never modified by a coalesce, so any change to it is someone
else's; the parent's footer and header change only when the coalesce grows
it, and the checkpoint records both states then.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import xxhash

from .. import _io, kernels
from .._version import __version__
from ..vhd.file import PathLike, VhdFile
from ..errors import CheckpointError
from ..vhd.format import SECTOR

__all__ = ["CHECKPOINT_VERSION", "checkpoint_path"]

CHECKPOINT_VERSION = 1
#: with ``batch_blocks=None``, a checkpoint after this much child data ...
_BATCH_BYTES = 256 * 1024 * 1024
#: ... or after this many blocks, whichever comes first
_BATCH_MAX_BLOCKS = 4096


def checkpoint_path(child: PathLike, checkpoint_dir: PathLike | None = None) -> str:
    """Where the checkpoint of coalescing ``child`` lives."""
    child = os.path.abspath(os.fspath(child))
    d = os.fspath(checkpoint_dir) if checkpoint_dir else os.path.dirname(child)
    return os.path.join(d, os.path.basename(child) + ".coalesce.json")


def fingerprint(vhd: VhdFile, *, contents: bool) -> str:
    """xxh3 of the disk's footer and header; with ``contents`` (the child)
    also its BAT and every sector bitmap, with its size and modification
    time.  Without (the parent): the footer and header only, which a
    coalesce changes only when it grows the parent."""
    h = xxhash.xxh3_64()
    h.update(vhd.footer.pack())
    if vhd.header is not None and (vhd.bat is not None or not contents):
        h.update(vhd.header.pack())
    if not contents:
        return h.hexdigest()
    if vhd.header is not None and vhd.bat is not None:
        h.update(vhd.bat.tobytes())
        # ask for every bitmap at once (the disk then reads them in parallel)
        # rather than waiting for each on its own
        for blk in vhd.iter_allocated():
            off = vhd.block_offset(blk)
            assert off is not None
            _io.will_need(vhd._fd, off, vhd.bitmap_size)
        for blk in vhd.iter_allocated():
            off = vhd.block_offset(blk)
            assert off is not None
            h.update(vhd.mv[off : off + vhd.bitmap_size])
    st = os.fstat(vhd._fd)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _write_json_atomic(path: str, obj: dict[str, Any], durable: bool = True) -> None:
    _io.atomic_write(path, json.dumps(obj, indent=1).encode(), durable=durable, private=True)



def read_checkpoint(cpath: str) -> dict[str, Any] | None:
    """The checkpoint at ``cpath``, or None when there is none."""
    if not os.path.exists(cpath):
        return None
    try:
        with open(cpath) as f:
            ck = json.load(f)
        if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError("unknown checkpoint version")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cpath}: unreadable checkpoint ({exc}); remove it to "
                              "start over") from None
    return ck


def check_resume(ck: dict[str, Any], cpath: str, cvhd: VhdFile, pvhd: VhdFile,
                 child_fp: str) -> None:
    """Refuse to continue from ``ck`` when it belongs to other disks or
    either disk changed since it was written (the parent may be in the
    middle of a recorded growth: then either size is accepted)."""
    if ck.get("child_uuid") != str(cvhd.uuid) or ck.get("parent_uuid") != str(pvhd.uuid):
        raise CheckpointError(
            f"{cpath}: checkpoint belongs to child {ck.get('child_uuid')} and parent "
            f"{ck.get('parent_uuid')}, not to {cvhd.path} ({cvhd.uuid}) and {pvhd.path} "
            f"({pvhd.uuid})")
    if ck.get("child_fingerprint") != child_fp:
        raise CheckpointError(f"{cvhd.path} changed since the checkpoint {cpath} was "
                              "written; refusing to continue")
    growing = ck.get("stage") == "growing" and pvhd.virtual_size in (
        ck.get("grow_from"), ck.get("grow_to"))
    if fingerprint(pvhd, contents=False) not in ck.get("parent_fingerprints", []) \
            and not growing:
        raise CheckpointError(f"{pvhd.path} changed since the checkpoint {cpath} was "
                              "written; refusing to continue")


def new_state(cvhd: VhdFile, pvhd: VhdFile, ck: dict[str, Any] | None,
              child_fp: str) -> dict[str, Any]:
    """The checkpoint's contents at the start of a run (continuing ``ck``)."""
    now = time.time()
    state: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "tool": f"vhdcore {__version__}",
        "child": os.path.abspath(cvhd.path),
        "parent": os.path.abspath(pvhd.path),
        "child_uuid": str(cvhd.uuid),
        "parent_uuid": str(pvhd.uuid),
        "child_fingerprint": child_fp,
        "parent_fingerprints": [fingerprint(pvhd, contents=False)],
        "stage": "merging",
        "next_block": int(ck.get("next_block", 0)) if ck else 0,
        "started": ck.get("started", now) if ck else now,
    }
    if ck and ck.get("stage") == "merged":
        state["stage"] = "merged"
    return state


def _batches(cvhd: VhdFile, todo: Sequence[int], batch_blocks: int | None
             ) -> list[tuple[int, int]]:
    """Split ``todo`` into [start, end) index ranges, one checkpoint each:
    ``batch_blocks`` blocks each, or (None) as many blocks as hold
    ``_BATCH_BYTES`` of child data (at most ``_BATCH_MAX_BLOCKS``), so that a
    child with little data in many blocks pays few barriers."""
    if batch_blocks is not None:
        step = max(1, batch_blocks)
        return [(i, min(i + step, len(todo))) for i in range(0, len(todo), step)]
    out = []
    start = 0
    acc = 0
    for i, blk in enumerate(todo):
        views = cvhd.block_views(blk)
        if views is not None:
            acc += kernels.bitmap_count(views[0], cvhd.block_sectors(blk)) * SECTOR
        if acc >= _BATCH_BYTES or i + 1 - start >= _BATCH_MAX_BLOCKS:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(todo):
        out.append((start, len(todo)))
    return out
