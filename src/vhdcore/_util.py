"""Small helpers shared by the command line and the library."""
from __future__ import annotations

import mmap
import re

from .errors import VhdError

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str | int) -> int:
    """Parse ``"512K"``, ``"2M"``, ``"1.5G"``, ``"2GiB"`` or a plain number of bytes.
    Suffixes are binary (K = 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTB]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise VhdError(f"cannot read {text!r} as a size (examples: 4096, 512K, 2M, 10G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise VhdError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def aligned_buffer(nbytes: int) -> memoryview:
    """A zeroed, page-aligned writable buffer (page-cache copies into a
    page-aligned buffer run about twice as fast as into a bytearray)."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]
