"""MBR (with extended/logical EBR chains) and GPT partition tables.

Nothing here trusts a type byte or GUID for more than a hint: the caller
probes every partition for a filesystem signature.  Problems are returned as
warnings; the sectors that hold the tables themselves are returned as
``keep`` ranges so no partition can claim them free.
"""
from __future__ import annotations

import struct
import uuid as _uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from .common import SECTOR, DiskReader, FsUnsafe, u32, u64

__all__ = ["PartEntry", "Table", "scan"]

EXTENDED_TYPES = (0x05, 0x0F, 0x85)
MAX_LOGICAL = 256
MAX_GPT_ARRAY = 4 * 1024 * 1024

MBR_TYPES = {
    0x07: "ntfs/exfat",
    0x0B: "fat32",
    0x0C: "fat32-lba",
    0x82: "linux-swap",
    0x83: "linux",
    0x8E: "linux-lvm",
    0xFD: "linux-raid",
    0xEF: "efi",
}

GPT_TYPES = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "linux-data",
    "0657fd6d-a4ab-4c6c-84e5-0933c84b4f4f": "linux-swap",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "linux-root-x86-64",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "linux-home",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "linux-lvm",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "linux-raid",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "linux-luks",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "microsoft-basic-data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "microsoft-reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "windows-recovery",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "efi-system",
    "21686148-6449-6e6f-744e-656564454649": "bios-boot",
}


@dataclass
class PartEntry:
    index: int
    start: int  # bytes
    length: int  # bytes
    table: str  # "mbr" / "gpt" / "none"
    type_hint: str
    container: tuple[int, int] | None = None  # extended partition (start, end) of a logical one


