"""Coalesce in place, flatten, compact, relink and repair: the documented
import path (``vhdcore.coalesce.coalesce`` and the others) of the operations
that live in :mod:`vhdcore.ops`, one module per job:

* :func:`flatten` (:mod:`vhdcore.ops.flatten`, writing through
  :mod:`vhdcore.ops.flatwrite`) reads a chain once, youngest layer first per
  block (:mod:`vhdcore.ops.stream`), and writes one standalone image (sparse
  dynamic VHD, fixed VHD or raw).
* :func:`coalesce` (:mod:`vhdcore.ops.coalesce`) merges a differencing child
  into its immediate parent in place, resumable from checkpoints.
* :func:`relink` (:mod:`vhdcore.ops.relink`) re-points a disk at another
  parent; :func:`compact` (:mod:`vhdcore.ops.compact`) rewrites one VHD
  without its empty blocks; :func:`repair` (:mod:`vhdcore.ops.repair`)
  restores a damaged primary footer from the copy at offset 0.

Setting a name here (``monkeypatch.setattr(vhdcore.coalesce, name, ...)``)
sets it in every :mod:`vhdcore.ops` module that holds the same object, so
that the operations see it.
"""
from __future__ import annotations

import sys
import time  # noqa: F401  (tests reach the clock as vhdcore.coalesce.time)
import types
from typing import Any

from .vhd.file import VhdFile  # noqa: F401
from .fsmap import FsFreeMap, fs_free_map
from .ops import checkpoint as _checkpoint
from .ops import coalesce as _coalesce
from .ops import coalesce_block as _coalesce_block
from .ops import compact as _compact
from .ops import flatten as _flatten
from .ops import flatwrite as _flatwrite
from .ops import grow as _grow
from .ops import readahead as _readahead
from .ops import relink as _relink
from .ops import repair as _repair
from .ops import stream as _stream
from .ops.checkpoint import _BATCH_BYTES, _batches, _write_json_atomic, checkpoint_path
from .ops.coalesce import CoalesceResult, coalesce
from .ops.coalesce_block import _mincore, _resident_sectors
from .ops.compact import compact
from .ops.flatten import flatten
from .ops.flatwrite import FlattenResult, Progress, _fsync_dir, write_flat
from .ops.relink import RelinkResult, _relink_unchecked, relink
from .ops.repair import repair
from .ops.stream import FreeMap, ImageBlock, iter_image_blocks
from .vhd.layout import DynamicLayout

__all__ = [
    "FsFreeMap",
    "fs_free_map",
    "ImageBlock",
    "iter_image_blocks",
    "DynamicLayout",
    "flatten",
    "write_flat",
    "FlattenResult",
    "coalesce",
    "CoalesceResult",
    "relink",
    "RelinkResult",
    "compact",
    "repair",
    "checkpoint_path",
]

_HOMES = (_stream, _flatwrite, _flatten, _checkpoint, _coalesce_block, _grow, _readahead,
          _coalesce, _relink, _compact, _repair)
_MISSING = object()


class _Reexports(types.ModuleType):
    """This module's type: an attribute set here is set in its homes too."""

    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name, _MISSING)
        if old is not _MISSING:
            for mod in _HOMES:
                if mod.__dict__.get(name, _MISSING) is old:
                    setattr(mod, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Reexports
