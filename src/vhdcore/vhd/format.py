"""On-disk structures of the Microsoft VHD format, with no I/O.

The footer, the dynamic header, parent locators and the block allocation
table (BAT): parse, validate and build them; checksums; CHS geometry;
timestamps.  All integers on disk are big-endian; sectors are 512 bytes.

Parsing is tolerant of what real files contain (see the project's format
notes): the 511-byte footer of very old files, the stale checksum of old
blktap files that set the "hidden" byte, locator ``data space`` written in
bytes instead of sectors, and a BAT with far more entries than the virtual
size needs.
"""
from __future__ import annotations

import datetime as _dt
import struct
import uuid as _uuid
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ChecksumError, FormatError

__all__ = [
    "SECTOR",
    "FOOTER_SIZE",
    "HEADER_SIZE",
    "DISK_FIXED",
    "DISK_DYNAMIC",
    "DISK_DIFFERENCING",
    "DISK_TYPE_NAMES",
    "BAT_UNUSED",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_VIRTUAL_SIZE",
    "VHD_MAX_SIZE",
    "MAX_BAT_SECTOR",
    "check_virtual_size",
    "check_block_offset",
    "Footer",
    "DynamicHeader",
    "ParentLocator",
    "checksum",
    "chs_geometry",
    "vhd_timestamp",
    "decode_bat",
    "encode_bat",
    "bitmap_size_for",
    "decode_locator_path",
    "encode_locator_path",
    "read_footer_fields",
    "read_header_fields",
]

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 * 1024 * 1024
#: a sane ceiling for virtual sizes when *reading* (VHD's own limit is about
#: 2 TiB; files claiming more are still described, never created)
MAX_VIRTUAL_SIZE = 64 * 1024**4
#: the largest virtual size vhdcore creates, grows to or writes as a VHD
#: (the VHD specification's limit: 2040 GiB)
VHD_MAX_SIZE = 2040 * 1024**3
#: the largest sector number a BAT entry can hold (32 bits; all ones means
#: "unused"): no block may start at or past byte offset (MAX_BAT_SECTOR+1)*512
MAX_BAT_SECTOR = 0xFFFFFFFE

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
FOOTER_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x2

#: the creator written into new files.  ``win `` tells readers (QEMU,
#: VirtualBox, Hyper-V) to take the virtual size from ``current_size`` rather
#: than from the CHS geometry, which is what vhdcore itself always does.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x000A0000
CREATOR_OS = b"Wi2k"

_EPOCH = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)

# footer: cookie features version data_offset timestamp creator_app creator_version
#         creator_os original_size current_size cyl heads spt disk_type checksum
#         unique_id saved_state hidden
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sBB")
# header: cookie data_offset table_offset header_version max_table_entries block_size
#         checksum parent_uuid parent_timestamp reserved
_HEADER = struct.Struct(">8sQQIIII16sII")
_LOCATOR = struct.Struct(">4sIIIQ")


def checksum(buf: bytes | bytearray | memoryview, field_offset: int) -> int:
    """One's complement of the byte sum of ``buf`` with the 4-byte checksum
    field at ``field_offset`` taken as zero."""
    a = np.frombuffer(buf, dtype=np.uint8)
    total = int(a.sum(dtype=np.uint64)) - int(a[field_offset : field_offset + 4].sum(dtype=np.uint64))
    return (~total) & 0xFFFFFFFF


def vhd_timestamp(when: _dt.datetime | None = None) -> int:
    """Seconds since 2000-01-01 00:00 UTC, as stored in footers and headers."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0, int((when - _EPOCH).total_seconds())) & 0xFFFFFFFF


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track for a disk of ``size`` bytes, by the
    algorithm of the VHD specification (appendix)."""
    total = size // SECTOR
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    cyl = cth // heads
    return min(cyl, 65535), heads, spt