@dataclass
class Table:
    kind: str  # "mbr", "gpt", "none" (no table: probe the whole disk), "unknown"
    entries: list[PartEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    keep: list[tuple[int, int]] = field(default_factory=list)  # (start, end) bytes


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    out = []
    for i in range(4):
        e = sector[0x1BE + 16 * i : 0x1BE + 16 * (i + 1)]
        status, ptype = e[0], e[4]
        first, count = struct.unpack_from("<II", e, 8)
        out.append((status, ptype, first, count))
    return out


def _mbr_plausible(sector: bytes) -> bool:
    if sector[510:512] != b"\x55\xaa":
        return False
    ents = _mbr_entries(sector)
    used = [e for e in ents if e[1] != 0]
    if not used:
        return False
    return all(e[0] in (0x00, 0x80) and e[2] > 0 and e[3] > 0 for e in used)


def _gpt_header(
    disk: DiskReader, lba: int, nsect: int, warnings: list[str], which: str
) -> dict[str, Any] | None:
    """Parse and check one GPT header and its entry array; None when invalid."""
    hdr = disk.read(lba * SECTOR, SECTOR)
    if hdr[0:8] != b"EFI PART":
        return None
    hsize = u32(hdr, 12)
    if not 92 <= hsize <= SECTOR:
        warnings.append(f"{which} GPT header at LBA {lba}: header size {hsize} is invalid")
        return None
    want = u32(hdr, 16)
    h = bytearray(hdr[:hsize])
    h[16:20] = b"\0\0\0\0"
    if zlib.crc32(bytes(h)) != want:
        warnings.append(f"{which} GPT header at LBA {lba}: header CRC32 mismatch")
        return None
    my_lba, _alt_lba, first_use, last_use = struct.unpack_from("<QQQQ", hdr, 24)
    if my_lba != lba:
        warnings.append(f"{which} GPT header at LBA {lba} says it lives at LBA {my_lba}")
        return None
    arr_lba = u64(hdr, 72)
    count, esize, arr_crc = struct.unpack_from("<III", hdr, 80)
    if esize < 128 or esize % 8 or count == 0 or count * esize > MAX_GPT_ARRAY:
        warnings.append(f"{which} GPT header at LBA {lba}: entry array {count}x{esize} is invalid")
        return None
    arr_len = count * esize
    arr_sectors = -(-arr_len // SECTOR)
    if arr_lba < 1 or arr_lba + arr_sectors > nsect:
        warnings.append(f"{which} GPT entry array at LBA {arr_lba} lies outside the disk")
        return None
    arr = disk.read(arr_lba * SECTOR, arr_len)
    if zlib.crc32(arr) != arr_crc:
        warnings.append(f"{which} GPT entry array at LBA {arr_lba}: CRC32 mismatch")
        return None
    if not (first_use <= last_use < nsect):
        warnings.append(f"{which} GPT header: usable LBAs {first_use}..{last_use} outside the disk")
        return None
    return {
        "lba": lba,
        "first_usable": first_use,
        "last_usable": last_use,
        "arr_lba": arr_lba,
        "arr_sectors": arr_sectors,
        "count": count,
        "esize": esize,
        "arr": arr,
    }


def _scan_gpt(disk: DiskReader, nsect: int, t: Table) -> bool:
    """Fill ``t`` from a GPT; False when neither header is usable."""
    t.keep.append((0, SECTOR))
    w: list[str] = []
    prim = _gpt_header(disk, 1, nsect, w, "primary")
    back = _gpt_header(disk, nsect - 1, nsect, w, "backup") if nsect > 2 else None
    for h in (prim, back):
        if h:
            t.keep.append((h["lba"] * SECTOR, (h["lba"] + 1) * SECTOR))
            t.keep.append((h["arr_lba"] * SECTOR, (h["arr_lba"] + h["arr_sectors"]) * SECTOR))
    # whatever the headers say, LBA 1 and the last LBA are table territory
    t.keep.append((SECTOR, 2 * SECTOR))
    t.keep.append(((nsect - 1) * SECTOR, nsect * SECTOR))
    hdr = prim or back
    if hdr is None:
        t.warnings.extend(w)
        return False
    if prim is None:
        t.warnings.extend(w)
        t.warnings.append("primary GPT is damaged; using the backup GPT at the last LBA")
    elif back is None:
        t.warnings.append("backup GPT at the last LBA is missing or damaged; using the primary")
    # default-placed arrays: the 32 sectors after LBA 1 and before the last LBA
    t.keep.append((2 * SECTOR, min(34, nsect) * SECTOR))
    t.keep.append((max(0, nsect - 33) * SECTOR, nsect * SECTOR))
    arr, esize = hdr["arr"], hdr["esize"]
    idx = 0
    for i in range(hdr["count"]):
        e = arr[i * esize : (i + 1) * esize]
        tguid = e[0:16]
        if tguid == b"\0" * 16:
            continue
        idx = i + 1
        first, last = struct.unpack_from("<QQ", e, 32)
        thint = GPT_TYPES.get(str(_uuid.UUID(bytes_le=tguid)), str(_uuid.UUID(bytes_le=tguid)))
        if last < first:
            t.warnings.append(f"GPT entry {idx}: last LBA {last} is before first LBA {first}")
            continue
        if first < hdr["first_usable"] or last > hdr["last_usable"]:
            t.warnings.append(
                f"GPT entry {idx}: LBAs {first}..{last} lie outside the usable range "
                f"{hdr['first_usable']}..{hdr['last_usable']}"
            )
        t.entries.append(
            PartEntry(idx, first * SECTOR, (last - first + 1) * SECTOR, "gpt", "gpt:" + thint)
        )
    return True


def _scan_mbr(disk: DiskReader, nsect: int, sector0: bytes, t: Table) -> None:
    t.keep.append((0, SECTOR))
    for i, (_status, ptype, first, count) in enumerate(_mbr_entries(sector0)):
        if ptype == 0 or count == 0:
            continue
        hint = f"mbr:0x{ptype:02x}" + (f" ({MBR_TYPES[ptype]})" if ptype in MBR_TYPES else "")
        if ptype in EXTENDED_TYPES:
            _scan_ebr_chain(disk, nsect, first, count, t)
            continue
        t.entries.append(PartEntry(i + 1, first * SECTOR, count * SECTOR, "mbr", hint))


def _scan_ebr_chain(disk: DiskReader, nsect: int, ext_first: int, ext_count: int, t: Table) -> None:
    ext_end = ext_first + ext_count
    container = (ext_first * SECTOR, ext_end * SECTOR)
    seen: set[int] = set()
    ebr = ext_first
    index = 5
    while True:
        if ebr in seen:
            t.warnings.append(f"EBR chain loops back to LBA {ebr}; stopped there")
            return
        if len(seen) >= MAX_LOGICAL:
            t.warnings.append(f"EBR chain longer than {MAX_LOGICAL} entries; stopped")
            return
        if not ext_first <= ebr < min(ext_end, nsect):
            t.warnings.append(f"EBR at LBA {ebr} lies outside the extended partition or the disk")
            return
        seen.add(ebr)
        t.keep.append((ebr * SECTOR, (ebr + 1) * SECTOR))
        sec = disk.read(ebr * SECTOR, SECTOR)
        if sec[510:512] != b"\x55\xaa":
            t.warnings.append(f"EBR at LBA {ebr} has no 0x55AA signature; chain ends there")
            return
        ents = _mbr_entries(sec)
        _st, ptype, rel, count = ents[0]
        if ptype != 0 and count != 0:
            hint = f"mbr:0x{ptype:02x}" + (f" ({MBR_TYPES[ptype]})" if ptype in MBR_TYPES else "")
            if ptype in EXTENDED_TYPES:
                t.warnings.append(f"EBR at LBA {ebr}: first entry is another extended partition")
            else:
                t.entries.append(
                    PartEntry(index, (ebr + rel) * SECTOR, count * SECTOR, "mbr", hint, container)
                )
                if rel == 0:
                    t.warnings.append(f"logical partition {index} starts on its own EBR")
            index += 1
        _st, ntype, nrel, _ncount = ents[1]
        if ntype == 0 or nrel == 0:
            return
        if ntype not in EXTENDED_TYPES:
            t.warnings.append(f"EBR at LBA {ebr}: link entry has type 0x{ntype:02x}; chain ends")
            return
        ebr = ext_first + nrel


def _has_fs_at_zero(disk: DiskReader) -> bool:
    head = disk.read(0, min(disk.size, 4096))
    return head[0:4] == b"XFSB" or head[3:11] == b"NTFS    "


def scan(disk: DiskReader) -> Table:
    """Find the partition table of the disk (or none at all)."""
    size = disk.size
    nsect = size // SECTOR
    if nsect < 1:
        return Table("unknown", warnings=["disk is smaller than one sector"])
    try:
        sector0 = disk.read(0, SECTOR)
        lba1 = disk.read(SECTOR, SECTOR) if nsect > 1 else b""
        last = disk.read((nsect - 1) * SECTOR, SECTOR) if nsect > 2 else b""
        mbr_ok = _mbr_plausible(sector0)
        protective = mbr_ok and any(e[1] == 0xEE for e in _mbr_entries(sector0))
        if protective or lba1[:8] == b"EFI PART" or (not mbr_ok and last[:8] == b"EFI PART"):
            t = Table("gpt")
            if not _scan_gpt(disk, nsect, t):
                t.kind = "unknown"
                t.warnings.append("no valid GPT: the whole disk is kept")
            return t
        if _has_fs_at_zero(disk):
            return Table("none", [PartEntry(1, 0, nsect * SECTOR, "none", "whole-disk")])
        if mbr_ok:
            t = Table("mbr")
            _scan_mbr(disk, nsect, sector0, t)
            return t
        # no table: a filesystem (ext, swap) may still live on the whole disk
        return Table("none", [PartEntry(1, 0, nsect * SECTOR, "none", "whole-disk")])
    except FsUnsafe as exc:
        return Table("unknown", warnings=[f"partition table unreadable: {exc}; whole disk kept"])
