"""Shared pieces of the filesystem parsers: bounded readers and the result type."""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import VhdError
from . import _ranges as R

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["DiskReader", "FsResult", "FsUnsafe", "PartReader", "Probe", "u16", "u32", "u64"]

SECTOR = 512


class FsUnsafe(Exception):
    """The filesystem cannot be trusted: keep all of it.  The message says why."""


def u16(b: ReadableBuffer, off: int) -> int:
    v: int = struct.unpack_from("<H", b, off)[0]
    return v


def u32(b: ReadableBuffer, off: int) -> int:
    v: int = struct.unpack_from("<I", b, off)[0]
    return v


def u64(b: ReadableBuffer, off: int) -> int:
    v: int = struct.unpack_from("<Q", b, off)[0]
    return v


class DiskReader:
    """Bounds-checked reads of the virtual disk.

    A read outside the disk is a parse problem of whoever asked (``FsUnsafe``);
    a failing or short read inside it means the disk cannot be read, which is
    the one thing :func:`vhdcore.fsmap.map_disk` raises for (a ``VhdError``).
    """

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read = read
        self.size = int(size)

    def read(self, offset: int, length: int) -> bytes:
        if length < 0 or offset < 0 or offset + length > self.size:
            raise FsUnsafe(
                f"structure at byte {offset} (+{length}) lies outside the disk of {self.size} bytes"
            )
        if length == 0:
            return b""
        try:
            data = self._read(offset, length)
        except VhdError:
            raise
        except Exception as exc:  # the caller's reader failed: the disk cannot be read
            raise VhdError(
                f"reading the virtual disk at byte {offset} (+{length}) failed: {exc}"
            ) from exc
        if data is None or len(data) != length:
            got = 0 if data is None else len(data)
            raise VhdError(
                f"short read of the virtual disk at byte {offset}: asked {length}, got {got}"
            )
        return bytes(data)


class PartReader:
    """Reads relative to a partition; nothing outside it is reachable."""

    def __init__(self, disk: DiskReader, start: int, length: int) -> None:
        self.disk = disk
        self.start = int(start)
        self.length = int(length)

    def read(self, offset: int, length: int) -> bytes:
        if length < 0 or offset < 0 or offset + length > self.length:
            raise FsUnsafe(
                f"structure at byte {offset} (+{length}) of the partition lies past its end "
                f"({self.length} bytes)"
            )
        return self.disk.read(self.start + offset, length)

    def read_np(self, offset: int, length: int) -> np.ndarray:
        return np.frombuffer(self.read(offset, length), dtype=np.uint8)


@dataclass
class Probe:
    fs: str
    uuid: str | None = None
    analyze: Callable[..., FsResult] | None = None


@dataclass
class FsResult:
    """What a parser found, in bytes relative to the partition start."""

    fs: str | None
    uuid: str | None
    state: str
    free: tuple[np.ndarray, np.ndarray] = field(default_factory=R.empty)
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    fs_free_bytes: int | None = None  # what the filesystem itself reports free
