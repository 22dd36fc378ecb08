"""Filesystem-aware imaging end to end: real filesystems (built without root,
mount or loop devices), filled with files, many deleted, laid down as a VHD
chain whose newer layers hold the later changes; imaged with fs-aware,
restored, and checked with the filesystems' own tools."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import vhdcore.coalesce as co
from _fsimages import (
    MiB,
    e2fsck_ok,
    ext_rm,
    ext_shas,
    extract,
    fill_random,
    make_ext,
    make_xfs,
    need,
    place,
    random_files,
    run,
    sfdisk,
    xfs_repair_ok,
    xfs_shas,
)
from vhdcore.disk import VhdFile, create_differencing, create_dynamic
from vhdcore.estimate import estimate
from vhdcore.fsmap import map_disk
from vhdcore.imaging import create_image
from vhdcore.store import open_store, restore

pytestmark = pytest.mark.tools
SECTOR = 512


def lay_down(states: list[Path], d: Path, block_size: int = 2 * MiB) -> Path:
    """A VHD chain whose base holds the first raw state and each child the
    sectors that changed since the previous state."""
    d.mkdir(parents=True, exist_ok=True)
    size = states[0].stat().st_size
    prev = None
    paths: list[Path] = []
    for i, st in enumerate(states):
        cur = np.fromfile(st, dtype=np.uint8)
        p = d / f"layer{i}.vhd"
        if i == 0:
            vhd = create_dynamic(p, size, block_size=block_size)
        else:
            create_differencing(p, paths[-1]).close()
            vhd = VhdFile.open(p, writable=True)
        with vhd:
            spb = block_size // SECTOR
            for blk in range(vhd.nblocks):
                a, b = blk * block_size, min(size, (blk + 1) * block_size)
                sec = cur[a:b].reshape(-1, SECTOR)
                if prev is None:
                    mask = sec.any(axis=1)
                else:
                    mask = (sec != prev[a:b].reshape(-1, SECTOR)).any(axis=1)
                if not mask.any():
                    continue
                bits = np.zeros(spb, dtype=bool)
                bits[: mask.size] = mask
                bm = np.packbits(bits).tobytes().ljust(vhd.bitmap_size, b"\0")
                data = bytearray(block_size)
                data[: b - a] = cur[a:b].tobytes()
                vhd.write_block(blk, bm, data)
            vhd.flush()
        paths.append(p)
        prev = cur
    return paths[-1]


def _restore_raw(url: str, out: Path) -> Path:
    restore(url, out, format="raw")
    return out


def test_seed_case_20x_once_held(tmp_path):
    """A disk that once held ~20x the data it holds now: the fs-aware image is
    under 10% of what the plain image stores, and restores intact."""
    need("mke2fs", "debugfs", "e2fsck")
    src = tmp_path / "src"
    shas = random_files(src, 40, 900 * 1024, 1100 * 1024, seed=3)  # ~40 MiB, incompressible
    full = tmp_path / "full.img"
    make_ext(full, 64 * MiB, ["-t", "ext4", "-b", "4096"], src)
    now = tmp_path / "now.img"
    shutil.copyfile(full, now)
    names = sorted(shas)
    keep = names[:2]
    ext_rm(now, names[2:])  # ~2 MiB left: 1/20 of what it once held
    leaf = lay_down([full, now], tmp_path / "chain")
    (tmp_path / "t").mkdir()
    plain = create_image(leaf, f"file://{tmp_path}/t/plain", fs_aware=False)
    aware = create_image(leaf, f"file://{tmp_path}/t/aware", fs_aware=True)
    assert aware.compressed_size < 0.10 * plain.compressed_size, (aware, plain)
    # what it stores is close to what the filesystem uses (+ metadata)
    dmap = map_disk(lambda o, n: open(now, "rb").read()[o : o + n], now.stat().st_size)
    used = now.stat().st_size - dmap.free_bytes
    assert aware.compressed_size <= used * 1.05 + 256 * 1024
    meta = open_store(f"file://{tmp_path}/t/aware").get_manifest().metadata
    assert meta["fs-aware"] == "yes"
    assert "fs=ext4" in meta["fs-part0"] and "state=clean" in meta["fs-part0"]
    raw = _restore_raw(f"file://{tmp_path}/t/aware", tmp_path / "r.img")
    ok, msg = e2fsck_ok(raw)
    assert ok, msg
    assert ext_shas(raw, keep, tmp_path) == {n: shas[n] for n in keep}
    # estimate reports both, and they match what the jobs stored
    est = estimate(leaf, fs_aware=True)
    assert est["stream_bytes"] == aware.stream_size
    assert est["without_fs_aware"]["stream_bytes"] == plain.stream_size
    (p,) = est["filesystems"]["partitions"]
    assert p["fs"] == "ext4" and p["used_bytes"] > 0


def test_mbr_ext4_swap_xfs_logical(tmp_path):
    need("sfdisk", "mke2fs", "debugfs", "e2fsck", "mkfs.xfs", "xfs_db", "xfs_repair", "mkswap")
    src = tmp_path / "src"
    shas = random_files(src, 20, 200 * 1024, 1200 * 1024, seed=11)
    names = sorted(shas)
    before = tmp_path / "before.img"
    fill_random(before, 200 * MiB, 12)
    parts = sfdisk(before, "label: dos\nstart=2048, size=48M, type=83\nsize=8M, type=82\n"
                           "type=5\nsize=96M, type=83\n")
    starts = {int(p["node"].rsplit("img", 1)[1]): (p["start"] * 512, p["size"] * 512)
              for p in parts}
    e4 = tmp_path / "p1.img"
    make_ext(e4, starts[1][1], ["-t", "ext4", "-b", "4096"], src)
    place(before, starts[1][0], e4)
    sw = tmp_path / "p2.img"
    fill_random(sw, starts[2][1], 13)
    run("mkswap", sw)
    place(before, starts[2][0], sw)
    xf = tmp_path / "p5.img"
    make_xfs(xf, starts[5][1], src, names)
    place(before, starts[5][0], xf)
    # later: half the files deleted on ext4, XFS re-made with a quarter
    after = tmp_path / "after.img"
    shutil.copyfile(before, after)
    ext_rm(e4, names[::2])
    place(after, starts[1][0], e4)
    make_xfs(xf, starts[5][1], src, names[::4])
    place(after, starts[5][0], xf)
    leaf = lay_down([before, after], tmp_path / "chain")
    (tmp_path / "t").mkdir()
    plain = create_image(leaf, f"file://{tmp_path}/t/plain", fs_aware=False)
    aware = create_image(leaf, f"file://{tmp_path}/t/aware", fs_aware=True)
    assert aware.compressed_size < plain.compressed_size * 0.8
    raw = _restore_raw(f"file://{tmp_path}/t/aware", tmp_path / "r.img")
    p1 = extract(raw, *starts[1], tmp_path / "r1.img")
    ok, msg = e2fsck_ok(p1)
    assert ok, msg
    kept = [n for n in names if n not in names[::2]]
    assert ext_shas(p1, kept, tmp_path) == {n: shas[n] for n in kept}
    p5 = extract(raw, *starts[5], tmp_path / "r5.img")
    ok, msg = xfs_repair_ok(p5)
    assert ok, msg
    assert xfs_shas(p5, names[::4]) == {n: shas[n] for n in names[::4]}
    # swap: page 0 (its signature) kept
    assert raw.read_bytes()[starts[2][0] + 4096 - 10 : starts[2][0] + 4096] == b"SWAPSPACE2"
    # everything outside the partitions is kept byte for byte
    a, r = np.fromfile(after, np.uint8), np.fromfile(raw, np.uint8)
    assert (a[: starts[1][0]] == r[: starts[1][0]]).all()


def test_journal_trap_through_the_image(tmp_path, monkeypatch):
    """ext4 with a committed, un-replayed transaction: nothing lost with the
    journal overlay; the same image built by trusting the on-disk bitmaps
    loses the files (so this test can fail)."""
    need("mke2fs", "debugfs", "e2fsck")
    from test_fsmap import _trap

    trap, shas, _ = _trap(tmp_path)
    empty = tmp_path / "empty.img"
    make_ext(empty, trap.stat().st_size, ["-t", "ext4", "-b", "4096", "-g", "4096"])
    leaf = lay_down([empty, trap], tmp_path / "chain")
    (tmp_path / "t").mkdir()
    create_image(leaf, f"file://{tmp_path}/t/good", fs_aware=True)
    good = _restore_raw(f"file://{tmp_path}/t/good", tmp_path / "good.img")
    run("e2fsck", "-fy", good, check=False)  # replays the journal
    assert ext_shas(good, sorted(shas), tmp_path) == shas
    # the naive reading (overlay off) destroys the files
    import vhdcore.fsmap as fsmap

    real = fsmap.map_disk
    monkeypatch.setattr(fsmap, "map_disk", lambda r, s, **kw: real(r, s, journal_overlay=False))
    create_image(leaf, f"file://{tmp_path}/t/bad", fs_aware=True)
    bad = _restore_raw(f"file://{tmp_path}/t/bad", tmp_path / "bad.img")
    run("e2fsck", "-fy", bad, check=False)
    lost = {n for n, h in ext_shas(bad, sorted(shas), tmp_path).items() if h != shas[n]}
    assert lost, "the naive free map should have destroyed files"


def test_damaged_filesystem_is_kept_whole(tmp_path):
    need("mke2fs", "debugfs")
    src = tmp_path / "src"
    random_files(src, 10, 200 * 1024, 400 * 1024, seed=4)
    img = tmp_path / "fs.img"
    make_ext(img, 32 * MiB, ["-t", "ext4", "-b", "4096"], src)
    ext_rm(img, [sorted(p.name for p in src.iterdir())[0]])
    raw = bytearray(img.read_bytes())
    raw[1024 + 0x3FC] ^= 0xFF  # superblock checksum
    img.write_bytes(raw)
    leaf = lay_down([img], tmp_path / "chain")
    (tmp_path / "t").mkdir()
    plain = create_image(leaf, f"file://{tmp_path}/t/plain", fs_aware=False)
    aware = create_image(leaf, f"file://{tmp_path}/t/aware", fs_aware=True)
    assert aware.stream_size == plain.stream_size
    meta = open_store(f"file://{tmp_path}/t/aware").get_manifest().metadata
    assert "kept-whole" in meta["fs-part0"]
    out = _restore_raw(f"file://{tmp_path}/t/aware", tmp_path / "r.img")
    assert out.read_bytes() == bytes(raw)


def test_flatten_fs_aware(tmp_path):
    need("mke2fs", "debugfs", "e2fsck")
    src = tmp_path / "src"
    shas = random_files(src, 12, 500 * 1024, 900 * 1024, seed=8)
    img = tmp_path / "fs.img"
    make_ext(img, 32 * MiB, ["-t", "ext4", "-b", "4096"], src)
    names = sorted(shas)
    ext_rm(img, names[:9])
    leaf = lay_down([img], tmp_path / "chain")
    plain = co.flatten(leaf, tmp_path / "plain.vhd", fs_aware=False)
    aware = co.flatten(leaf, tmp_path / "aware.vhd", fs_aware=True)
    assert aware.sectors_stored < plain.sectors_stored * 0.5
    co.flatten(tmp_path / "aware.vhd", tmp_path / "aware.raw", "raw")
    ok, msg = e2fsck_ok(tmp_path / "aware.raw")
    assert ok, msg
    assert ext_shas(tmp_path / "aware.raw", names[9:], tmp_path) == {n: shas[n] for n in names[9:]}


def test_cli_fsmap_and_estimate(tmp_path):
    import json
    import subprocess
    import sys

    need("mke2fs", "debugfs")
    src = tmp_path / "src"
    random_files(src, 6, 300 * 1024, 500 * 1024, seed=2)
    img = tmp_path / "fs.img"
    make_ext(img, 32 * MiB, ["-t", "ext4", "-b", "4096"], src)
    leaf = lay_down([img], tmp_path / "chain")
    r = subprocess.run([sys.executable, "-m", "vhdcore", "fsmap", str(leaf), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    (p,) = d["partitions"]
    assert p["fs"] == "ext4" and p["state"] == "clean" and p["used_bytes"] > 2 * MiB
    r = subprocess.run([sys.executable, "-m", "vhdcore", "fsmap", str(leaf)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "ext4" in r.stdout and "clean" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vhdcore", "estimate", str(leaf), "--fs-aware"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "without --fs-aware" in r.stdout and "ext4" in r.stdout
