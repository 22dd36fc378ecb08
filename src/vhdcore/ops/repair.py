"""``repair``: a missing or damaged primary footer restored from the copy at
offset 0, or a stale copy at offset 0 from a good primary footer."""
from __future__ import annotations

import os

from .. import _io
from ..vhd.file import PathLike, VhdFile
from ..errors import FormatError
from ..vhd.format import FOOTER_SIZE

__all__ = ["repair"]


def repair(vhd: PathLike) -> bool:
    """Restore a missing or damaged primary footer from the copy at offset 0,
    or a copy at offset 0 that an interrupted update left stale from a good
    primary footer.  Returns False when both were fine (nothing written)."""
    vhd = os.fspath(vhd)
    with VhdFile.open(vhd) as v:
        primary_ok = v.primary_footer_ok
        stale_copy = primary_ok and not v.is_fixed and bytes(v.mv[:FOOTER_SIZE]) != v.footer.pack()
        if v.is_fixed and not primary_ok:  # pragma: no cover - open() refuses this case
            raise FormatError(f"{vhd}: a fixed disk has no footer copy to repair from")
        end = v._end_of_data() if not primary_ok else 0
        footer = v.footer
    if primary_ok:
        if not stale_copy:
            return False
        with VhdFile.open(vhd, writable=True) as w:
            return w.sync_footer_copy()
    fd = os.open(vhd, os.O_RDWR)
    try:
        # the footer right after the last block, then cut what follows
        _io.pwrite_all(fd, footer.pack(), end)
        _io.fsync(fd)
        _io.ftruncate(fd, end + FOOTER_SIZE)
        _io.fsync(fd)
    finally:
        os.close(fd)
    with VhdFile.open(vhd) as v:
        if not v.primary_footer_ok:  # pragma: no cover - defensive
            raise FormatError(f"{vhd}: repair did not produce a valid footer")
    return True

