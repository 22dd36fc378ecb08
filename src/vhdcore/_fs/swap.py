"""Linux swap: everything after the header page is free, unless it holds a hibernation image."""
from __future__ import annotations

import struct
import uuid as _uuid

import numpy as np

from .common import FsResult, FsUnsafe, PartReader, Probe

__all__ = ["probe"]

PAGE_SIZES = (4096, 8192, 16384, 65536)
SWAP_MAGIC = b"SWAPSPACE2"
OLD_MAGIC = b"SWAP-SPACE"
HIBERNATION = (b"S1SUSPEND\0", b"S2SUSPEND\0", b"ULSUSPEND\0", b"LINHIB0001")
TUXONICE = b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c"


def _sig(part: PartReader) -> tuple[int, bytes] | None:
    for ps in PAGE_SIZES:
        if part.length < 2 * ps:
            break
        m = part.read(ps - 10, 10)
        if m in (SWAP_MAGIC, OLD_MAGIC) or m in HIBERNATION or m[:8] == TUXONICE:
            return ps, m
    return None


def probe(part: PartReader) -> Probe | None:
    hit = _sig(part)
    if hit is None:
        return None
    hdr = part.read(1024, 32)
    return Probe("swap", str(_uuid.UUID(bytes=hdr[12:28])), _analyze)


def _analyze(part: PartReader, probe_: Probe, journal_overlay: bool = True) -> FsResult:
    hit = _sig(part)
    if hit is None:  # pragma: no cover - probe just saw it
        raise FsUnsafe("swap signature vanished")
    ps, magic = hit
    if magic != SWAP_MAGIC:
        if magic == OLD_MAGIC:
            raise FsUnsafe("old-style (v0) swap area is not supported")
        raise FsUnsafe("swap area holds a hibernation image")
    hdr = part.read(1024, 32)
    version, last_page = struct.unpack_from("<II", hdr, 0)
    if version != 1:
        version, last_page = struct.unpack_from(">II", hdr, 0)
        if version != 1:
            raise FsUnsafe(f"swap header version {version} is not supported")
    end = (last_page + 1) * ps
    if end > part.length:
        raise FsUnsafe(f"swap area claims {end} bytes but its partition holds {part.length}")
    res = FsResult(fs="swap", uuid=probe_.uuid, state="clean")
    if last_page >= 1:
        res.free = (np.array([ps], dtype=np.int64), np.array([end], dtype=np.int64))
    res.fs_free_bytes = max(0, end - ps)
    return res
