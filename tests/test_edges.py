"""Disk shapes and edges that once went wrong (issue 13): each test here
failed before its fix."""
from __future__ import annotations

import errno
import os

import pytest

from _builders import read_all
from vhdcore import _io
from vhdcore.chain import Chain
from vhdcore.coalesce import flatten
from vhdcore.disk import VhdFile, create_dynamic

MiB = 1024 * 1024
KiB = 1024


# ------------------------------------------------------------ bug 7
def test_reads_after_write_block_see_the_grown_file(tmp_path):
    """write_block grows the file; reads through the same VhdFile must see
    the new block without a flush or a reopen."""
    p = tmp_path / "d.vhd"
    create_dynamic(p, 4 * MiB, block_size=512 * KiB).close()
    with VhdFile.open(p, writable=True) as v:
        bm = bytearray(v.bitmap_size)
        bm[: 512 * KiB // 512 // 8] = b"\xff" * (512 * KiB // 512 // 8)
        for blk, tag in ((3, 0x33), (1, 0x11)):
            v.write_block(blk, bm, bytes([tag]) * (512 * KiB))
            views = v.block_views(blk)
            assert views is not None
            assert len(views[1]) == 512 * KiB
            assert bytes(views[1]) == bytes([tag]) * (512 * KiB)
            assert v.read(blk * 512 * KiB, 512 * KiB) == bytes([tag]) * (512 * KiB)
        v.flush()
    assert read_all(p)[3 * 512 * KiB : 4 * 512 * KiB] == b"\x33" * (512 * KiB)


# ------------------------------------------------------------ bug 8
@pytest.mark.parametrize("fmt", ["vhd", "fixed", "raw"])
def test_flatten_bytes_written_is_what_was_written(tmp_path, fmt):
    """FlattenResult.bytes_written: every byte written into the output
    (metadata included), holes for zero blocks not counted."""
    p = tmp_path / "d.vhd"
    create_dynamic(p, 8 * MiB + 3 * 512, block_size=2 * MiB).close()
    with Chain.open(p, writable=True) as c:
        c.write(MiB, b"\x01" * 4096)
        c.write(8 * MiB, b"\x02" * 1024)  # the short last block
    out = tmp_path / f"f.{fmt}"
    res = flatten(p, out, fmt)
    if fmt == "vhd":
        assert res.bytes_written == os.path.getsize(out)
    elif fmt == "fixed":
        assert res.bytes_written == 2 * MiB + 3 * 512 + 512
    else:
        assert res.bytes_written == 2 * MiB + 3 * 512


# ------------------------------------------------------------ fsync_dir
def test_fsync_dir_does_not_swallow_eio(tmp_path):
    target = str(tmp_path / "state.json")
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        _io.atomic_write(target, b"{}")
    last = plan.count
    assert plan.ops[-1] == "fsync"  # the directory's fsync comes last
    with pytest.raises(OSError) as ei:
        with _io.inject(_io.FaultPlan(at=last, kind="eio")):
            _io.atomic_write(target, b"{}")
    assert ei.value.errno == errno.EIO


def test_fsync_dir_failing_fails_flatten(tmp_path):
    p = tmp_path / "d.vhd"
    create_dynamic(p, 2 * MiB).close()
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        flatten(p, tmp_path / "a.vhd")
    with pytest.raises(OSError):
        with _io.inject(_io.FaultPlan(at=plan.count, kind="eio")):
            flatten(p, tmp_path / "b.vhd")


# ------------------------------------------------------------ bug 4: 2 TiB
from vhdcore.coalesce import DynamicLayout, coalesce  # noqa: E402
from vhdcore.disk import create_differencing, create_fixed  # noqa: E402
from vhdcore.errors import FormatError, VhdError  # noqa: E402
from vhdcore.format import FOOTER_SIZE, MAX_BAT_SECTOR, VHD_MAX_SIZE  # noqa: E402


def test_largest_virtual_size_works_one_sector_more_is_refused(tmp_path):
    """Sparse: the BAT of a 2040 GiB disk is 4 MiB; nothing near 2 TiB is written."""
    p = tmp_path / "max.vhd"
    create_dynamic(p, VHD_MAX_SIZE).close()
    with Chain.open(p, writable=True) as c:
        c.write(VHD_MAX_SIZE - 512, b"\x7f" * 512)
        c.write(0, b"\x01" * 512)
    with Chain.open(p) as c:
        assert c.virtual_size == VHD_MAX_SIZE
        assert c.read(VHD_MAX_SIZE - 1024, 1024) == bytes(512) + b"\x7f" * 512
    q = tmp_path / "child.vhd"
    create_differencing(q, p).close()
    with pytest.raises(FormatError, match="2040 GiB"):
        create_differencing(tmp_path / "big.vhd", p, size=VHD_MAX_SIZE + 512)
    with pytest.raises(FormatError, match="2040 GiB"):
        create_dynamic(tmp_path / "big.vhd", VHD_MAX_SIZE + 512)
    with pytest.raises(FormatError, match="2040 GiB"):
        create_fixed(tmp_path / "bigf.vhd", VHD_MAX_SIZE + 512)
    assert not (tmp_path / "bigf.vhd").exists() or os.path.getsize(tmp_path / "bigf.vhd") == 0
    # a flatten of the largest disk (two blocks stored)
    res = flatten(q, tmp_path / "flat.vhd")
    assert res.blocks_stored == 2
    with Chain.open(tmp_path / "flat.vhd") as c:
        assert c.virtual_size == VHD_MAX_SIZE
        assert c.read(VHD_MAX_SIZE - 512, 512) == b"\x7f" * 512
    with pytest.raises(FormatError, match="2040 GiB"):
        DynamicLayout(VHD_MAX_SIZE + 512, 2 * MiB)


def test_layout_refuses_blocks_past_32_bit_sectors():
    # 2 MiB blocks: a fully allocated 2040 GiB disk still fits
    lay = DynamicLayout(VHD_MAX_SIZE, 2 * MiB)
    lay.check_capacity(lay.nblocks)
    assert lay.max_blocks() >= lay.nblocks
    # 4 KiB blocks: the bitmaps push a full disk past 2 TiB
    small = DynamicLayout(VHD_MAX_SIZE, 4 * KiB)
    n = small.max_blocks()
    assert n < small.nblocks
    small.check_capacity(n)
    assert small.block_offset(n - 1) // 512 <= MAX_BAT_SECTOR
    with pytest.raises(FormatError, match="32-bit"):
        small.check_capacity(n + 1)
    with pytest.raises(FormatError, match="32-bit"):
        small.block_offset(n)


def _move_footer(path, offset):
    """Make a dynamic file's footer sit at ``offset`` (a sparse file): new
    blocks then go there."""
    with open(path, "r+b") as f:
        f.seek(-FOOTER_SIZE, 2)
        footer = f.read(FOOTER_SIZE)
        f.truncate(offset)
        f.seek(offset)
        f.write(footer)


def _state(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, st.st_size - (1 << 20)))
        tail = f.read()
    return st.st_size, head, tail


