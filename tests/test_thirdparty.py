"""vhdcore against tools nobody here wrote: qemu-img for fixed and dynamic
VHDs, libvhdi for chains with 4 KiB-aligned writes."""
from __future__ import annotations

import os
import random
import subprocess

import pytest

from _builders import build_chain, read_all
from _helpers import have_tool
from vhdcore.chain import Chain
from vhdcore.disk import create_dynamic, create_fixed

needs_qemu = pytest.mark.skipif(not have_tool("qemu-img"), reason="qemu-img not installed")

MiB = 1024 * 1024


def _qemu_raw(path, tmp_path) -> bytes:
    raw = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(raw)],
                   check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


def _qemu_size(path) -> int:
    import json

    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["virtual-size"]


@needs_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [1 * MiB, 3 * MiB + 512, 5 * MiB + 7 * 512, 17 * MiB])
def test_read_qemu_made_vhd(tmp_path, subformat, size):
    """VHDs made by qemu-img read identical to qemu-img's own raw conversion."""
    rnd = random.Random(size)
    src = tmp_path / "src.raw"
    data = bytearray(size)
    for _ in range(12):
        off = rnd.randrange(size)
        n = min(size - off, rnd.randrange(1, 300_000))
        data[off : off + n] = rnd.randbytes(n)
    src.write_bytes(data)
    vhd = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                    f"subformat={subformat},force_size=on", str(src), str(vhd)], check=True)
    expected = _qemu_raw(vhd, tmp_path)
    assert expected == bytes(data)
    with Chain.open(vhd) as c:
        assert c.virtual_size == size
        assert c.read(0, size) == expected


@needs_qemu
@pytest.mark.parametrize("kind", ["dynamic", "dynamic-512k", "fixed"])
@pytest.mark.parametrize("size", [2 * MiB, 5 * MiB + 3 * 512, 12 * MiB])
def test_qemu_reads_our_vhd(tmp_path, kind, size):
    """VHDs written by vhdcore have the right size and content for qemu-img."""
    rnd = random.Random(size + len(kind))
    model = bytearray(size)
    p = tmp_path / "ours.vhd"
    if kind == "fixed":
        d = create_fixed(p, size)
    else:
        d = create_dynamic(p, size, block_size=512 * 1024 if "512k" in kind else 2 * MiB)
    with d, Chain.from_layers([d], owned=False) as c:
        for _ in range(30):
            off = rnd.randrange(size)
            n = min(size - off, rnd.randrange(1, 200_000))
            b = rnd.randbytes(n)
            c.write(off, b)
            model[off : off + n] = b
    assert _qemu_size(p) == size
    assert _qemu_raw(p, tmp_path) == bytes(model)
    from vhdcore.check import check_file

    assert [pr for pr in check_file(p) if pr.severity == "error"] == []


try:
    import pyvhdi
except ImportError:  # pragma: no cover - libvhdi is installed by .ci/run
    pyvhdi = None

needs_libvhdi = pytest.mark.skipif(pyvhdi is None, reason="libvhdi (pyvhdi) not installed")


def _libvhdi_read(paths) -> bytes:
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(str(p))
        files.append(f)
    for i in range(len(files) - 1, 0, -1):
        files[i].set_parent(files[i - 1])
    leaf = files[-1]
    size = leaf.get_media_size()
    leaf.seek(0)
    out = bytearray()
    while len(out) < size:
        chunk = leaf.read(min(4 * MiB, size - len(out)))
        if not chunk:
            break
        out += chunk
    for f in reversed(files):
        f.close()
    return bytes(out)


@needs_libvhdi
@pytest.mark.parametrize("depth,base,block", [
    (1, "dynamic", 2 * MiB), (2, "fixed", 2 * MiB), (3, "dynamic", 2 * MiB),
    (8, "dynamic", 2 * MiB), (30, "dynamic", 2 * MiB),
])
def test_libvhdi_reads_our_chains(tmp_path, depth, base, block):
    """Chains written by vhdcore with 4 KiB-aligned writes read identical by
    libvhdi (the oracle for chains; see its sub-4 KiB bug in the format notes)."""
    size = 6 * MiB + 4096 * 3
    mc = build_chain(tmp_path, size=size, depth=depth, block_size=block, base=base,
                     writes_per_layer=6 if depth > 10 else 12, granularity=4096,
                     max_len=300_000, seed=depth * 7 + len(base))
    ours = read_all(mc.leaf)
    assert ours == bytes(mc.model)
    assert _libvhdi_read(mc.paths) == bytes(mc.model)


@needs_libvhdi
def test_libvhdi_sees_our_parent_links(tmp_path):
    mc = build_chain(tmp_path, size=4 * MiB, depth=3, writes_per_layer=2, granularity=4096)
    f = pyvhdi.file()
    f.open(str(mc.leaf))
    try:
        assert f.get_parent_filename() == os.path.basename(mc.paths[-2])
        with Chain.open(mc.leaf) as c:
            assert f.get_parent_identifier() == str(c.layers[1].uuid)
    finally:
        f.close()


@needs_qemu
def test_512k_partial_blocks_agree_with_qemu_and_model(tmp_path):
    """libvhdi 20210425 reads zeros for a partly written 512 KiB block that was
    allocated before a lower-numbered one (see docs/vhd-notes.md); qemu-img
    and the model are the oracles for that case."""
    size = 6 * MiB + 3 * 4096
    bs = 512 * 1024
    model = bytearray(size)
    p = tmp_path / "p.vhd"
    with create_dynamic(p, size, block_size=bs) as d, Chain.from_layers([d], owned=False) as c:
        for off, n in [(4767744, 69632), (4509696, 188416)]:
            b = random.Random(off).randbytes(n)
            c.write(off, b)
            model[off : off + n] = b
    assert read_all(p) == bytes(model)
    assert _qemu_raw(p, tmp_path) == bytes(model)
