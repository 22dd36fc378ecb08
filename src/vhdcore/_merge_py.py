"""Pure-Python/numpy twin of the Cython kernel ``vhdcore._merge``.

Same names, same signatures, same results and the same exceptions: it is the
test oracle for the compiled kernel and the fallback where the extension is
not built (``VHDCORE_IMPORT_POLICY=python``).

Conventions shared with the kernel:

* A *sector bitmap* is the VHD one: bit ``s`` is bit ``7 - s % 8`` of byte
  ``s // 8`` (most significant bit first).  ``nsectors`` bits are used; a
  bitmap buffer must hold at least ``ceil(nsectors / 8)`` bytes.
* Sector data buffers hold ``nsectors * 512`` bytes (at least).
* Inputs are any read-only buffers (``bytes``, mmap slices); outputs are
  writable buffers owned by the caller.  Nothing here allocates what the
  caller keeps, opens files or keeps state.
* Sizes are checked before any work; a bad size raises ``ValueError``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xxhash

if TYPE_CHECKING:
    from collections.abc import Sequence

    from _typeshed import ReadableBuffer, WriteableBuffer

SECTOR = 512

KERNEL_NAMES = (
    "overlay",
    "overlay_full",
    "fill_unset",
    "bitmap_or",
    "bitmap_count",
    "find_runs",
    "is_zero",
    "clear_zero_sectors",
    "drop_equal_sectors",
    "fingerprint",
)


def _u8(buf: ReadableBuffer, writable: bool = False) -> np.ndarray:
    # numpy's stubs accept any buffer in frombuffer only for Python 3.12+
    a: np.ndarray = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
    if writable and not a.flags.writeable:
        raise ValueError("output buffer is read-only")
    return a


def _check(nsectors: int, bitmaps: Sequence[np.ndarray] = (), datas: Sequence[np.ndarray] = ()) -> None:
    if nsectors < 0:
        raise ValueError(f"nsectors must be >= 0, got {nsectors}")
    nb = (nsectors + 7) // 8
    for b in bitmaps:
        if len(b) < nb:
            raise ValueError(f"bitmap of {len(b)} bytes is too small for {nsectors} sectors")
    for d in datas:
        if len(d) < nsectors * SECTOR:
            raise ValueError(f"data buffer of {len(d)} bytes is too small for {nsectors} sectors")


def _bits(bitmap: np.ndarray, nsectors: int) -> np.ndarray:
    return np.unpackbits(bitmap[: (nsectors + 7) // 8])[:nsectors].astype(bool)


def _store_bits(bitmap: np.ndarray, bits: np.ndarray) -> None:
    n = bits.size
    packed = np.packbits(bits)
    full, rem = divmod(n, 8)
    bitmap[:full] = packed[:full]
    if rem:
        mask = (0xFF << (8 - rem)) & 0xFF
        bitmap[full] = (int(bitmap[full]) & (0xFF ^ mask)) | (int(packed[full]) & mask)


def overlay(
    src_bitmap: ReadableBuffer, src_data: ReadableBuffer, out_bitmap: WriteableBuffer, out_data: WriteableBuffer, nsectors: int
) -> int:
    """Copy each sector set in ``src_bitmap`` and clear in ``out_bitmap`` from
    ``src_data`` to ``out_data`` and set its bit in ``out_bitmap`` (a younger
    layer already in ``out`` wins).  Returns the number of sectors copied."""
    sb, sd, ob, od = _u8(src_bitmap), _u8(src_data), _u8(out_bitmap, True), _u8(out_data, True)
    _check(nsectors, (sb, ob), (sd, od))
    take = _bits(sb, nsectors) & ~_bits(ob, nsectors)
    n = int(take.sum())
    if n:
        idx = np.nonzero(take)[0]
        od[: nsectors * SECTOR].reshape(nsectors, SECTOR)[idx] = sd[: nsectors * SECTOR].reshape(
            nsectors, SECTOR
        )[idx]
        _store_bits(ob, _bits(ob, nsectors) | take)
    return n


def overlay_full(src_data: ReadableBuffer, out_bitmap: WriteableBuffer, out_data: WriteableBuffer, nsectors: int) -> int:
    """``overlay`` for a layer where every sector is present (a fixed disk)."""
    sd, ob, od = _u8(src_data), _u8(out_bitmap, True), _u8(out_data, True)
    _check(nsectors, (ob,), (sd, od))
    take = ~_bits(ob, nsectors)
    n = int(take.sum())
    if n:
        idx = np.nonzero(take)[0]
        od[: nsectors * SECTOR].reshape(nsectors, SECTOR)[idx] = sd[: nsectors * SECTOR].reshape(
            nsectors, SECTOR
        )[idx]
        _store_bits(ob, np.ones(nsectors, dtype=bool))
    return n


def fill_unset(bitmap: ReadableBuffer, data: WriteableBuffer, nsectors: int) -> int:
    """Zero every sector of ``data`` whose bit is clear.  Returns how many."""
    b, d = _u8(bitmap), _u8(data, True)
    _check(nsectors, (b,), (d,))
    clear = ~_bits(b, nsectors)
    n = int(clear.sum())
    if n:
        d[: nsectors * SECTOR].reshape(nsectors, SECTOR)[np.nonzero(clear)[0]] = 0
    return n


def bitmap_or(src: ReadableBuffer, dst: WriteableBuffer, nbytes: int) -> None:
    """``dst[:nbytes] |= src[:nbytes]``."""
    s, d = _u8(src), _u8(dst, True)
    if nbytes < 0 or len(s) < nbytes or len(d) < nbytes:
        raise ValueError(f"bitmap_or: {nbytes} bytes do not fit buffers of {len(s)} and {len(d)}")
    d[:nbytes] |= s[:nbytes]


def bitmap_count(bitmap: ReadableBuffer, nsectors: int) -> int:
    """Number of set bits among the first ``nsectors``."""
    b = _u8(bitmap)
    _check(nsectors, (b,))
    return int(_bits(b, nsectors).sum())


def find_runs(bitmap: ReadableBuffer, nsectors: int, runs: WriteableBuffer) -> int:
    """Write the runs of set bits as ``(start, length)`` pairs into the uint32
    buffer ``runs`` and return how many runs there are.  ``runs`` must hold
    ``2 * (nsectors // 2 + 1)`` entries (the most runs a bitmap can have)."""
    b = _u8(bitmap)
    _check(nsectors, (b,))
    r: np.ndarray = np.frombuffer(runs, dtype=np.uint32)  # type: ignore[call-overload]
    if not r.flags.writeable:
        raise ValueError("output buffer is read-only")
    if nsectors > 0xFFFFFFFF:
        raise ValueError(f"find_runs: {nsectors} sectors do not fit uint32 run entries")
    need = 2 * (nsectors // 2 + 1)
    if r.size < need:
        raise ValueError(f"runs buffer of {r.size} entries is too small, need {need}")
    bits = _bits(b, nsectors).astype(np.int8)
    edges = np.diff(np.concatenate(([0], bits, [0])))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    n = starts.size
    r[0 : 2 * n : 2] = starts
    r[1 : 2 * n : 2] = ends - starts
    return int(n)


def is_zero(data: ReadableBuffer, offset: int = 0, length: int = -1) -> bool:
    """True when ``data[offset:offset+length]`` (to the end if length < 0) is all zeros."""
    d = _u8(data)
    if offset < 0 or offset > len(d) or (length >= 0 and offset + length > len(d)):
        raise ValueError(f"range {offset}+{length} is outside a buffer of {len(d)} bytes")
    if length < 0:
        length = len(d) - offset
    return not bool(d[offset : offset + length].any())


def clear_zero_sectors(bitmap: WriteableBuffer, data: ReadableBuffer, nsectors: int) -> int:
    """Clear the bit of every set sector whose data is all zeros.  Returns the
    number of bits still set."""
    b, d = _u8(bitmap, True), _u8(data)
    _check(nsectors, (b,), (d,))
    bits = _bits(b, nsectors)
    nonzero = d[: nsectors * SECTOR].reshape(nsectors, SECTOR).any(axis=1)
    bits &= nonzero
    _store_bits(b, bits)
    return int(bits.sum())


def drop_equal_sectors(
    bitmap: WriteableBuffer, data: ReadableBuffer, ref_bitmap: ReadableBuffer, ref_data: ReadableBuffer, nsectors: int
) -> int:
    """Clear the bit of every sector set in both bitmaps whose data equals the
    reference's.  Returns the number of bits cleared."""
    b, d, rb, rd = _u8(bitmap, True), _u8(data), _u8(ref_bitmap), _u8(ref_data)
    _check(nsectors, (b, rb), (d, rd))
    bits = _bits(b, nsectors)
    both = bits & _bits(rb, nsectors)
    eq = (
        d[: nsectors * SECTOR].reshape(nsectors, SECTOR)
        == rd[: nsectors * SECTOR].reshape(nsectors, SECTOR)
    ).all(axis=1)
    drop = both & eq
    n = int(drop.sum())
    if n:
        _store_bits(b, bits & ~drop)
    return n


def fingerprint(data: ReadableBuffer) -> int:
    """xxh3-64 of the buffer, as an unsigned int."""
    return xxhash.xxh3_64_intdigest(data)