def test_write_block_refuses_offsets_past_the_bat_range(tmp_path):
    p = tmp_path / "d.vhd"
    create_dynamic(p, 1 * MiB, block_size=4 * KiB).close()
    last = MAX_BAT_SECTOR * 512
    _move_footer(p, last)
    with VhdFile.open(p, writable=True) as v:
        bm = b"\xff" + bytes(v.bitmap_size - 1)
        v.write_block(0, bm, b"\x05" * 4096)   # starts at the last sector a BAT can hold
        v.flush()
        assert int(v.bat[0]) == MAX_BAT_SECTOR
    before = _state(p)
    with VhdFile.open(p, writable=True) as v:
        with pytest.raises(FormatError, match="32-bit"):
            v.write_block(1, bm, b"\x06" * 4096)
    assert _state(p) == before
    with Chain.open(p) as c:
        assert c.read(0, 8192) == b"\x05" * 4096 + bytes(4096)


def test_coalesce_refuses_parent_growth_past_2_tib_before_writing(tmp_path):
    p = tmp_path / "p.vhd"
    create_dynamic(p, 1 * MiB, block_size=4 * KiB).close()
    stride = 4096 + 512
    # room for exactly one more block
    _move_footer(p, MAX_BAT_SECTOR * 512 - stride + 512)
    c = tmp_path / "c.vhd"
    create_differencing(c, p).close()
    with Chain.open(c, writable=True) as ch:
        ch.write(0, b"\x01" * 4096)
        ch.write(8192, b"\x02" * 4096)
    before_p, before_c = _state(p), _state(c)
    with pytest.raises(VhdError, match="32-bit"):
        coalesce(c, skip_space_check=True)
    assert _state(p) == before_p and _state(c) == before_c
    from vhdcore.coalesce import checkpoint_path
    assert not os.path.exists(checkpoint_path(c))


# ------------------------------------------------------------ bug 3: short last block
from _builders import store_last_block_short  # noqa: E402
from vhdcore.check import check_file  # noqa: E402


