"""Select the merge kernel: the compiled Cython module or its pure-Python twin.

Everything in vhdcore imports kernels from here, never from ``_merge`` or
``_merge_py`` directly.

``VHDCORE_IMPORT_POLICY`` chooses:

* ``default`` (or unset): the Cython extension on CPython; a missing
  extension is an ``ImportError``, never a silent 20-100x slowdown.  On other
  interpreters (PyPy) the Python twin.
* ``cython``: the extension, or an error.
* ``python``: the pure-Python/numpy twin (tests, debugging, platforms
  without a compiler).

``backend`` names the active one: ``"cython"`` or ``"python"``.
"""
from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names bound below at run time, typed by the kernel's stub
    from ._merge import (
        bitmap_count as bitmap_count,
        bitmap_or as bitmap_or,
        clear_zero_sectors as clear_zero_sectors,
        drop_equal_sectors as drop_equal_sectors,
        fill_unset as fill_unset,
        find_runs as find_runs,
        fingerprint as fingerprint,
        is_zero as is_zero,
        overlay as overlay,
        overlay_full as overlay_full,
    )

_policy = os.environ.get("VHDCORE_IMPORT_POLICY", "default").strip().lower() or "default"

if _policy not in ("default", "cython", "python"):
    raise ImportError(
        f"VHDCORE_IMPORT_POLICY={_policy!r} is not one of 'default', 'cython', 'python'"
    )

if _policy == "python" or (_policy == "default" and platform.python_implementation() != "CPython"):
    from . import _merge_py as _impl

    backend = "python"
else:
    try:
        from . import _merge as _impl  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "vhdcore's compiled kernel (vhdcore._merge) is not built. Install vhdcore with "
            "'pip install .' (which compiles it), or set VHDCORE_IMPORT_POLICY=python to use the "
            "much slower pure-Python twin on purpose."
        ) from exc
    backend = "cython"

#: the names every kernel implementation exports, with the same signatures
KERNEL_NAMES = _impl.KERNEL_NAMES

globals().update({name: getattr(_impl, name) for name in KERNEL_NAMES})

__all__ = ["backend", "KERNEL_NAMES", *KERNEL_NAMES]
