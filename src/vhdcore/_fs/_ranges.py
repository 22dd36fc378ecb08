"""Byte and block range arithmetic on numpy arrays (half-open ``[start, end)``).

A range set is a pair ``(starts, ends)`` of int64 arrays.  *Normal* sets are
sorted, non-empty and neither overlap nor touch; every function here returns
normal sets and accepts arbitrary ones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeAlias

    import numpy.typing as npt

    #: what the functions accept as a range set: ``(starts, ends)``, any array-likes
    RangeLike: TypeAlias = "tuple[npt.ArrayLike, npt.ArrayLike]"

__all__ = [
    "EMPTY",
    "align_inward",
    "clip",
    "difference",
    "intersection",
    "normalize",
    "overlaps_any",
    "scale",
    "shift",
    "total",
    "union",
    "zero_bit_runs",
]

_I64 = np.int64


def _arr(x: npt.ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=_I64).reshape(-1)


def empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, _I64), np.zeros(0, _I64)


EMPTY = empty()


def _cover(
    sets: Sequence[RangeLike], keep: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage sweep over several range sets.

    ``keep(counts)`` gets one coverage-count array per set (for each elementary
    interval between consecutive boundaries) and returns a boolean mask.
    """
    pos_parts, delta_parts = [], []
    for k, (s, e) in enumerate(sets):
        s, e = _arr(s), _arr(e)
        ok = e > s
        s, e = s[ok], e[ok]
        pos_parts += [s, e]
        d = np.zeros((len(sets), 2 * len(s)), dtype=_I64)
        d[k, : len(s)] = 1
        d[k, len(s):] = -1
        delta_parts.append(d)
    if not pos_parts:
        return empty()
    pos = np.concatenate(pos_parts)
    if pos.size == 0:
        return empty()
    delta = np.concatenate(delta_parts, axis=1)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    delta = delta[:, order]
    uniq, first = np.unique(pos, return_index=True)
    summed = np.add.reduceat(delta, first, axis=1)
    counts = np.cumsum(summed, axis=1)
    mask = keep(counts)[:-1]
    seg_s = uniq[:-1][mask]
    seg_e = uniq[1:][mask]
    if seg_s.size == 0:
        return empty()
    # merge touching segments
    brk = np.flatnonzero(seg_s[1:] != seg_e[:-1])
    starts = np.concatenate(([seg_s[0]], seg_s[brk + 1]))
    ends = np.concatenate((seg_e[brk], [seg_e[-1]]))
    return starts.astype(_I64), ends.astype(_I64)


def normalize(starts: npt.ArrayLike, ends: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sort and merge overlapping or touching ranges; drop empty ones."""
    s, e = _arr(starts), _arr(ends)
    if s.size == 0:
        return empty()
    ok = e > s
    s, e = s[ok], e[ok]
    if s.size == 0:
        return empty()
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    run_end = np.maximum.accumulate(e)
    brk = np.flatnonzero(s[1:] > run_end[:-1])
    starts = np.concatenate(([s[0]], s[brk + 1]))
    ends = np.concatenate((run_end[brk], [run_end[-1]]))
    return starts, ends


def union(*sets: RangeLike) -> tuple[np.ndarray, np.ndarray]:
    if not sets:
        return empty()
    s = np.concatenate([_arr(a) for a, _ in sets])
    e = np.concatenate([_arr(b) for _, b in sets])
    return normalize(s, e)


def difference(a: RangeLike, b: RangeLike) -> tuple[np.ndarray, np.ndarray]:
    """Ranges covered by ``a`` and not by ``b``."""
    if _arr(b[0]).size == 0:
        return normalize(*a)
    return _cover([a, b], lambda c: (c[0] > 0) & (c[1] == 0))


def intersection(a: RangeLike, b: RangeLike) -> tuple[np.ndarray, np.ndarray]:
    return _cover([a, b], lambda c: (c[0] > 0) & (c[1] > 0))


def overlaps_any(a: RangeLike, b: RangeLike) -> bool:
    return intersection(a, b)[0].size > 0


def clip(a: RangeLike, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    s, e = normalize(*a)
    s = np.maximum(s, lo)
    e = np.minimum(e, hi)
    ok = e > s
    return s[ok], e[ok]


def shift(a: RangeLike, by: int) -> tuple[np.ndarray, np.ndarray]:
    return _arr(a[0]) + by, _arr(a[1]) + by


def scale(a: RangeLike, factor: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Map unit ranges to ``offset + unit * factor`` (e.g. blocks to bytes)."""
    return _arr(a[0]) * factor + offset, _arr(a[1]) * factor + offset


def align_inward(a: RangeLike, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink each range to whole ``unit``-aligned pieces (start up, end down)."""
    s, e = _arr(a[0]), _arr(a[1])
    s = -((-s) // unit) * unit
    e = (e // unit) * unit
    ok = e > s
    return s[ok], e[ok]


def total(a: RangeLike) -> int:
    return int((_arr(a[1]) - _arr(a[0])).sum())


def zero_bit_runs(bitmap: np.ndarray, nbits: int, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs of 0 bits in an LSB-first bitmap (the ext/NTFS convention, 1 = used).

    Only the first ``nbits`` bits are looked at; the result is in bit units
    plus ``base``.
    """
    if nbits <= 0:
        return empty()
    bitmap = np.asarray(bitmap, dtype=np.uint8).reshape(-1)
    if nbits > 8 * bitmap.size:
        raise ValueError(f"bitmap of {bitmap.size} bytes cannot hold {nbits} bits")
    bits = np.unpackbits(np.asarray(bitmap, dtype=np.uint8), count=nbits, bitorder="little")
    free = np.empty(nbits + 2, dtype=np.int8)
    free[0] = 0
    free[-1] = 0
    np.subtract(1, bits, out=free[1:-1], casting="unsafe")
    d = np.diff(free)
    starts = np.flatnonzero(d == 1).astype(_I64)
    ends = np.flatnonzero(d == -1).astype(_I64)
    return starts + base, ends + base
