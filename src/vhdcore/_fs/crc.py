"""CRC-32C (Castagnoli) and CRC-16 (ANSI, as in ext4's gdt_csum), table driven.

``crc32c_raw(seed, data)`` is the Linux ``crc32c_le`` / e2fsprogs
``ext2fs_crc32c_le`` form: no inversion on entry or exit.  The standard
CRC-32C of ``data`` is ``crc32c_raw(0xFFFFFFFF, data) ^ 0xFFFFFFFF``.

``crc32c_rows`` computes one CRC per row of a 2-D array at once (one numpy
step per byte column), which is how thousands of bitmap or descriptor
checksums are verified without a per-byte Python loop per block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["crc16_raw", "crc16_rows", "crc32c", "crc32c_raw", "crc32c_rows"]


def _table(poly: int, dtype: npt.DTypeLike) -> np.ndarray:
    t = np.zeros(256, dtype=np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        t[i] = c
    return t.astype(dtype)


_T32 = _table(0x82F63B78, np.uint32)
_T16 = _table(0xA001, np.uint16)
_T32L = [int(x) for x in _T32]
_T16L = [int(x) for x in _T16]


def crc32c_raw(seed: int, data: ReadableBuffer) -> int:
    crc = seed & 0xFFFFFFFF
    t = _T32L
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: ReadableBuffer, value: int = 0) -> int:
    """The standard CRC-32C, continuing from a previous standard ``value``."""
    return crc32c_raw(value ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def crc16_raw(seed: int, data: ReadableBuffer) -> int:
    crc = seed & 0xFFFF
    t = _T16L
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _rows(table: np.ndarray, seeds: npt.ArrayLike, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.uint8)
    if rows.ndim != 2:
        raise ValueError("rows must be a 2-D uint8 array")
    crc = np.array(np.broadcast_to(np.asarray(seeds, dtype=table.dtype), (rows.shape[0],)))
    if rows.shape[0] == 0:
        return crc
    cols = np.ascontiguousarray(rows.T)
    eight = table.dtype.type(8)
    mask = table.dtype.type(0xFF)
    for col in cols:
        crc = table[(crc ^ col) & mask] ^ (crc >> eight)
    return crc


def crc32c_rows(seeds: npt.ArrayLike, rows: np.ndarray) -> np.ndarray:
    """Raw CRC-32C of every row of ``rows``, each starting from its seed."""
    return _rows(_T32, seeds, rows)


def crc16_rows(seeds: npt.ArrayLike, rows: np.ndarray) -> np.ndarray:
    """Raw CRC-16 (poly 0xA001 reflected) of every row of ``rows``."""
    return _rows(_T16, seeds, rows)
