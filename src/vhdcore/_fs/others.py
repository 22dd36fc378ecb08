"""Signatures of things that are recognised only to say why they are kept whole."""
from __future__ import annotations

from .common import FsUnsafe, PartReader

__all__ = ["identify"]


def _at(part: PartReader, off: int, n: int) -> bytes:
    if off < 0 or off + n > part.length:
        return b""
    try:
        return part.read(off, n)
    except FsUnsafe:
        return b""


def identify(part: PartReader) -> str | None:
    """Name of a known but unparsed format in the partition, or None."""
    if _at(part, 0, 6) == b"LUKS\xba\xbe" or _at(part, 0, 6) == b"SKUL\xba\xbe":
        return "luks"
    for sec in range(4):
        s = _at(part, sec * 512, 512)
        if s[0:8] == b"LABELONE" and s[24:32] == b"LVM2 001":
            return "lvm2"
    md = b"\xfc\x4e\x2b\xa9"
    if _at(part, 0, 4) == md or _at(part, 4096, 4) == md:
        return "linux-raid"
    if part.length >= 128 * 1024:
        end = (part.length & ~(65536 - 1)) - 65536
        if _at(part, end, 4) == md:
            return "linux-raid"
        if _at(part, part.length - 8192 & ~4095, 4) == md:
            return "linux-raid"
    if _at(part, 65536 + 64, 8) == b"_BHRfS_M":
        return "btrfs"
    if _at(part, 0x52, 8) == b"FAT32   " or _at(part, 0x36, 5) in (b"FAT12", b"FAT16"):
        return "vfat"
    if _at(part, 3, 8) == b"EXFAT   ":
        return "exfat"
    if _at(part, 0x8001, 5) == b"CD001":
        return "iso9660"
    if _at(part, 0, 8) == b"\x00\x00\x00\x00\x00\x00\x00\x00" and _at(part, 0x218, 8) == b"LVM2 001":
        return "lvm2"
    return None