def bitmap_size_for(block_size: int) -> int:
    """Bytes of a block's sector bitmap on disk (padded to whole sectors)."""
    nbytes = (block_size // SECTOR + 7) // 8
    return (nbytes + SECTOR - 1) // SECTOR * SECTOR


def check_virtual_size(size: int, what: str = "virtual size") -> None:
    """Refuse (``FormatError``) a virtual size a VHD cannot have: not a positive
    multiple of 512, or past :data:`VHD_MAX_SIZE` (2040 GiB)."""
    if size <= 0 or size % SECTOR:
        raise FormatError(f"{what} {size} must be a positive multiple of 512")
    if size > VHD_MAX_SIZE:
        raise FormatError(f"{what} {size} exceeds the VHD limit of 2040 GiB ({VHD_MAX_SIZE} "
                          f"bytes) by {size - VHD_MAX_SIZE} bytes")


def check_block_offset(offset: int, source: str = "") -> None:
    """Refuse (``FormatError``) a block at byte ``offset``: a BAT entry holds
    its sector number in 32 bits, so a block must start at or before sector
    :data:`MAX_BAT_SECTOR` (just under 2 TiB into the file)."""
    if offset % SECTOR or offset // SECTOR > MAX_BAT_SECTOR:
        raise FormatError(
            f"{source + ': ' if source else ''}a block at byte offset {offset} cannot be recorded "
            f"in the BAT (32-bit sector numbers reach sector {MAX_BAT_SECTOR}, byte offset "
            f"{MAX_BAT_SECTOR * SECTOR}): the file would pass the VHD format's 2 TiB limit")


def _where(source: str, offset: int) -> str:
    return f"{source} at offset {offset}" if source else f"offset {offset}"


@dataclass(frozen=True)
class Footer:
    """The 512-byte hard disk footer."""

    disk_type: int
    current_size: int
    original_size: int
    data_offset: int
    unique_id: bytes
    timestamp: int = 0
    features: int = FEATURES_RESERVED
    version: int = FOOTER_VERSION
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_os: bytes = CREATOR_OS
    geometry: tuple[int, int, int] = (0, 0, 0)
    checksum: int = 0
    saved_state: int = 0
    hidden: int = 0
    #: True when the stored checksum only matched with ``hidden`` taken as 0
    #: (old blktap files); a rebuilt footer gets a correct checksum.
    stale_hidden_checksum: bool = False
    #: True when the footer was found in 511 bytes (very old files)
    short: bool = False

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES.get(self.disk_type, f"unknown({self.disk_type})")

    @property
    def uuid(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.unique_id)

    @classmethod
    def parse(cls, buf: bytes | memoryview, *, source: str = "", offset: int = 0) -> "Footer":
        """Parse and validate a footer from 512 bytes (or 511 for old files)."""
        raw = bytes(buf)
        short = False
        if len(raw) == 511:
            raw += b"\0"
            short = True
        if len(raw) != FOOTER_SIZE:
            raise FormatError(f"{_where(source, offset)}: footer needs 512 bytes, got {len(raw)}")
        if raw[:8] != FOOTER_COOKIE:
            raise FormatError(
                f"{_where(source, offset)}: bad footer cookie {raw[:8]!r} (expected b'conectix')"
            )
        f = _FOOTER.unpack_from(raw)
        (_, features, version, data_offset, ts, app, app_ver, app_os, orig, cur,
         cyl, heads, spt, dtype, csum, uid, saved, hidden) = f
        stale = False
        calc = checksum(raw, 64)
        if calc != csum:
            # blktap set the hidden byte without updating the checksum
            alt = bytearray(raw)
            alt[85] = 0
            if hidden and checksum(alt, 64) == csum:
                stale = True
            else:
                raise ChecksumError(
                    f"{_where(source, offset)}: footer checksum is 0x{csum:08x}, "
                    f"contents give 0x{calc:08x}"
                )
        if dtype not in DISK_TYPE_NAMES:
            raise FormatError(f"{_where(source, offset)}: footer disk type {dtype} is not 2, 3 or 4")
        if version >> 16 != 1:
            raise FormatError(f"{_where(source, offset)}: footer version 0x{version:08x} is not 1.x")
        if cur > MAX_VIRTUAL_SIZE:
            raise FormatError(
                f"{_where(source, offset)}: footer current size {cur} exceeds the "
                f"supported maximum {MAX_VIRTUAL_SIZE}"
            )
        if dtype == DISK_FIXED:
            if data_offset != FIXED_DATA_OFFSET:
                # tolerated by every reader; fixed disks have no header
                pass
        elif data_offset == FIXED_DATA_OFFSET or data_offset % SECTOR:
            raise FormatError(
                f"{_where(source, offset)}: footer data offset 0x{data_offset:x} of a "
                f"{DISK_TYPE_NAMES[dtype]} disk is not a sector offset"
            )
        return cls(
            disk_type=dtype, current_size=cur, original_size=orig, data_offset=data_offset,
            unique_id=uid, timestamp=ts, features=features, version=version,
            creator_app=app, creator_version=app_ver, creator_os=app_os,
            geometry=(cyl, heads, spt), checksum=csum, saved_state=saved, hidden=hidden,
            stale_hidden_checksum=stale, short=short,
        )

    def pack(self) -> bytes:
        """The 512 bytes of this footer with a freshly computed checksum."""
        cyl, heads, spt = self.geometry
        buf = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(
            buf, 0, FOOTER_COOKIE, self.features, self.version, self.data_offset, self.timestamp,
            self.creator_app, self.creator_version, self.creator_os, self.original_size,
            self.current_size, cyl, heads, spt, self.disk_type, 0, self.unique_id,
            self.saved_state, self.hidden,
        )
        struct.pack_into(">I", buf, 64, checksum(buf, 64))
        return bytes(buf)

    @classmethod
    def new(cls, disk_type: int, size: int, *, data_offset: int | None = None,
            unique_id: bytes | None = None) -> "Footer":
        if data_offset is None:
            data_offset = FIXED_DATA_OFFSET if disk_type == DISK_FIXED else FOOTER_SIZE
        return cls(
            disk_type=disk_type, current_size=size, original_size=size, data_offset=data_offset,
            unique_id=unique_id or _uuid.uuid4().bytes, timestamp=vhd_timestamp(),
            geometry=chs_geometry(size),
        )

    def with_(self, **changes: object) -> "Footer":
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ParentLocator:
    """One of the eight parent locator entries of a dynamic header."""

    code: bytes
    data_space: int
    data_length: int
    data_offset: int
    reserved: int = 0

    @property
    def space_bytes(self) -> int:
        """``data space`` in bytes: the spec says sectors, blktap writes bytes.
        A value below 512 is taken as sectors, anything else as bytes."""
        return self.data_space * SECTOR if self.data_space < SECTOR else self.data_space

    @property
    def used(self) -> bool:
        return self.code not in (b"\0\0\0\0", b"") and self.data_length > 0


@dataclass(frozen=True)
class DynamicHeader:
    """The 1024-byte dynamic disk header (cookie ``cxsparse``)."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes = b"\0" * 16
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[ParentLocator, ...] = field(default_factory=tuple)
    data_offset: int = FIXED_DATA_OFFSET
    version: int = HEADER_VERSION
    checksum: int = 0

    @property
    def parent_uuid_obj(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.parent_uuid)

    @classmethod
    def parse(cls, buf: bytes | memoryview, *, source: str = "", offset: int = 0) -> "DynamicHeader":
        raw = bytes(buf)
        if len(raw) != HEADER_SIZE:
            raise FormatError(
                f"{_where(source, offset)}: dynamic header needs 1024 bytes, got {len(raw)} "
                "(file truncated?)"
            )
        if raw[:8] != HEADER_COOKIE:
            raise FormatError(
                f"{_where(source, offset)}: bad dynamic header cookie {raw[:8]!r} "
                "(expected b'cxsparse')"
            )
        (_, data_off, table_off, version, max_entries, block_size, csum, puuid, pts,
         _res) = _HEADER.unpack_from(raw)
        calc = checksum(raw, 36)
        if calc != csum:
            raise ChecksumError(
                f"{_where(source, offset)}: dynamic header checksum is 0x{csum:08x}, "
                f"contents give 0x{calc:08x}"
            )
        if version >> 16 != 1:
            raise FormatError(
                f"{_where(source, offset)}: dynamic header version 0x{version:08x} is not 1.x"
            )
        if (block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
                or block_size & (block_size - 1)):
            raise FormatError(
                f"{_where(source, offset)}: block size {block_size} is not a power of two "
                f"between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            )
        if table_off % SECTOR:
            raise FormatError(
                f"{_where(source, offset)}: BAT offset 0x{table_off:x} is not sector aligned"
            )
        name_raw = raw[64:576]
        locs = []
        for i in range(8):
            code, space, length, res, doff = _LOCATOR.unpack_from(raw, 576 + 24 * i)
            locs.append(ParentLocator(code, space, length, doff, res))
        return cls(
            table_offset=table_off, max_table_entries=max_entries, block_size=block_size,
            parent_uuid=puuid, parent_timestamp=pts, parent_name=_decode_utf16(name_raw, "be"),
            locators=tuple(locs), data_offset=data_off, version=version, checksum=csum,
        )

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            buf, 0, HEADER_COOKIE, self.data_offset, self.table_offset, self.version,
            self.max_table_entries, self.block_size, 0, self.parent_uuid,
            self.parent_timestamp, 0,
        )
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 512:
            raise FormatError(f"parent name {self.parent_name!r} is longer than 256 UTF-16 units")
        buf[64 : 64 + len(name)] = name
        locs = list(self.locators)[:8]
        for i, loc in enumerate(locs):
            _LOCATOR.pack_into(
                buf, 576 + 24 * i, loc.code.ljust(4, b"\0"), loc.data_space, loc.data_length,
                loc.reserved, loc.data_offset,
            )
        struct.pack_into(">I", buf, 36, checksum(buf, 36))
        return bytes(buf)

    def with_(self, **changes: object) -> "DynamicHeader":
        return replace(self, **changes)  # type: ignore[arg-type]


def _decode_utf16(raw: bytes, order: str) -> str:
    # stop at the first NUL code unit
    n = len(raw) - len(raw) % 2
    for i in range(0, n, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            n = i
            break
    return raw[:n].decode("utf-16-be" if order == "be" else "utf-16-le", errors="replace")


def decode_locator_path(code: bytes, data: bytes) -> str:
    """The path stored in a parent locator's data, as a string.

    ``W2ru``/``W2ku`` hold UTF-16LE Windows paths; ``MacX`` holds a UTF-8
    ``file://`` URL.  Other codes give ``""``.
    """
    from urllib.parse import unquote

    if code in (b"W2ru", b"W2ku"):
        return _decode_utf16(data, "le")
    if code == b"MacX":
        s = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        if s.startswith("file://"):
            s = s[len("file://"):]
        return unquote(s)
    return ""


def encode_locator_path(code: bytes, path: str) -> bytes:
    """Encode a path for a parent locator (no terminator).

    ``W2ku`` holds an absolute path (the specification's "absolute" locator:
    a drive path such as ``C:\\VMs\\base.vhd``, or an absolute POSIX path
    written with backslashes); ``W2ru`` a path relative to the child's
    directory (``.\\base.vhd``); ``MacX`` a ``file://`` URL of either."""
    if code in (b"W2ru", b"W2ku"):
        win = path.replace("/", "\\")
        absolute = win.startswith("\\") or win[1:3] == ":\\"
        if code == b"W2ku" and not absolute:
            raise FormatError(f"a W2ku parent locator holds an absolute path, not {path!r}")
        if code == b"W2ru" and absolute:
            raise FormatError(f"a W2ru parent locator holds a relative path, not {path!r}")
        if not (absolute or win.startswith(".\\") or win.startswith("..\\")):
            win = ".\\" + win
        return win.encode("utf-16-le")
    if code == b"MacX":
        from urllib.parse import quote

        p = path if path.startswith(("./", "../", "/")) else "./" + path
        return ("file://" + quote(p)).encode("utf-8")
    raise FormatError(f"unknown parent locator code {code!r}")


def decode_bat(raw: bytes | memoryview, entries: int) -> np.ndarray:
    """Decode ``entries`` big-endian u32 BAT entries into native uint32."""
    if len(raw) < entries * 4:
        raise FormatError(f"BAT needs {entries * 4} bytes, only {len(raw)} available")
    return np.frombuffer(raw, dtype=">u4", count=entries).astype(np.uint32)


def encode_bat(bat: np.ndarray) -> bytes:
    """Big-endian bytes of a native BAT, padded to whole sectors with unused entries."""
    nbytes = (bat.size * 4 + SECTOR - 1) // SECTOR * SECTOR
    out = np.full(nbytes // 4, BAT_UNUSED, dtype=">u4")
    out[: bat.size] = bat
    return out.tobytes()


def read_footer_fields(raw: bytes) -> dict[str, object]:
    """Every field of 512 footer bytes, without validating anything (for
    ``vhdcore info`` on a damaged file), with the checksum stored and the one
    the contents give."""
    raw = bytes(raw).ljust(FOOTER_SIZE, b"\0")[:FOOTER_SIZE]
    (cookie, features, version, data_offset, ts, app, app_ver, app_os, orig, cur,
     cyl, heads, spt, dtype, csum, uid, saved, hidden) = _FOOTER.unpack_from(raw)
    calc = checksum(raw, 64)
    return {
        "cookie": cookie.decode("latin-1"),
        "cookie_ok": cookie == FOOTER_COOKIE,
        "features": f"0x{features:08x}",
        "version": f"0x{version:08x}",
        "data_offset": data_offset,
        "timestamp": ts,
        "creator_app": app.decode("latin-1").rstrip("\0 "),
        "creator_version": f"0x{app_ver:08x}",
        "creator_os": app_os.decode("latin-1").rstrip("\0"),
        "original_size": orig,
        "virtual_size": cur,
        "geometry": [cyl, heads, spt],
        "type": DISK_TYPE_NAMES.get(dtype, f"unknown({dtype})"),
        "uuid": str(_uuid.UUID(bytes=uid)),
        "saved_state": saved,
        "hidden": hidden,
        "checksum_stored": f"0x{csum:08x}",
        "checksum_computed": f"0x{calc:08x}",
        "checksum_ok": calc == csum,
    }


def read_header_fields(raw: bytes) -> dict[str, object]:
    """Every field of 1024 dynamic header bytes, without validating anything,
    with the checksum stored and the one the contents give."""
    raw = bytes(raw).ljust(HEADER_SIZE, b"\0")[:HEADER_SIZE]
    (cookie, data_off, table_off, version, max_entries, block_size, csum, puuid, pts,
     _res) = _HEADER.unpack_from(raw)
    calc = checksum(raw, 36)
    locs = []
    for i in range(8):
        code, space, length, _r, doff = _LOCATOR.unpack_from(raw, 576 + 24 * i)
        if code != b"\0\0\0\0" or length:
            locs.append({"code": code.decode("latin-1"), "data_space": space,
                         "data_length": length, "data_offset": doff})
    return {
        "cookie": cookie.decode("latin-1"),
        "cookie_ok": cookie == HEADER_COOKIE,
        "bat_offset": table_off,
        "version": f"0x{version:08x}",
        "max_table_entries": max_entries,
        "block_size": block_size,
        "parent_uuid": str(_uuid.UUID(bytes=puuid)),
        "parent_timestamp": pts,
        "parent_name": _decode_utf16(raw[64:576], "be"),
        "parent_locator_entries": locs,
        "checksum_stored": f"0x{csum:08x}",
        "checksum_computed": f"0x{calc:08x}",
        "checksum_ok": calc == csum,
    }
