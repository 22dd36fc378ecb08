"""Build small disk images with the real filesystem tools, without root, mount or loop devices.

Every helper works on plain files.  Tests call :func:`need` first so they skip
cleanly when a tool is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vhdcore.fsmap import DiskMap, map_disk

MiB = 1024 * 1024

# mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under fstests
XFS_ENV = {**os.environ, "TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def run(*cmd, env=None, check=True, input=None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, input=input, check=False
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_files(d: Path, count: int, lo: int, hi: int, seed: int, prefix: str = "f") -> dict:
    """Write ``count`` files of random size and content; returns name -> sha256."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(count):
        n = int(rng.integers(lo, hi))
        data = rng.bytes(n)
        name = f"{prefix}{i:03d}"
        (d / name).write_bytes(data)
        out[name] = sha(data)
    return out


def fill_random(path: Path, size: int, seed: int) -> None:
    """A file of random bytes: stale data that free space will keep unless zeroed."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.bytes(n))
            left -= n


# -- generic -----------------------------------------------------------------
class FileDisk:
    """``read(offset, length)`` over a plain image file."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, off: int, n: int) -> bytes:
        self._f.seek(off)
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


def map_file(path, **kw) -> DiskMap:
    d = FileDisk(path)
    try:
        return map_disk(d.read, d.size, **kw)
    finally:
        d.close()


def zero_free(src: Path, dst: Path, dmap: DiskMap) -> int:
    """Copy ``src`` to ``dst`` and overwrite every free range with zeros; returns bytes zeroed."""
    shutil.copyfile(src, dst)
    zeroed = 0
    with open(dst, "r+b") as f:
        for start, length in dmap.free:
            f.seek(start)
            left = length
            while left:
                n = min(left, 4 * MiB)
                f.write(b"\0" * n)
                left -= n
            zeroed += length
    return zeroed


def extract(img: Path, start: int, length: int, dst: Path) -> Path:
    with open(img, "rb") as f, open(dst, "wb") as o:
        f.seek(start)
        left = length
        while left:
            b = f.read(min(left, 8 * MiB))
            if not b:
                break
            o.write(b)
            left -= len(b)
    return dst


def place(img: Path, offset: int, fs_img: Path) -> None:
    with open(fs_img, "rb") as s, open(img, "r+b") as d:
        d.seek(offset)
        shutil.copyfileobj(s, d, 8 * MiB)


def sfdisk(img: Path, script: str) -> list[dict]:
    """Write a partition table with sfdisk; returns its partitions (start/size in sectors)."""
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", img, input=script)
    out = json.loads(run("sfdisk", "-J", img).stdout)
    return out["partitiontable"]["partitions"]


# -- ext ---------------------------------------------------------------------
def make_ext(img: Path, size: int, args: list[str], src: Path | None = None) -> None:
    if img.exists():
        img.unlink()
    extra = ["-d", str(src)] if src else []
    run("mke2fs", "-q", "-F", *args, *extra, img, f"{size // 1024}k")


def debugfs(img: Path, *cmds: str, write: bool = False) -> str:
    script = img.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    args = ["debugfs", "-f", script] + (["-w"] if write else []) + [img]
    return run(*args).stdout


def ext_rm(img: Path, names) -> None:
    debugfs(img, *[f"rm /{n}" for n in names], write=True)


def ext_shas(img: Path, names, tmp: Path) -> dict:
    out = tmp / "dump"
    out.mkdir(exist_ok=True)
    debugfs(img, *[f"dump /{n} {out / n}" for n in names])
    res = {}
    for n in names:
        p = out / n
        res[n] = sha(p.read_bytes()) if p.exists() else None
        if p.exists():
            p.unlink()
    return res


def ext_free_bytes(img: Path) -> int:
    txt = run("dumpe2fs", "-h", img).stdout
    free = int(re.search(r"^Free blocks:\s+(\d+)", txt, re.MULTILINE).group(1))
    bs = int(re.search(r"^Block size:\s+(\d+)", txt, re.MULTILINE).group(1))
    return free * bs


def ext_block_size(img: Path) -> int:
    txt = run("dumpe2fs", "-h", img).stdout
    return int(re.search(r"^Block size:\s+(\d+)", txt, re.MULTILINE).group(1))


def e2fsck_ok(img: Path) -> tuple[bool, str]:
    p = run("e2fsck", "-fn", img, check=False)
    return p.returncode == 0, p.stdout + p.stderr


# -- xfs ---------------------------------------------------------------------
def make_xfs(img: Path, size: int, src: Path, names, args=()) -> None:
    """mkfs.xfs populated from ``src`` (only ``names``) with a prototype file."""
    proto = img.with_suffix(".proto")
    lines = ["dummy", "0 0", "d--755 0 0"]
    lines += [f"{n} ---644 0 0 {src / n}" for n in names]
    lines.append("$")
    proto.write_text("\n".join(lines) + "\n")
    if not img.exists() or img.stat().st_size != size:
        with open(img, "wb") as f:
            f.truncate(size)
    run("mkfs.xfs", "-q", "-f", "-K", *args, "-p", proto, img, env=XFS_ENV)


def xfs_db(img: Path, *cmds: str) -> str:
    args = ["xfs_db", "-r"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, img).stdout


def xfs_geometry(img: Path) -> dict:
    txt = xfs_db(img, "sb 0", "p blocksize agblocks fdblocks")
    return {k: int(v) for k, v in re.findall(r"^(\w+) = (\d+)", txt, re.MULTILINE)}


def xfs_shas(img: Path, names) -> dict:
    geo = xfs_geometry(img)
    bs, agblocks = geo["blocksize"], geo["agblocks"]
    out = {}
    with open(img, "rb") as f:
        for n in names:
            txt = xfs_db(img, f"path /{n}", "p core.size", "bmap")
            size = int(re.search(r"core\.size = (\d+)", txt).group(1))
            data = bytearray()
            exts = re.findall(r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+)", txt)
            for off, ag, agbno, count in sorted(exts, key=lambda t: int(t[0])):
                assert int(off) * bs == len(data)
                f.seek((int(ag) * agblocks + int(agbno)) * bs)
                data += f.read(int(count) * bs)
            out[n] = sha(bytes(data[:size]))
    return out


def xfs_repair_ok(img: Path) -> tuple[bool, str]:
    p = run("xfs_repair", "-n", "-f", img, check=False)
    return p.returncode == 0, p.stdout + p.stderr


# -- ntfs --------------------------------------------------------------------
def make_ntfs(img: Path, size: int, src: Path, names, seed: int, args=()) -> None:
    fill_random(img, size, seed)
    run("mkntfs", "-q", "-F", "-Q", *args, img)
    for n in names:
        run("ntfscp", "-f", img, src / n, n)


def ntfs_shas(img: Path, names) -> dict:
    out = {}
    for n in names:
        p = subprocess.run(["ntfscat", str(img), n], capture_output=True, check=False)
        out[n] = sha(p.stdout) if p.returncode == 0 else None
    return out


def ntfs_free_bytes(img: Path) -> int:
    txt = run("ntfscluster", "-i", img).stdout
    return int(re.search(r"bytes of free space\s*:\s*(\d+)", txt).group(1))


def ntfsfix_ok(img: Path) -> tuple[bool, str]:
    p = run("ntfsfix", "-n", img, check=False)
    return p.returncode == 0, p.stdout + p.stderr
