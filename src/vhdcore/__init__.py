"""vhdcore: fast, safe coalescing, flattening and imaging of Microsoft VHD chains.

The public API, importable from ``vhdcore`` directly:

* open and read a chain: :class:`Chain` (``Chain.open`` or :func:`open_chain`),
  one file: :class:`VhdFile`; create files: :func:`create_fixed`,
  :func:`create_dynamic`, :func:`create_differencing`;
* check: :func:`check_file`, :func:`check_chain` (a list of :class:`Problem`);
* rewrite: :func:`flatten`, :func:`relink`, :func:`compact`, :func:`repair`,
  and coalescing in place with ``vhdcore.coalesce.coalesce``;
* image and restore: :func:`create_image` (progress as :class:`ProgressEvent`,
  the result an :class:`ImageResult`), :func:`restore`, :func:`open_store`,
  and the cost of a job beforehand with ``vhdcore.estimate.estimate``;
* the guest's free space: :func:`map_disk`;
* the exception hierarchy under :class:`VhdError`;
* ``backend``: which merge kernel is active, ``"cython"`` or ``"python"``.

``vhdcore.coalesce`` and ``vhdcore.estimate`` are the modules of those two
functions: a package attribute cannot be both a submodule and a function of
the same name (``import vhdcore.coalesce as m`` would then give the function).

``import vhdcore`` loads only the exceptions and the kernel selector; each
module behind the names above (numpy, lz4 and the object-store clients come
with them) is imported the first time one of its names, or the module itself
(``vhdcore.chain``, ``vhdcore.coalesce``, ...), is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors as _errors
from ._version import __version__
from .errors import *  # noqa: F401,F403
from .kernels import backend

if TYPE_CHECKING:
    from .chain import Chain
    from .check import Problem, check_chain, check_file
    from .ops.coalesce import CoalesceResult
    from .ops.compact import compact
    from .ops.flatten import flatten
    from .ops.flatwrite import FlattenResult
    from .ops.relink import RelinkResult, relink
    from .ops.repair import repair
    from .vhd.create import create_differencing, create_dynamic, create_fixed
    from .vhd.file import VhdFile
    from .fsmap import DiskMap, map_disk
    from .imaging import ImageResult, ProgressEvent, create_image
    from .store import Manifest, open_store
    from .store.restore import restore

    open_chain = Chain.open

#: public name -> (module, attribute path), imported on first use
_LAZY: dict[str, tuple[str, str]] = {
    "Chain": ("chain", "Chain"),
    "open_chain": ("chain", "Chain.open"),
    "Problem": ("check", "Problem"),
    "check_file": ("check", "check_file"),
    "check_chain": ("check", "check_chain"),
    "flatten": ("ops.flatten", "flatten"),
    "relink": ("ops.relink", "relink"),
    "RelinkResult": ("ops.relink", "RelinkResult"),
    "compact": ("ops.compact", "compact"),
    "repair": ("ops.repair", "repair"),
    "FlattenResult": ("ops.flatwrite", "FlattenResult"),
    "CoalesceResult": ("ops.coalesce", "CoalesceResult"),
    "VhdFile": ("vhd.file", "VhdFile"),
    "create_fixed": ("vhd.create", "create_fixed"),
    "create_dynamic": ("vhd.create", "create_dynamic"),
    "create_differencing": ("vhd.create", "create_differencing"),
    "map_disk": ("fsmap", "map_disk"),
    "DiskMap": ("fsmap", "DiskMap"),
    "create_image": ("imaging", "create_image"),
    "ProgressEvent": ("imaging", "ProgressEvent"),
    "ImageResult": ("imaging", "ImageResult"),
    "restore": ("store", "restore"),
    "open_store": ("store", "open_store"),
    "Manifest": ("store", "Manifest"),
}

#: public submodules, imported on first attribute access (``vhdcore.chain``)
_SUBMODULES = frozenset({
    "chain", "check", "cli", "coalesce", "compress", "demo", "disk", "estimate", "format",
    "fsmap", "imaging", "repo", "store",
})

__all__ = [
    "__version__",
    "backend",
    # chains and files
    "Chain",
    "open_chain",
    "VhdFile",
    "create_fixed",
    "create_dynamic",
    "create_differencing",
    # checking
    "Problem",
    "check_file",
    "check_chain",
    # rewriting
    "flatten",
    "relink",
    "compact",
    "repair",
    "FlattenResult",
    "CoalesceResult",
    "RelinkResult",
    # imaging
    "create_image",
    "ProgressEvent",
    "ImageResult",
    "restore",
    "open_store",
    "Manifest",
    # filesystems
    "map_disk",
    "DiskMap",
]
__all__ += _errors.__all__


def __getattr__(name: str) -> Any:
    """Import the module behind a public name the first time it is used."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    try:
        module, path = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    obj: Any = importlib.import_module(f"{__name__}.{module}")
    for part in path.split("."):
        obj = getattr(obj, part)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
