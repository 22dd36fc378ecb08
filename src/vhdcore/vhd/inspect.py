"""What ``vhdcore info`` shows of a VHD file that does not open
(:func:`inspect_damaged`); one that opens describes itself
(:meth:`vhdcore.vhd.file.VhdFile.describe`)."""
from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from .format import FOOTER_SIZE, HEADER_SIZE, read_footer_fields, read_header_fields

if TYPE_CHECKING:
    from .file import PathLike

__all__ = ["inspect_damaged"]


def inspect_damaged(path: PathLike) -> dict[str, Any]:
    """What can be read of a VHD file that does not open (``vhdcore info`` on
    a damaged file): the footer at the end and its copy at offset 0, and the
    dynamic header the better footer points to, each field as stored, each
    checksum stored and computed.  Reads at most a few KiB; never raises for
    damaged contents (only when the file cannot be read at all)."""
    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file")
    out: dict[str, Any] = {"path": path, "file_size": st.st_size}
    with open(path, "rb") as f:
        size = st.st_size
        if size >= FOOTER_SIZE:
            f.seek(size - FOOTER_SIZE)
            out["footer"] = read_footer_fields(f.read(FOOTER_SIZE))
            out["footer"]["offset"] = size - FOOTER_SIZE
        if size >= 2 * FOOTER_SIZE:
            f.seek(0)
            copy = read_footer_fields(f.read(FOOTER_SIZE))
            if copy["cookie_ok"]:
                copy["offset"] = 0
                out["footer_copy"] = copy
        best = None
        for key in ("footer", "footer_copy"):
            ft = out.get(key)
            if ft and ft["cookie_ok"] and ft["type"] in ("dynamic", "differencing"):
                if best is None or (ft["checksum_ok"] and not best["checksum_ok"]):
                    best = ft
        if best is not None:
            hoff = int(best["data_offset"])
            if 0 <= hoff and hoff + HEADER_SIZE <= size:
                f.seek(hoff)
                out["header"] = read_header_fields(f.read(HEADER_SIZE))
                out["header"]["offset"] = hoff
    bad = [f"{k.replace('_', ' ')} checksum (stored {v['checksum_stored']}, computed "
           f"{v['checksum_computed']})" for k, v in out.items()
           if isinstance(v, dict) and v.get("cookie_ok") and not v["checksum_ok"]]
    out["checksum_failures"] = bad
    return out