def _short_parent(tmp_path, *, size, block_size, stale_bits=False):
    p = tmp_path / "p.vhd"
    create_dynamic(p, size, block_size=block_size).close()
    model = bytearray(size)
    with Chain.open(p, writable=True) as c:
        for off, tag in ((0, 1), (size - 3 * 512, 2), (size - block_size // 2, 3)):
            c.write(off, bytes([tag]) * 1024 if off + 1024 <= size else bytes([tag]) * (size - off))
            model[off : off + 1024] = bytes([tag]) * len(model[off : off + 1024])
    assert store_last_block_short(p, stale_bits=stale_bits)
    with VhdFile.open(p) as v:
        off = v.block_offset(v.nblocks - 1)
        assert off + v.bitmap_size + v.block_size > v.footer_offset  # really short
    assert read_all(p) == bytes(model)
    return p, model


@pytest.mark.parametrize("stale_bits", [False, True])
@pytest.mark.parametrize("grow", [0, 5 * 512, 3 * 512 * KiB + 7 * 512])
def test_coalesce_onto_a_short_last_block(tmp_path, grow, stale_bits):
    bs = 512 * KiB
    size = 3 * bs + 5 * 512
    p, model = _short_parent(tmp_path, size=size, block_size=bs, stale_bits=stale_bits)
    c = tmp_path / "c.vhd"
    create_differencing(c, p, size=size + grow).close()
    model += bytes(grow)
    with Chain.open(c, writable=True) as ch:
        # into the stored short block, across its old end, and past it
        # (the sector right after the old end, where the footer was, stays unwritten)
        writes = [(size - 2 * 512, 512, 7), (3 * bs + 512, 512, 9)]
        if grow >= 1024:
            writes.append((size + 512, 512, 8))
        for off, ln, tag in writes:
            ch.write(off, bytes([tag]) * ln)
            model[off : off + ln] = bytes([tag]) * ln
    assert read_all(c) == bytes(model)
    coalesce(c)
    assert read_all(p) == bytes(model)
    assert [pr for pr in check_file(p) if pr.severity == "error"] == []
    # and the parent stays writable and readable
    with Chain.open(p, writable=True) as ch:
        ch.write(size + grow - 512, b"\x0b" * 512)
    model[-512:] = b"\x0b" * 512
    assert read_all(p) == bytes(model)


# ------------------------------------------------------------ info on damaged files
import json as _json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def _cli(*args):
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "src"))
    return subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("what", ["footer", "header"])
def test_info_on_a_bad_checksum_shows_fields_and_which_failed(tmp_path, what):
    p = tmp_path / "d.vhd"
    create_dynamic(p, 3 * MiB, block_size=512 * KiB).close()
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        if what == "footer":
            for off in (0, size - 512):  # both footers: the file does not open
                f.seek(off + 64)
                f.write(b"\x12\x34\x56\x78")
        else:
            f.seek(512 + 36)
            f.write(b"\x12\x34\x56\x78")
    r = _cli("info", p)
    assert r.returncode == 1
    assert "3145728" in r.stdout  # the virtual size is still shown
    assert "0x12345678" in r.stdout and "BAD" in r.stdout
    r = _cli("info", p, "--json")
    assert r.returncode == 1
    d = _json.loads(r.stdout)
    assert d["footer"]["virtual_size"] == 3 * MiB
    if what == "footer":
        assert d["footer"]["checksum_ok"] is False
        assert d["footer"]["checksum_stored"] == "0x12345678"
        assert d["footer"]["checksum_computed"] != "0x12345678"
        assert any("footer checksum" in b for b in d["checksum_failures"])
    else:
        assert d["footer"]["checksum_ok"] is True
        assert d["header"]["checksum_ok"] is False
        assert d["header"]["block_size"] == 512 * KiB
        assert d["checksum_failures"] == [
            f"header checksum (stored 0x12345678, computed {d['header']['checksum_computed']})"]


def test_a_disk_past_2040_gib_reads_but_no_vhd_of_it_is_written(tmp_path):
    from _mutate import craft_vhd

    p = tmp_path / "huge.vhd"
    p.write_bytes(craft_vhd(size=2 * 1024**4, block_size=256 * MiB, bat_bytes=32 * KiB))
    with Chain.open(p) as c:
        assert c.read(2 * 1024**4 - 512, 512) == bytes(512)
    for fmt in ("vhd", "fixed"):
        with pytest.raises(FormatError, match="2040 GiB"):
            flatten(p, tmp_path / f"out.{fmt}", fmt)
        assert not (tmp_path / f"out.{fmt}").exists()
        assert not (tmp_path / f"out.{fmt}.part").exists()
