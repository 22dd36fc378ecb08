"""One VHD file (:class:`VhdFile`) and the creation of new ones.

Kept for the documented import path; the code lives in vhdcore.vhd.*:
:mod:`vhdcore.vhd.file` (open, validate, views, read), :mod:`vhdcore.vhd.write`
(the crash-consistent write order), :mod:`vhdcore.vhd.create` (new files),
:mod:`vhdcore.vhd.inspect` (``info`` of a damaged file), and
:func:`vhdcore.chain.vhd_to_raw`.
"""
from __future__ import annotations

from .chain import vhd_to_raw
from .vhd.create import (
    LOCATOR_CODES,
    create_differencing,
    create_dynamic,
    create_fixed,
    parent_locator_blobs,
    vhd_timestamp_of_file,
)
from .vhd.file import PathLike, VhdFile
from .vhd.inspect import inspect_damaged

__all__ = [
    "VhdFile",
    "create_fixed",
    "create_dynamic",
    "create_differencing",
    "vhd_to_raw",
    "PathLike",
    "vhd_timestamp_of_file",
    "parent_locator_blobs",
    "inspect_damaged",
    "LOCATOR_CODES",
]
