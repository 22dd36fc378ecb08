"""NTFS: free clusters from ``$Bitmap`` (MFT record 6).

Trusted only when ``$Volume`` is not dirty and ``$LogFile`` records a clean
shutdown (or is empty), the records' update-sequence fixups check out, and
the clusters of the system files the parser touched are marked used.
"""
from __future__ import annotations

import struct

import numpy as np

from . import _ranges as R
from .common import FsResult, FsUnsafe, PartReader, Probe, u16, u32, u64

__all__ = ["probe"]

AT_VOLUME_INFORMATION = 0x70
AT_DATA = 0x80
AT_ATTRIBUTE_LIST = 0x20
AT_END = 0xFFFFFFFF
VOLUME_IS_DIRTY = 0x0001
RESTART_VOLUME_IS_CLEAN = 0x0002
LOGFILE_NO_CLIENT = 0xFFFF
BITMAP_CHUNK = 4 * 1024 * 1024


def probe(part: PartReader) -> Probe | None:
    if part.length < 8192:
        return None
    bs = part.read(0, 512)
    if bs[3:11] != b"NTFS    " or bs[510:512] != b"\x55\xaa":
        return None
    return Probe("ntfs", f"{u64(bs, 0x48):016X}", _analyze)


def _fixup(buf: bytes, magic: bytes, what: str) -> bytes:
    if buf[0:4] != magic:
        raise FsUnsafe(f"{what}: {magic.decode()} magic missing")
    usa_ofs, usa_count = u16(buf, 4), u16(buf, 6)
    if usa_count < 2 or (usa_count - 1) * 512 != len(buf) or usa_ofs + 2 * usa_count > 512:
        raise FsUnsafe(f"{what}: update sequence array does not fit the record")
    b = bytearray(buf)
    usn = b[usa_ofs : usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * 512
        if b[end - 2 : end] != usn:
            raise FsUnsafe(f"{what}: torn write (update sequence mismatch in sector {i - 1})")
        b[end - 2 : end] = b[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]
    return bytes(b)


def _runlist(mp: bytes, off: int, lowest_vcn: int) -> list[tuple[int, int, int | None]]:
    """Decode mapping pairs into (vcn, clusters, lcn or None for sparse)."""
    runs: list[tuple[int, int, int | None]] = []
    vcn, lcn = lowest_vcn, 0
    while off < len(mp):
        head = mp[off]
        if head == 0:
            return runs
        ln, lo = head & 0xF, head >> 4
        if ln == 0 or ln > 8 or lo > 8 or off + 1 + ln + lo > len(mp):
            raise FsUnsafe("runlist is malformed")
        count = int.from_bytes(mp[off + 1 : off + 1 + ln], "little", signed=True)
        if count <= 0:
            raise FsUnsafe("runlist has a non-positive run length")
        if lo:
            lcn += int.from_bytes(mp[off + 1 + ln : off + 1 + ln + lo], "little", signed=True)
            if lcn < 0:
                raise FsUnsafe("runlist points before the volume")
            runs.append((vcn, count, lcn))
        else:
            runs.append((vcn, count, None))
        vcn += count
        off += 1 + ln + lo
    raise FsUnsafe("runlist has no terminator")


class _Attr:
    def __init__(self, rec: bytes, off: int) -> None:
        self.type, self.length = struct.unpack_from("<II", rec, off)
        self.nonres = rec[off + 8]
        nlen, noff = rec[off + 9], u16(rec, off + 10)
        self.flags = u16(rec, off + 12)
        self.runs: list[tuple[int, int, int | None]]
        self.name = rec[off + noff : off + noff + 2 * nlen].decode("utf-16-le", "replace")
        if self.nonres:
            self.lowest_vcn, self.highest_vcn = struct.unpack_from("<QQ", rec, off + 0x10)
            mp_off = u16(rec, off + 0x20)
            self.alloc, self.data_size, self.init_size = struct.unpack_from("<QQQ", rec, off + 0x28)
            self.runs = _runlist(rec[off : off + self.length], mp_off, self.lowest_vcn)
            self.value = b""
        else:
            vlen, voff = u32(rec, off + 0x10), u16(rec, off + 0x14)
            if voff + vlen > self.length:
                raise FsUnsafe("resident attribute value overruns its attribute")
            self.value = rec[off + voff : off + voff + vlen]
            self.runs = []
            self.data_size = self.init_size = vlen


class _Ntfs:
    def __init__(self, part: PartReader) -> None:
        self.part = part
        bs = part.read(0, 512)
        self.bps = u16(bs, 0x0B)
        spc = bs[0x0D]
        if self.bps not in (512, 1024, 2048, 4096):
            raise FsUnsafe(f"bytes per sector {self.bps} is invalid")
        spc = 1 << (256 - spc) if spc > 0x80 else spc
        if spc == 0 or spc & (spc - 1) or spc > 4096:
            raise FsUnsafe(f"sectors per cluster {spc} is invalid")
        self.cs = self.bps * spc
        self.total_sectors = u64(bs, 0x28)
        self.mft_lcn, self.mftmirr_lcn = u64(bs, 0x30), u64(bs, 0x38)
        cpr = struct.unpack_from("<b", bs, 0x40)[0]
        self.rec_size = cpr * self.cs if cpr > 0 else (1 << -cpr if cpr < 0 else 0)
        if self.rec_size < 512 or self.rec_size > 65536 or self.rec_size & (self.rec_size - 1):
            raise FsUnsafe(f"MFT record size {self.rec_size} is invalid")
        vol_bytes = self.total_sectors * self.bps
        if vol_bytes == 0 or vol_bytes > part.length:
            raise FsUnsafe(
                f"filesystem claims {vol_bytes} bytes but its partition holds {part.length}"
            )
        self.nclusters = vol_bytes // self.cs
        if self.mft_lcn >= self.nclusters or self.mftmirr_lcn >= self.nclusters:
            raise FsUnsafe("$MFT or $MFTMirr location lies past the volume")
        self.mft_runs: list[tuple[int, int, int | None]] = []

    def read_runs(self, runs: list[tuple[int, int, int | None]], off: int, n: int, what: str) -> bytes:
        out = bytearray()
        cs = self.cs
        while n > 0:
            vcn = off // cs
            for rv, rc, rl in runs:
                if rv <= vcn < rv + rc:
                    break
            else:
                raise FsUnsafe(f"{what}: byte {off} is not mapped")
            if rl is None:
                raise FsUnsafe(f"{what}: sparse run where data is needed")
            if rl + rc > self.nclusters:
                raise FsUnsafe(f"{what}: run at cluster {rl} runs past the volume")
            run_end = (rv + rc) * cs
            take = min(n, run_end - off)
            out += self.part.read((rl + vcn - rv) * cs + off % cs, take)
            off += take
            n -= take
        return bytes(out)

    def record(self, n: int) -> bytes:
        if n == 0 or not self.mft_runs:
            raw = self.part.read(self.mft_lcn * self.cs + n * self.rec_size, self.rec_size)
        else:
            raw = self.read_runs(self.mft_runs, n * self.rec_size, self.rec_size, "$MFT")
        rec = _fixup(raw, b"FILE", f"MFT record {n}")
        flags = u16(rec, 0x16)
        if not flags & 1:
            raise FsUnsafe(f"MFT record {n} is not in use")
        if u64(rec, 0x20) != 0:
            raise FsUnsafe(f"MFT record {n} is an extension record")
        return rec

    def attrs(self, rec: bytes, n: int) -> list[_Attr]:
        off = u16(rec, 0x14)
        used = min(u32(rec, 0x18), len(rec))
        out: list[_Attr] = []
        while off + 8 <= used:
            t = u32(rec, off)
            if t == AT_END:
                return out
            ln = u32(rec, off + 4)
            if ln < 16 or off + ln > used or ln % 8:
                raise FsUnsafe(f"MFT record {n}: attribute at {off} is malformed")
            out.append(_Attr(rec, off))
            off += ln
        raise FsUnsafe(f"MFT record {n}: attribute list has no end marker")

    def data_attr(self, n: int) -> _Attr:
        attrs = self.attrs(self.record(n), n)
        if any(a.type == AT_ATTRIBUTE_LIST for a in attrs):
            raise FsUnsafe(f"MFT record {n} uses an attribute list (not supported)")
        data = [a for a in attrs if a.type == AT_DATA and a.name == ""]
        if len(data) != 1:
            raise FsUnsafe(f"MFT record {n} has no single unnamed $DATA")
        a = data[0]
        if a.flags & 0x8001:  # compressed / sparse
            raise FsUnsafe(f"MFT record {n}: $DATA is compressed or sparse")
        if a.nonres and a.lowest_vcn != 0:
            raise FsUnsafe(f"MFT record {n}: $DATA does not start at VCN 0")
        return a

    def volume_dirty(self) -> int:
        for a in self.attrs(self.record(3), 3):
            if a.type == AT_VOLUME_INFORMATION and not a.nonres and len(a.value) >= 12:
                return u16(a.value, 10)
        raise FsUnsafe("$Volume has no $VOLUME_INFORMATION")

    def logfile_clean(self) -> str:
        a = self.data_attr(2)
        if not a.nonres:
            raise FsUnsafe("$LogFile is resident")
        head = self.read_runs(a.runs, 0, 4096, "$LogFile")
        if head == b"\xff" * 4096:
            return "empty"
        first = self.read_runs(a.runs, 0, 512, "$LogFile")
        psize = u32(first, 0x10)
        if psize < 512 or psize > 65536 or psize & (psize - 1) or 2 * psize > a.data_size:
            raise FsUnsafe("$LogFile restart page size is invalid")
        pages = []
        for off in (0, psize):
            raw = self.read_runs(a.runs, off, psize, "$LogFile")
            if raw[0:4] == b"CHKD":
                raise FsUnsafe("$LogFile restart page is marked CHKD (chkdsk pending)")
            pages.append((psize, _fixup(raw, b"RSTR", "$LogFile restart page")))
        for _psize, rp in pages:
            ra_off = u16(rp, 0x18)
            if ra_off + 0x30 > len(rp):
                raise FsUnsafe("$LogFile restart area lies outside its page")
            in_use = u16(rp, ra_off + 0xC)
            flags = u16(rp, ra_off + 0xE)
            if in_use != LOGFILE_NO_CLIENT and not flags & RESTART_VOLUME_IS_CLEAN:
                raise FsUnsafe("$LogFile does not record a clean shutdown")
        return "clean"


def _analyze(part: PartReader, probe_: Probe, journal_overlay: bool = True) -> FsResult:
    v = _Ntfs(part)
    res = FsResult(fs="ntfs", uuid=probe_.uuid, state="clean")
    mft = v.data_attr(0)
    if not mft.nonres or not mft.runs or mft.runs[0][2] != v.mft_lcn:
        raise FsUnsafe("$MFT's own $DATA does not start at the boot sector's MFT cluster")
    v.mft_runs = mft.runs
    vflags = v.volume_dirty()
    if vflags & VOLUME_IS_DIRTY:
        raise FsUnsafe("NTFS volume is marked dirty")
    log_state = v.logfile_clean()
    if log_state == "empty":
        res.warnings.append("$LogFile is empty (fresh or reset volume)")
    bm = v.data_attr(6)
    need = -(-v.nclusters // 8)
    if bm.data_size < need or bm.init_size < need:
        raise FsUnsafe(f"$Bitmap holds {bm.init_size} bytes, {need} are needed")
    parts_s, parts_e = [], []
    for off in range(0, need, BITMAP_CHUNK):
        n = min(BITMAP_CHUNK, need - off)
        if bm.nonres:
            chunk = v.read_runs(bm.runs, off, n, "$Bitmap")
        else:
            chunk = bm.value[off : off + n]
        nbits = min(n * 8, v.nclusters - off * 8)
        s, e = R.zero_bit_runs(np.frombuffer(chunk, dtype=np.uint8), nbits, base=off * 8)
        parts_s.append(s)
        parts_e.append(e)
    free = R.normalize(np.concatenate(parts_s), np.concatenate(parts_e))
    # the system files we read must be marked used, or the bitmap is not to be trusted
    must = [(0, 1), (v.mftmirr_lcn, 1)]
    must += [(lcn, c) for _vcn, c, lcn in mft.runs if lcn is not None]
    must += [(lcn, c) for _vcn, c, lcn in bm.runs if lcn is not None]
    must += [(lcn, c) for _vcn, c, lcn in v.data_attr(2).runs if lcn is not None]
    ms = np.array([m[0] for m in must], dtype=np.int64)
    me = ms + np.array([m[1] for m in must], dtype=np.int64)
    if R.overlaps_any(free, (ms, me)):
        raise FsUnsafe("$Bitmap marks clusters of system files ($MFT, $Bitmap, $LogFile) free")
    res.free = R.scale(free, v.cs)
    res.fs_free_bytes = R.total(free) * v.cs
    return res
