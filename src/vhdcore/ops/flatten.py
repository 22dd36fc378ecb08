"""``flatten``: a chain's whole virtual disk, read once, as one standalone
image (the writing itself is :mod:`vhdcore.ops.flatwrite`)."""
from __future__ import annotations

import os
from typing import Any

from ..chain import Chain
from ..vhd.file import PathLike
from ..errors import CoalesceError, VhdError
from ..fsmap import fs_free_map
from .flatwrite import FORMATS, FlattenResult, Progress, _refuse_existing, write_flat
from .stream import FreeMap

__all__ = ["flatten", "FlattenResult"]


def flatten(leaf: PathLike, out: PathLike, format: str = "vhd", *, threads: int = 2,
            progress: Progress | None = None, free_map: FreeMap | None = None,
            chain_options: dict[str, Any] | None = None, durable: bool = True,
            fs_aware: bool = True, overwrite: bool = False) -> FlattenResult:
    """Write the leaf's whole virtual disk, read once through its chain, as one
    standalone image: ``"vhd"`` (sparse dynamic VHD: no all-zero block, bitmap
    bits only for sectors with data), ``"fixed"`` (fixed VHD) or ``"raw"``.

    The output is written to ``out + ".part"`` and renamed when complete
    (after an fsync unless ``durable`` is False).

    ``fs_aware`` (the default, as for imaging): blocks that the guest's
    filesystems mark entirely free are not stored and free sectors of partly
    used blocks are written as zeros (see :mod:`vhdcore.fsmap`; filesystems
    it cannot trust are kept whole).  ``fs_aware=False`` keeps every sector.

    An existing ``out`` is refused (:class:`~vhdcore.errors.OutputExistsError`)
    unless ``overwrite``.
    """
    if format not in FORMATS:
        raise VhdError(f"unknown output format {format!r} (vhd, fixed or raw)")
    out = os.fspath(out)
    with Chain.open(leaf, **(chain_options or {})) as chain:
        if os.path.exists(out) and any(os.path.samefile(out, ly.path) for ly in chain.layers):
            raise CoalesceError(f"{out}: the output would overwrite a disk of the chain")
        _refuse_existing(out, overwrite)
        if fs_aware and free_map is None:
            free_map, _ = fs_free_map(chain)
        return write_flat(chain, out, format, threads=threads, progress=progress,
                          free_map=free_map, durable=durable)

