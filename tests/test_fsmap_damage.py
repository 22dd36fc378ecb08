"""Damaged metadata and bad input: the filesystem is kept whole, nothing crashes.

"Kept whole" means no byte of that filesystem is called free, so no block a
consistent reading calls used can be dropped.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from _fsimages import (
    MiB,
    debugfs,
    ext_rm,
    fill_random,
    make_ext,
    make_ntfs,
    make_xfs,
    map_file,
    need,
    place,
    random_files,
    run,
)

from vhdcore.errors import VhdError
from vhdcore.fsmap import map_disk

pytestmark = pytest.mark.tools

EXT4 = ["-t", "ext4", "-b", "4096", "-g", "4096"]
EXT2 = ["-t", "ext2", "-b", "4096", "-g", "4096"]


def poke(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(img: Path, offset: int, n: int) -> bytes:
    with open(img, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def ext_img(tmp_path):
    def make(args):
        need("mke2fs", "debugfs")
        src = tmp_path / "src"
        shas = random_files(src, 12, 64 * 1024, 1024 * 1024, 31)
        img = tmp_path / "e.img"
        make_ext(img, 64 * MiB, args, src)
        ext_rm(img, sorted(shas)[::2])
        dmap = map_file(img)
        assert dmap.partitions[0].state == "clean" and dmap.free_bytes > 0
        return img

    return make


def kept_whole(img: Path, *reason_words: str, **kw):
    dmap = map_file(img, **kw)
    (p,) = dmap.partitions
    assert p.state == "kept-whole", p
    assert dmap.free == [] and p.free_bytes == 0 and p.used_bytes == p.length
    for w in reason_words:
        assert w in p.reason, p.reason
    assert any(p.reason in w for w in dmap.warnings)
    return p


def bitmap_block(img: Path, group: int) -> int:
    txt = run("dumpe2fs", img).stdout
    groups = re.split(r"^Group \d+:", txt, flags=re.MULTILINE)[1:]
    return int(re.search(r"Block bitmap at (\d+)", groups[group]).group(1))


# -- ext -------------------------------------------------------------------------
def test_ext_bitmap_checksum_mismatch(ext_img):
    img = ext_img(EXT4)
    b = bitmap_block(img, 0)
    byte = peek(img, b * 4096 + 100, 1)[0]
    poke(img, b * 4096 + 100, bytes([byte ^ 0x01]))
    kept_whole(img, "bitmap checksum")


def test_ext_descriptor_checksum_mismatch(ext_img):
    img = ext_img(EXT4)
    off = 4096 + 3 * 64 + 0x0C  # group 3 free block count
    poke(img, off, bytes([peek(img, off, 1)[0] ^ 0x10]))
    kept_whole(img, "descriptor checksum")


def test_ext_superblock_checksum_mismatch(ext_img):
    img = ext_img(EXT4)
    poke(img, 1024 + 0x78, b"tampered")  # volume name, covered by the checksum
    kept_whole(img, "superblock checksum")


def test_ext_bitmap_disagreeing_with_descriptor(ext_img):
    """No checksums (ext2): a bitmap that frees used blocks is caught by the popcount check."""
    img = ext_img(EXT2)
    b = bitmap_block(img, 0)
    poke(img, b * 4096, bytes(64))  # the first 512 blocks (superblock, tables...) "free"
    kept_whole(img, "descriptor says")


def test_ext_descriptor_free_count_wrong(ext_img):
    img = ext_img(EXT2)
    off = 4096 + 0x0C
    n = struct.unpack("<H", peek(img, off, 2))[0]
    poke(img, off, struct.pack("<H", n + 1))
    kept_whole(img, "descriptor says")


def test_ext_errors_state(ext_img):
    img = ext_img(EXT2)
    poke(img, 1024 + 0x3A, struct.pack("<H", 3))
    kept_whole(img, "records errors")


def test_ext_not_cleanly_unmounted_without_journal(ext_img):
    img = ext_img(EXT2)
    poke(img, 1024 + 0x3A, struct.pack("<H", 0))
    kept_whole(img, "not cleanly unmounted")


def test_ext_unknown_incompat_feature(ext_img):
    img = ext_img(EXT2)
    inc = struct.unpack("<I", peek(img, 1024 + 0x60, 4))[0]
    poke(img, 1024 + 0x60, struct.pack("<I", inc | 0x40000000))
    kept_whole(img, "unknown incompatible")


def test_ext_needs_recovery_without_journal(ext_img):
    img = ext_img(EXT2)
    inc = struct.unpack("<I", peek(img, 1024 + 0x60, 4))[0]
    poke(img, 1024 + 0x60, struct.pack("<I", inc | 0x4))
    kept_whole(img, "no journal")


def test_ext_filesystem_larger_than_its_partition(ext_img):
    img = ext_img(EXT4)
    size = img.stat().st_size - MiB
    with open(img, "rb") as f:

        def rd(o, n):
            f.seek(o)
            return f.read(n)

        dmap = map_disk(rd, size)
    (p,) = dmap.partitions
    assert p.state == "kept-whole" and "claims" in p.reason and dmap.free == []


def test_ext_journal_with_transactions_but_no_recovery_flag(ext_img):
    img = ext_img(EXT2 + ["-j"])
    (tmp := img.parent / "x.bin").write_bytes(bytes(4096))
    debugfs(img, "jo", f"jw -b 5000 {tmp}", "jc", write=True)
    inc = struct.unpack("<I", peek(img, 1024 + 0x60, 4))[0]
    poke(img, 1024 + 0x60, struct.pack("<I", inc & ~0x4))
    kept_whole(img, "needs_recovery is clear")


def _journal_block(img: Path, n: int) -> int:
    return int(run("debugfs", "-R", f"bmap <8> {n}", img).stdout.split()[0])


@pytest.mark.parametrize("which", [1, 2, 3], ids=["descriptor", "data", "commit"])
def test_ext_journal_checksum_mismatch(ext_img, which):
    img = ext_img(EXT4)
    (tmp := img.parent / "x.bin").write_bytes(b"\x55" * 4096)
    debugfs(img, "jo -c -v 3", f"jw -b 5000 {tmp}", "jc", write=True)
    assert map_file(img).partitions[0].state == "journal-applied"
    blk = _journal_block(img, which)  # 1 descriptor, 2 data, 3 commit
    off = blk * 4096 + 2000
    poke(img, off, bytes([peek(img, off, 1)[0] ^ 0xFF]))
    kept_whole(img, "checksum mismatch")


def test_ext_journal_tag_past_the_filesystem(ext_img):
    img = ext_img(EXT4)
    (tmp := img.parent / "x.bin").write_bytes(bytes(4096))
    debugfs(img, "jo", f"jw -b 5000 {tmp}", "jc", write=True)
    desc = _journal_block(img, 1) * 4096
    # first tag: 64bit journal, tag = blocknr(4) csum(2) flags(2) blocknr_high(4)
    poke(img, desc + 12, struct.pack(">I", 0x7FFFFFF0))
    kept_whole(img, "past the filesystem")


def test_ext_unreadable_journal_superblock(ext_img):
    img = ext_img(EXT4)
    (tmp := img.parent / "x.bin").write_bytes(bytes(4096))
    debugfs(img, "jo", f"jw -b 5000 {tmp}", "jc", write=True)
    poke(img, _journal_block(img, 0) * 4096, b"\0\0\0\0")
    kept_whole(img, "jbd2 magic")


def test_ext_fuzzed_metadata_never_crashes(ext_img):
    img = ext_img(EXT4)
    pristine = img.read_bytes()
    good = map_file(img)
    rng = np.random.default_rng(5)
    meta_end = 64 * 4096
    for _ in range(60):
        buf = bytearray(pristine)
        for off in rng.integers(1024, meta_end, size=int(rng.integers(1, 6))):
            buf[int(off)] ^= int(rng.integers(1, 256))
        img.write_bytes(bytes(buf))
        dmap = map_file(img)  # must not raise
        (p,) = dmap.partitions
        assert p.state in ("clean", "kept-whole", "journal-applied")
        for s, n in dmap.free:
            assert s % 512 == 0 and n % 512 == 0 and s + n <= dmap.size
        if p.state == "clean":
            # metadata_csum covers everything the map reads: if it still parses, it
            # parsed the same thing (fuzzing inode tables or data changes nothing)
            assert dmap.free == good.free


# -- XFS -------------------------------------------------------------------------
@pytest.fixture
def xfs_img(tmp_path):
    def make(crc="1"):
        need("mkfs.xfs", "xfs_db")
        src = tmp_path / "src"
        shas = random_files(src, 8, 64 * 1024, 1024 * 1024, 41)
        img = tmp_path / "x.img"
        make_xfs(img, 64 * MiB, src, sorted(shas), ["-m", f"crc={crc}"])
        assert map_file(img).partitions[0].state == "clean"
        return img

    return make


def _xfs_geo(img):
    sb = peek(img, 0, 512)
    bs, agblocks = struct.unpack_from(">I", sb, 4)[0], struct.unpack_from(">I", sb, 84)[0]
    return bs, agblocks, struct.unpack_from(">H", sb, 102)[0]


def test_xfs_agf_crc_mismatch(xfs_img):
    img = xfs_img("1")
    bs, agblocks, ss = _xfs_geo(img)
    off = agblocks * bs + ss + 52  # AG 1 AGF freeblks
    poke(img, off, struct.pack(">I", struct.unpack(">I", peek(img, off, 4))[0] + 1))
    kept_whole(img, "AGF CRC")


def test_xfs_v4_agf_count_disagrees(xfs_img):
    img = xfs_img("0")
    bs, agblocks, ss = _xfs_geo(img)
    off = agblocks * bs + ss + 52
    poke(img, off, struct.pack(">I", struct.unpack(">I", peek(img, off, 4))[0] + 1))
    kept_whole(img, "AGF says")


def test_xfs_v4_sb_fdblocks_disagrees(xfs_img):
    img = xfs_img("0")
    n = struct.unpack(">Q", peek(img, 144, 8))[0]
    poke(img, 144, struct.pack(">Q", n + 1))
    kept_whole(img, "superblock says")


def test_xfs_v4_realtime(xfs_img):
    img = xfs_img("0")
    poke(img, 24, struct.pack(">Q", 100))
    kept_whole(img, "realtime")


def test_xfs_dirty_log(xfs_img):
    img = xfs_img("1")
    bs, agblocks, _ss = _xfs_geo(img)
    sb = peek(img, 0, 512)
    logstart, agblklog = struct.unpack_from(">Q", sb, 48)[0], sb[124]
    log = ((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * bs
    assert struct.unpack(">I", peek(img, log, 4))[0] == 0xFEEDBABE
    flags = peek(img, log + 512 + 9, 1)[0]
    assert flags & 0x20  # the unmount record mkfs wrote
    poke(img, log + 512 + 9, bytes([flags & ~0x20]))
    kept_whole(img, "dirty")


# -- NTFS ------------------------------------------------------------------------
@pytest.fixture
def ntfs_img(tmp_path):
    need("mkntfs", "ntfscp")
    src = tmp_path / "src"
    shas = random_files(src, 3, 64 * 1024, 512 * 1024, 51)
    img = tmp_path / "n.img"
    make_ntfs(img, 32 * MiB, src, sorted(shas), seed=52)
    assert map_file(img).partitions[0].state == "clean"
    return img


def _mft_record(img: Path, n: int) -> int:
    bs = peek(img, 0, 512)
    cs = struct.unpack_from("<H", bs, 11)[0] * bs[13]
    mft = struct.unpack_from("<Q", bs, 0x30)[0]
    return mft * cs + n * 1024


def test_ntfs_dirty_volume(ntfs_img):
    rec = _mft_record(ntfs_img, 3)
    raw = peek(ntfs_img, rec, 1024)
    off = struct.unpack_from("<H", raw, 0x14)[0]
    while struct.unpack_from("<I", raw, off)[0] != 0x70:
        off += struct.unpack_from("<I", raw, off + 4)[0]
    flags_at = off + struct.unpack_from("<H", raw, off + 0x14)[0] + 10
    assert flags_at % 512 < 510
    poke(ntfs_img, rec + flags_at, b"\x01\x00")
    kept_whole(ntfs_img, "dirty")


def test_ntfs_torn_mft_record(ntfs_img):
    rec = _mft_record(ntfs_img, 6)
    poke(ntfs_img, rec + 510, b"\x00\x00")
    kept_whole(ntfs_img, "update sequence")


def test_ntfs_bitmap_frees_system_file(ntfs_img):
    need("ntfsinfo")
    txt = run("ntfsinfo", "-v", "-i", "6", ntfs_img).stdout
    m = re.search(r"Runlist:.*\n\s+0x0\s+0x([0-9a-fA-F]+)\s+0x", txt)
    assert m, txt
    lcn = int(m.group(1), 16)
    cs = 4096
    assert peek(ntfs_img, lcn * cs, 1)[0] & 1  # cluster 0 (the boot sector) is used
    poke(ntfs_img, lcn * cs, b"\x00")  # clusters 0..7 "free"
    kept_whole(ntfs_img, "system files")


# -- partition tables and bad input -------------------------------------------------
def _mbr(entries, ext_entries=None) -> bytes:
    sec = bytearray(512)
    for i, (ptype, first, count) in enumerate(entries):
        o = 0x1BE + 16 * i
        sec[o + 4] = ptype
        struct.pack_into("<II", sec, o + 8, first, count)
    sec[510:512] = b"\x55\xaa"
    return bytes(sec)


def _ext_fs(tmp_path, size):
    need("mke2fs")
    src = tmp_path / "src"
    random_files(src, 4, 64 * 1024, 256 * 1024, 61)
    fs = tmp_path / "fs.img"
    make_ext(fs, size, ["-t", "ext4", "-b", "1024"], src)
    return fs


def test_overlapping_partitions_are_kept_whole(tmp_path):
    fs = _ext_fs(tmp_path, 8 * MiB)
    disk = tmp_path / "d.img"
    fill_random(disk, 20 * MiB, 62)
    poke(disk, 0, _mbr([(0x83, 2048, 16384), (0x83, 8192, 16384)]))
    place(disk, 2048 * 512, fs)
    dmap = map_file(disk)
    assert dmap.free == []
    assert all(p.state == "kept-whole" and "overlaps" in p.reason for p in dmap.partitions)
    assert len(dmap.partitions) == 2


def test_partition_past_the_end_is_kept_whole(tmp_path):
    fs = _ext_fs(tmp_path, 8 * MiB)
    disk = tmp_path / "d.img"
    fill_random(disk, 12 * MiB, 63)
    poke(disk, 0, _mbr([(0x83, 2048, 65536)]))
    place(disk, 2048 * 512, fs)
    dmap = map_file(disk)
    (p,) = dmap.partitions
    assert p.state == "kept-whole" and "past the end" in p.reason and dmap.free == []


def test_ebr_chain_loop_terminates(tmp_path):
    fs = _ext_fs(tmp_path, 4 * MiB)
    disk = tmp_path / "d.img"
    fill_random(disk, 16 * MiB, 64)
    poke(disk, 0, _mbr([(0x05, 2048, 30000)]))
    # EBR at 2048: logical 5 at 4096 (8192 sectors), next EBR at 2049
    poke(disk, 2048 * 512, _mbr([(0x83, 2048, 8192), (0x05, 1, 10)]))
    # EBR at 2049: logical 6 at 14336 (4096 sectors), next EBR -> itself
    poke(disk, 2049 * 512, _mbr([(0x83, 14336 - 2049, 4096), (0x05, 1, 10)]))
    place(disk, 4096 * 512, fs)
    dmap = map_file(disk)
    assert any("loops" in w for w in dmap.warnings)
    idx = {p.index: p for p in dmap.partitions}
    assert idx[5].fs == "ext4" and idx[5].state == "clean"
    # EBR sectors are never free
    for s, n in dmap.free:
        assert not (s <= 2048 * 512 < s + n) and not (s <= 2049 * 512 < s + n)


def test_logical_outside_extended_is_kept_whole(tmp_path):
    fs = _ext_fs(tmp_path, 4 * MiB)
    disk = tmp_path / "d.img"
    fill_random(disk, 32 * MiB, 65)
    poke(disk, 0, _mbr([(0x05, 2048, 4096)]))
    poke(disk, 2048 * 512, _mbr([(0x83, 8192, 8192)]))
    place(disk, 10240 * 512, fs)
    dmap = map_file(disk)
    (p,) = dmap.partitions
    assert p.state == "kept-whole" and "outside its extended" in p.reason


def test_unknown_things_are_kept(tmp_path):
    disk = tmp_path / "d.img"
    fill_random(disk, 8 * MiB, 66)
    poke(disk, 0, _mbr([(0x8E, 2048, 4096), (0x83, 6144, 4096)]))
    poke(disk, 2048 * 512 + 512, b"LABELONE" + bytes(16) + b"LVM2 001")
    dmap = map_file(disk)
    assert dmap.free == []
    reasons = {p.index: p.reason for p in dmap.partitions}
    assert reasons == {1: "lvm2 is not parsed", 2: "no filesystem recognised"}


@pytest.mark.parametrize("size", [0, 100, 512, 4096, 3 * MiB])
def test_garbage_and_tiny_disks(size):
    rng = np.random.default_rng(size)
    data = rng.bytes(size)
    dmap = map_disk(lambda o, n: data[o : o + n], size)
    assert dmap.free == []
    assert dmap.to_json()["disk_size"] == size


def test_zero_disk():
    dmap = map_disk(lambda o, n: bytes(n), 64 * MiB)
    assert dmap.free == [] and dmap.table == "none"
    assert dmap.partitions[0].reason == "no filesystem recognised"


def test_read_failure_is_a_vhd_error():
    def boom(o, n):
        raise OSError("I/O error")

    with pytest.raises(VhdError, match="I/O error"):
        map_disk(boom, 1 * MiB)
    with pytest.raises(VhdError, match="short read"):
        map_disk(lambda o, n: b"\0" * (n // 2), 1 * MiB)


def test_read_failure_inside_a_filesystem_is_a_vhd_error(tmp_path):
    fs = _ext_fs(tmp_path, 8 * MiB)
    data = fs.read_bytes()

    def rd(o, n):
        if o >= 4 * MiB:
            raise OSError("bad sector")
        return data[o : o + n]

    with pytest.raises(VhdError, match="bad sector"):
        map_disk(rd, len(data))
