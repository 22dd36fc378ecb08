"""The core safety property of vhdcore.fsmap, on filesystems made by the real tools.

Each test builds a disk image holding files, deletes many of them (their data
stays behind in free space), maps the disk, zeroes every range the map calls
free in a copy, and then checks on the copy that the filesystem's own checker
passes and that every surviving file reads back with the same SHA-256, and
that the freed bytes are close to what the filesystem itself reports free.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _fsimages import (
    MiB,
    debugfs,
    e2fsck_ok,
    ext_block_size,
    ext_free_bytes,
    ext_rm,
    ext_shas,
    extract,
    fill_random,
    make_ext,
    make_ntfs,
    make_xfs,
    map_file,
    need,
    ntfs_free_bytes,
    ntfs_shas,
    ntfsfix_ok,
    place,
    random_files,
    run,
    sfdisk,
    xfs_geometry,
    xfs_repair_ok,
    xfs_shas,
    zero_free,
)

pytestmark = pytest.mark.tools

EXT_VARIANTS = {
    "ext4-4k": ["-t", "ext4", "-b", "4096", "-g", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024", "-g", "2048"],
    "ext3": ["-t", "ext3", "-b", "1024"],
    "ext2": ["-t", "ext2", "-b", "4096", "-g", "4096"],
    "ext4-no-flex_bg": ["-t", "ext4", "-b", "4096", "-g", "4096", "-O", "^flex_bg"],
    "ext4-meta_bg": ["-t", "ext4", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"],
    "ext4-32bit-gdt_csum": [
        "-t", "ext4", "-b", "4096", "-g", "4096", "-O", "^64bit,^metadata_csum,uninit_bg",
    ],
    "ext4-bigalloc": ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "bigalloc", "-C", "16384"],
    "ext4-sparse_super2": [
        "-t", "ext4", "-b", "1024", "-O", "sparse_super2", "-E", "num_backup_sb=1",
    ],
}
EXT_NAME = {"ext3": "ext3", "ext2": "ext2"}


def _ext_with_deleted_files(tmp: Path, args, size=64 * MiB, seed=1):
    src = tmp / "src"
    shas = random_files(src, 36, 64 * 1024, 1536 * 1024, seed)
    img = tmp / "fs.img"
    make_ext(img, size, args, src)
    names = sorted(shas)
    gone = names[::2]
    ext_rm(img, gone)
    keep = {n: shas[n] for n in names if n not in gone}
    return img, keep, gone


def _assert_ext_safe(img: Path, dmap, keep: dict, tmp: Path, tol=0.03):
    fs_free = ext_free_bytes(img)
    out = tmp / "zeroed.img"
    zero_free(img, out, dmap)
    ok, msg = e2fsck_ok(out)
    assert ok, msg
    assert ext_shas(out, keep, tmp) == keep
    assert dmap.free_bytes >= (1 - tol) * fs_free, (dmap.free_bytes, fs_free)
    assert dmap.free_bytes <= fs_free


@pytest.mark.parametrize("variant", sorted(EXT_VARIANTS))
def test_ext_zeroing_free_space_keeps_every_file(tmp_path, variant):
    need("mke2fs", "debugfs", "e2fsck", "dumpe2fs")
    img, keep, _gone = _ext_with_deleted_files(tmp_path, EXT_VARIANTS[variant])
    dmap = map_file(img)
    (p,) = dmap.partitions
    assert p.table == "none" and p.state == "clean", p
    assert p.fs == EXT_NAME.get(variant, "ext4")
    assert p.free_bytes == dmap.free_bytes
    _assert_ext_safe(img, dmap, keep, tmp_path)
    # the deleted files' data really was in what got zeroed
    assert dmap.free_bytes > 20 * MiB


# -- the journal trap ----------------------------------------------------------
TRAP_FS = ["-t", "ext4", "-b", "4096", "-g", "4096"]
TRAP_VARIANTS = {
    "plain": ("jo", TRAP_FS),
    "csum_v2": ("jo -c -v 2", TRAP_FS),
    "csum_v3": ("jo -c -v 3", TRAP_FS),
    "32bit": ("jo", TRAP_FS + ["-O", "^64bit"]),
    "1k-32bit-csum_v3": ("jo -c -v 3", ["-t", "ext4", "-b", "1024", "-O", "^64bit"]),
}


def _trap(tmp: Path, jo: str = "jo", mkfs=TRAP_FS, seed: int = 7):
    """An ext4 whose new files exist only through a committed, un-replayed transaction.

    The files' data blocks are written in place, but every metadata block that
    changed (bitmaps, descriptors, inode table, directory, superblock) is put
    back to its old contents and the new versions go into the journal.
    """
    src = tmp / "src"
    shas = random_files(src, 16, 256 * 1024, 1024 * 1024, seed)
    a = tmp / "a.img"
    make_ext(a, 64 * MiB, list(mkfs))
    b = tmp / "b.img"
    shutil.copyfile(a, b)
    names = sorted(shas)
    debugfs(b, *[f"write {src / n} {n}" for n in names], write=True)
    data_blocks: set[int] = set()
    for n in names:
        out = run("debugfs", "-R", f"blocks /{n}", b).stdout
        data_blocks.update(int(x) for x in out.split())
    bs = ext_block_size(a)
    ab, bb = a.read_bytes(), bytearray(b.read_bytes())
    changed = [
        i for i in range(len(ab) // bs) if ab[i * bs : (i + 1) * bs] != bb[i * bs : (i + 1) * bs]
    ]
    meta = [i for i in changed if i not in data_blocks]
    assert meta and set(changed) - set(meta)
    (tmp / "meta.bin").write_bytes(b"".join(bytes(bb[i * bs : (i + 1) * bs]) for i in meta))
    for i in meta:
        bb[i * bs : (i + 1) * bs] = ab[i * bs : (i + 1) * bs]
    c = tmp / "trap.img"
    c.write_bytes(bytes(bb))
    debugfs(c, jo, f"jw -b {','.join(map(str, meta))} {tmp / 'meta.bin'}", "jc", write=True)
    # on disk (without the journal) the files do not exist
    assert "f000" not in run("debugfs", "-R", "ls /", c).stdout
    return c, shas, meta


def _replayed_shas(img: Path, shas: dict, tmp: Path) -> dict:
    run("e2fsck", "-fy", img, check=False)  # replays the journal (and repairs what it must)
    return ext_shas(img, shas, tmp)


@pytest.mark.parametrize("variant", sorted(TRAP_VARIANTS))
def test_journal_trap_overlay_keeps_every_file(tmp_path, variant):
    need("mke2fs", "debugfs", "e2fsck")
    trap, shas, _ = _trap(tmp_path, *TRAP_VARIANTS[variant])
    dmap = map_file(trap)
    (p,) = dmap.partitions
    assert p.state == "journal-applied", p
    out = tmp_path / "zeroed.img"
    zero_free(trap, out, dmap)
    assert _replayed_shas(out, shas, tmp_path) == shas
    ok, msg = e2fsck_ok(out)
    assert ok, msg
    # the overlay view agrees with the replayed filesystem's own free count
    ref = tmp_path / "ref.img"
    shutil.copyfile(trap, ref)
    run("e2fsck", "-fy", ref, check=False)
    assert dmap.free_bytes == ext_free_bytes(ref)


def test_journal_trap_without_overlay_loses_data(tmp_path):
    """The naive reading of the on-disk bitmaps destroys the files: this is why the overlay exists."""
    need("mke2fs", "debugfs", "e2fsck")
    trap, shas, _ = _trap(tmp_path)
    dmap = map_file(trap, journal_overlay=False)
    (p,) = dmap.partitions
    assert p.state == "journal-ignored"
    assert any("UNSAFE" in w for w in p.warnings)
    out = tmp_path / "zeroed.img"
    zero_free(trap, out, dmap)
    after = _replayed_shas(out, shas, tmp_path)
    lost = [n for n in shas if after[n] != shas[n]]
    assert len(lost) == len(shas)


def test_journal_revoke_is_honoured(tmp_path):
    need("mke2fs", "debugfs")
    trap, _shas, meta = _trap(tmp_path)
    plain = map_file(trap).partitions[0]
    assert f"{len(meta)} block(s) applied" in " ".join(plain.warnings)
    # a later committed transaction revoking one block cancels the earlier copy
    debugfs(trap, "jo", f"jw -r {meta[-1]} /dev/null", "jc", write=True)
    revoked = map_file(trap).partitions[0]
    assert revoked.state == "journal-applied"
    assert f"{len(meta) - 1} block(s) applied" in " ".join(revoked.warnings), revoked.warnings


def test_uncommitted_transaction_is_ignored(tmp_path):
    need("mke2fs", "debugfs")
    trap, _shas, meta = _trap(tmp_path)
    before = map_file(trap)
    # an uncommitted transaction rewriting the block bitmap with zeros must change nothing
    (tmp_path / "zero.bin").write_bytes(bytes(4096))
    debugfs(trap, "jo", f"jw -c -b {meta[0]} {tmp_path / 'zero.bin'}", "jc", write=True)
    after = map_file(trap)
    assert after.free == before.free
    assert after.partitions[0].state == "journal-applied"


# -- XFS -------------------------------------------------------------------------
XFS_VARIANTS = {
    "v5": ["-m", "crc=1"],
    "v4": ["-m", "crc=0"],
    "v5-rmapbt-4k-sectors": ["-m", "rmapbt=1", "-s", "size=4096"],
    "v5-1k-blocks-log-stripe": ["-b", "size=1024", "-l", "su=64k", "-d", "su=64k,sw=2"],
}


@pytest.mark.parametrize("variant", sorted(XFS_VARIANTS))
def test_xfs_zeroing_free_space_keeps_every_file(tmp_path, variant):
    need("mkfs.xfs", "xfs_db", "xfs_repair")
    src = tmp_path / "src"
    shas = random_files(src, 30, 64 * 1024, 1536 * 1024, 3)
    names = sorted(shas)
    img = tmp_path / "xfs.img"
    fill_random(img, 96 * MiB, 4)
    # fill it, then re-make it with half the files: the rest stays behind as stale data
    make_xfs(img, 96 * MiB, src, names, XFS_VARIANTS[variant])
    keep = names[1::2]
    make_xfs(img, 96 * MiB, src, keep, XFS_VARIANTS[variant])
    keep_shas = {n: shas[n] for n in keep}
    assert xfs_shas(img, keep) == keep_shas
    dmap = map_file(img)
    (p,) = dmap.partitions
    assert p.fs == "xfs" and p.state == "clean", p
    fs_free = xfs_geometry(img)["fdblocks"] * xfs_geometry(img)["blocksize"]
    out = tmp_path / "zeroed.img"
    zero_free(img, out, dmap)
    ok, msg = xfs_repair_ok(out)
    assert ok, msg
    assert xfs_shas(out, keep) == keep_shas
    assert 0.97 * fs_free <= dmap.free_bytes <= fs_free


# -- NTFS ------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", [None, "1024", "16384"])
def test_ntfs_zeroing_free_space_keeps_every_file(tmp_path, cluster):
    need("mkntfs", "ntfscp", "ntfscat", "ntfsfix", "ntfscluster")
    src = tmp_path / "src"
    shas = random_files(src, 8, 64 * 1024, 2 * MiB, 5)
    names = sorted(shas)
    img = tmp_path / "ntfs.img"
    make_ntfs(img, 48 * MiB, src, names, seed=6, args=["-c", cluster] if cluster else [])
    dmap = map_file(img)
    (p,) = dmap.partitions
    assert p.fs == "ntfs" and p.state == "clean", p
    fs_free = ntfs_free_bytes(img)
    out = tmp_path / "zeroed.img"
    zero_free(img, out, dmap)
    ok, msg = ntfsfix_ok(out)
    assert ok, msg
    assert ntfs_shas(out, names) == shas
    assert 0.97 * fs_free <= dmap.free_bytes <= fs_free
    # the backup boot sector (last sector of the volume) is kept
    data = img.read_bytes()
    assert out.read_bytes()[-512:] == data[-512:]
    assert data[-512:][3:11] == b"NTFS    "


# -- swap ------------------------------------------------------------------------
def test_swap_keeps_header_page(tmp_path):
    need("mkswap")
    img = tmp_path / "swap.img"
    fill_random(img, 16 * MiB, 8)
    run("mkswap", img)
    dmap = map_file(img)
    (p,) = dmap.partitions
    assert p.fs == "swap" and p.state == "clean"
    assert dmap.free == [(4096, 16 * MiB - 4096)]
    out = tmp_path / "zeroed.img"
    zero_free(img, out, dmap)
    assert out.read_bytes()[:4096] == img.read_bytes()[:4096]


def test_swap_with_hibernation_image_is_kept(tmp_path):
    need("mkswap")
    img = tmp_path / "swap.img"
    fill_random(img, 8 * MiB, 9)
    run("mkswap", img)
    with open(img, "r+b") as f:
        f.seek(4096 - 10)
        f.write(b"S1SUSPEND\0")
    dmap = map_file(img)
    (p,) = dmap.partitions
    assert p.fs == "swap" and p.state == "kept-whole" and "hibernation" in p.reason
    assert dmap.free == []


# -- partitioned disks -----------------------------------------------------------
def _mbr_disk(tmp: Path):
    """MBR: ext4 (1), swap (2), extended (3) holding XFS (5) and ext2 (6)."""
    src = tmp / "src"
    shas = random_files(src, 24, 64 * 1024, 1024 * 1024, 11)
    names = sorted(shas)
    disk = tmp / "disk.img"
    fill_random(disk, 200 * MiB, 12)
    parts = sfdisk(
        disk,
        "label: dos\n"
        "start=2048, size=40M, type=83\n"
        "size=8M, type=82\n"
        "type=5\n"
        "size=96M, type=83\n"
        "type=83\n",
    )
    starts = {int(p["node"].rsplit("img", 1)[1]): (p["start"] * 512, p["size"] * 512) for p in parts}
    # 1: ext4 with half its files deleted
    e4 = tmp / "p1.img"
    make_ext(e4, starts[1][1], ["-t", "ext4", "-b", "4096"], src)
    ext_rm(e4, names[::2])
    place(disk, starts[1][0], e4)
    # 2: swap
    sw = tmp / "p2.img"
    fill_random(sw, starts[2][1], 13)
    run("mkswap", sw)
    place(disk, starts[2][0], sw)
    # 5: XFS re-made with fewer files
    xf = tmp / "p5.img"
    make_xfs(xf, starts[5][1], src, names)
    make_xfs(xf, starts[5][1], src, names[1::2])
    place(disk, starts[5][0], xf)
    # 6: ext2
    e2 = tmp / "p6.img"
    make_ext(e2, starts[6][1], ["-t", "ext2", "-b", "1024"], src)
    ext_rm(e2, names[1::2])
    place(disk, starts[6][0], e2)
    return disk, starts, shas, names


def test_mbr_with_logical_partitions(tmp_path):
    need("sfdisk", "mke2fs", "debugfs", "e2fsck", "mkfs.xfs", "xfs_db", "xfs_repair", "mkswap")
    disk, starts, shas, names = _mbr_disk(tmp_path)
    dmap = map_file(disk)
    got = {p.index: (p.fs, p.state, p.table) for p in dmap.partitions}
    assert got == {
        1: ("ext4", "clean", "mbr"),
        2: ("swap", "clean", "mbr"),
        5: ("xfs", "clean", "mbr"),
        6: ("ext2", "clean", "mbr"),
    }, dmap.to_json()
    for p in dmap.partitions:
        assert (p.start, p.length) == starts[p.index]
    out = tmp_path / "zeroed.img"
    zero_free(disk, out, dmap)
    raw, zed = disk.read_bytes(), out.read_bytes()
    # everything outside the partitions is untouched: MBR, gap, EBRs, tail
    covered = sorted(starts[i] for i in (1, 2, 5, 6))
    pos = 0
    for s, n in covered:
        assert zed[pos:s] == raw[pos:s]
        pos = s + n
    assert zed[pos:] == raw[pos:]
    # each filesystem still checks out and keeps its files
    p1 = extract(out, *starts[1], tmp_path / "x1.img")
    assert e2fsck_ok(p1)[0]
    keep1 = {n: shas[n] for n in names[1::2]}
    assert ext_shas(p1, keep1, tmp_path) == keep1
    p6 = extract(out, *starts[6], tmp_path / "x6.img")
    assert e2fsck_ok(p6)[0]
    keep6 = {n: shas[n] for n in names[::2]}
    assert ext_shas(p6, keep6, tmp_path) == keep6
    p5 = extract(out, *starts[5], tmp_path / "x5.img")
    assert xfs_repair_ok(p5)[0]
    assert xfs_shas(p5, names[1::2]) == {n: shas[n] for n in names[1::2]}
    assert zed[starts[2][0] : starts[2][0] + 4096] == raw[starts[2][0] : starts[2][0] + 4096]
    js = json.loads(json.dumps(dmap.to_json(include_ranges=True)))
    assert js["free_bytes"] == sum(p["free_bytes"] for p in js["partitions"])
    assert all(p["skipped_ranges"] for p in js["partitions"])


def _gpt_disk(tmp: Path):
    src = tmp / "src"
    shas = random_files(src, 16, 64 * 1024, 1024 * 1024, 21)
    names = sorted(shas)
    disk = tmp / "gpt.img"
    fill_random(disk, 64 * MiB, 22)
    parts = sfdisk(
        disk,
        "label: gpt\n"
        "start=2048, size=40M, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        "size=8M, type=0657FD6D-A4AB-4C6C-84E5-0933C84B4F4F\n",
    )
    starts = {int(p["node"].rsplit("img", 1)[1]): (p["start"] * 512, p["size"] * 512) for p in parts}
    e4 = tmp / "p1.img"
    make_ext(e4, starts[1][1], ["-t", "ext4", "-b", "4096"], src)
    ext_rm(e4, names[::2])
    place(disk, starts[1][0], e4)
    sw = tmp / "p2.img"
    fill_random(sw, starts[2][1], 23)
    run("mkswap", sw)
    place(disk, starts[2][0], sw)
    return disk, starts, {n: shas[n] for n in names[1::2]}


def test_gpt_disk(tmp_path):
    need("sfdisk", "mke2fs", "debugfs", "e2fsck", "mkswap")
    disk, starts, keep = _gpt_disk(tmp_path)
    dmap = map_file(disk)
    assert dmap.table == "gpt"
    got = {p.index: (p.fs, p.state, p.type_hint) for p in dmap.partitions}
    assert got == {
        1: ("ext4", "clean", "gpt:linux-data"),
        2: ("swap", "clean", "gpt:linux-swap"),
    }
    assert not dmap.warnings
    out = tmp_path / "zeroed.img"
    zero_free(disk, out, dmap)
    raw, zed = disk.read_bytes(), out.read_bytes()
    assert zed[: starts[1][0]] == raw[: starts[1][0]]  # protective MBR, GPT, gap
    end = starts[2][0] + starts[2][1]
    assert zed[end:] == raw[end:]  # backup GPT
    assert run("sfdisk", "--verify", out, check=False).returncode == 0
    p1 = extract(out, *starts[1], tmp_path / "x1.img")
    assert e2fsck_ok(p1)[0]
    assert ext_shas(p1, keep, tmp_path) == keep


def test_gpt_bad_primary_crc_uses_backup(tmp_path):
    need("sfdisk", "mke2fs", "debugfs", "mkswap")
    disk, _starts, _keep = _gpt_disk(tmp_path)
    good = map_file(disk)
    with open(disk, "r+b") as f:
        f.seek(512 + 16)
        f.write(b"\xde\xad\xbe\xef")
    dmap = map_file(disk)
    assert dmap.table == "gpt"
    assert any("backup GPT" in w for w in dmap.warnings)
    assert dmap.free == good.free


def test_gpt_both_headers_bad_keeps_everything(tmp_path):
    need("sfdisk", "mke2fs", "debugfs", "mkswap")
    disk, _starts, _keep = _gpt_disk(tmp_path)
    size = disk.stat().st_size
    with open(disk, "r+b") as f:
        f.seek(2 * 512)  # primary entry array
        f.write(b"\xff" * 16)
        f.seek(size - 512 + 16)  # backup header CRC
        f.write(b"\0\0\0\0")
    dmap = map_file(disk)
    assert dmap.free == [] and dmap.partitions == []
    assert any("CRC32" in w for w in dmap.warnings)
