"""Resource bounds: sizes claimed by a file are checked against the file's
size and sane maxima before anything is allocated.  A tiny file claiming a
2 TiB disk, 2^32 BAT entries or a 4 GiB parent locator fails fast in a
process whose address space is capped a little above what it already uses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _mutate import craft_vhd

from vhdcore.disk import VhdFile
from vhdcore.errors import FormatError, NoSpaceError, VhdError
from vhdcore.format import FOOTER_SIZE, HEADER_SIZE, MAX_VIRTUAL_SIZE, ParentLocator

HERE = Path(__file__).resolve().parent
KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
U64_LAST_SECTOR = (1 << 64) - 512
BAT_AT = FOOTER_SIZE + HEADER_SIZE

RUNNER = r"""
import json, os, sys, time, tracemalloc
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _mutate import run_targets, limit_address_space, TARGETS, craft_vhd
import vhdcore._io as _io
_io.os.fsync = lambda fd: None
cases = json.loads(sys.argv[2])
# warm up: imports, merge threads, allocator arenas
w = Path(cases[0]["dir"]).parent / "warmup"
w.mkdir()
(w / "w.vhd").write_bytes(craft_vhd(size=64 * 1024, block_size=4096))
run_targets(w, "w.vhd", TARGETS)
limit_address_space(int(sys.argv[3]))
out = {}
for case in cases:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        res = run_targets(Path(case["dir"]), case["leaf"], TARGETS).results
    except BaseException as exc:
        res = {"failed": f"{type(exc).__name__}: {exc}"}
    dt = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out[case["name"]] = {"results": res, "seconds": dt, "peak": peak}
print(json.dumps(out))
"""


def _run_capped(cases: list[dict], extra: int) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(HERE), json.dumps(cases), str(extra)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loc(code: bytes, space: int, length: int, offset: int) -> ParentLocator:
    return ParentLocator(code=code, data_space=space, data_length=length, data_offset=offset)


#: name -> the bytes of a file that lies about a size or an offset
HOSTILE = {
    # a 1 KiB fixed disk claiming 2 TiB
    "fixed-2tib": lambda: craft_vhd(size=2 * TiB, disk_type=2, body=512),
    # dynamic disks claiming 2 TiB in 2.5 KiB: the BAT would need 4 MiB
    "dynamic-2tib": lambda: craft_vhd(size=2 * TiB),
    "dynamic-2tib-256m-blocks": lambda: craft_vhd(size=2 * TiB, block_size=256 * MiB,
                                                  max_table_entries=0xFFFFFFFF),
    # 2^32 BAT entries needed (16 TiB of 4 KiB blocks)
    "bat-2^32-entries": lambda: craft_vhd(size=(1 << 32) * 4 * KiB, block_size=4 * KiB,
                                          max_table_entries=0xFFFFFFFF),
    # over the supported maximum virtual size
    "over-max-virtual-size": lambda: craft_vhd(size=MAX_VIRTUAL_SIZE + 512, block_size=256 * MiB),
    "max-u64-virtual-size": lambda: craft_vhd(size=(1 << 64) - 512),
    # structures placed at the end of the 64-bit offset space
    "header-at-2^64": lambda: craft_vhd(size=64 * KiB, data_offset=U64_LAST_SECTOR),
    "bat-at-2^64": lambda: craft_vhd(size=64 * KiB, table_offset=U64_LAST_SECTOR),
    # a differencing disk whose parent locator claims 4 GiB of data
    "locator-4gib": lambda: craft_vhd(
        size=64 * KiB, disk_type=4, block_size=4 * KiB, parent_name="",
        locators=[_loc(b"W2ru", 0xFFFFFFFF, 0xFFFFFFFF, 2048)],
        locator_data=[(2048, "p.vhd".encode("utf-16-le"))]),
    "locator-at-2^64": lambda: craft_vhd(
        size=64 * KiB, disk_type=4, block_size=4 * KiB, parent_name="",
        locators=[_loc(b"MacX", 512, 16, U64_LAST_SECTOR)]),
    # a BAT entry at the last 32-bit sector
    "bat-entry-2tib": lambda: craft_vhd(size=64 * KiB, block_size=4 * KiB, bat=[0xFFFFFFFE]),
}


def test_hostile_sizes_fail_fast_with_small_memory(tmp_path):
    cases = []
    for name, make in HOSTILE.items():
        d = tmp_path / name
        d.mkdir()
        data = make()
        assert len(data) <= 4 * KiB, (name, len(data))
        (d / "leaf.vhd").write_bytes(data)
        cases.append({"name": name, "dir": str(d), "leaf": "leaf.vhd"})
    # 256 MiB of address space beyond the warmed-up interpreter
    res = _run_capped(cases, 256 * MiB)
    for name, r in res.items():
        assert "failed" not in r["results"], (name, r)
        if not name.startswith("locator"):  # info shows a damaged locator, as data
            assert r["results"]["info"] != "ok", (name, r)  # refused: the file lies
        for target in ("cat", "flatten", "coalesce"):
            assert r["results"][target] != "ok", (name, target, r)
        assert r["seconds"] < 10, (name, r)
        assert r["peak"] < 8 * MiB, (name, r)


def test_valid_tiny_files_with_huge_sparse_disks(tmp_path):
    """Legal, tiny and huge: a 2040 GiB disk (the largest VHD allows) of
    256 MiB blocks with nothing stored (a 35 KiB file), and a BAT
    preallocated for 2^32-1 entries of which the virtual size needs 16.
    Reading, checking and flattening them stays small; only one block-sized
    buffer is ever needed.  (A 2 TiB one reads, but flatten refuses to write
    a VHD past 2040 GiB: tests/test_edges.py.)"""
    cases = []
    d = tmp_path / "sparse-2tib"
    d.mkdir()
    (d / "leaf.vhd").write_bytes(craft_vhd(size=2040 * GiB, block_size=256 * MiB,
                                           bat_bytes=32 * KiB))
    cases.append({"name": "sparse-2tib", "dir": str(d), "leaf": "leaf.vhd"})
    d = tmp_path / "preallocated-bat"
    d.mkdir()
    (d / "leaf.vhd").write_bytes(craft_vhd(size=64 * KiB, block_size=4 * KiB,
                                           max_table_entries=0xFFFFFFFF))
    cases.append({"name": "preallocated-bat", "dir": str(d), "leaf": "leaf.vhd"})
    res = _run_capped(cases, 768 * MiB)
    for name, r in res.items():
        assert "failed" not in r["results"], (name, r)
        for target in ("info", "check", "cat", "flatten"):
            assert r["results"][target] == "ok", (name, target, r)
        assert r["results"]["coalesce"] == "CoalesceError"  # not differencing
        assert r["seconds"] < 20, (name, r)
        assert r["peak"] < 16 * MiB, (name, r)


def test_child_claiming_2tib_over_small_parent_needs_space(tmp_path, monkeypatch):
    """A 35 KiB differencing disk of 2040 GiB (the largest VHD allows) over a
    64 KiB fixed parent: coalescing would grow the parent to 2040 GiB.  The
    free space needed is computed first and the refusal says how much.  One
    of 2 TiB is refused before that: no VHD may grow past 2040 GiB."""
    import shutil

    from vhdcore.coalesce import coalesce
    from vhdcore.disk import create_fixed

    create_fixed(tmp_path / "p.vhd", 64 * KiB).close()
    with VhdFile.open(tmp_path / "p.vhd") as p:
        puuid = p.footer.unique_id
    blob = "p.vhd".encode("utf-16-le")
    at = BAT_AT + 32 * KiB
    def child(size):
        (tmp_path / "c.vhd").write_bytes(craft_vhd(
            size=size, disk_type=4, block_size=256 * MiB, bat_bytes=32 * KiB,
            parent_uuid=puuid, parent_name="p.vhd",
            locators=[_loc(b"W2ru", 512, len(blob), at)], locator_data=[(at, blob)]))

    before = (tmp_path / "p.vhd").read_bytes()

    class Usage:
        free = 10 * GiB

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    child(2 * TiB)
    with pytest.raises(FormatError, match="2040 GiB"):
        coalesce(tmp_path / "c.vhd")
    assert (tmp_path / "p.vhd").read_bytes() == before
    child(2040 * GiB)
    with pytest.raises(NoSpaceError) as ei:
        coalesce(tmp_path / "c.vhd")
    assert ei.value.needed >= 2040 * GiB - 64 * KiB
    assert ei.value.available == 10 * GiB
    assert str(ei.value.needed) in str(ei.value) and str(10 * GiB) in str(ei.value)
    assert (tmp_path / "p.vhd").read_bytes() == before


def test_locator_regions_past_the_file_refuse_writing(tmp_path):
    """A dynamic base whose (unused by readers) locator entry claims data at
    the end of the 64-bit offset space reads fine, but nothing may be written
    into it: new blocks would be placed past that region."""
    (tmp_path / "p.vhd").write_bytes(craft_vhd(
        size=64 * KiB, block_size=4 * KiB, locators=[_loc(b"W2ru", 512, 8, U64_LAST_SECTOR)]))
    with VhdFile.open(tmp_path / "p.vhd") as v:
        assert v.virtual_size == 64 * KiB
    with pytest.raises(FormatError, match="runs past the footer"):
        VhdFile.open(tmp_path / "p.vhd", writable=True)


def test_overlapping_blocks_refuse_writing(tmp_path):
    """A BAT entry pointing at the dynamic header: reading is deterministic,
    writing would overwrite the header (fuzz finding)."""
    (tmp_path / "p.vhd").write_bytes(craft_vhd(size=64 * KiB, block_size=4 * KiB, bat=[1],
                                               body=8 * KiB))
    with VhdFile.open(tmp_path / "p.vhd") as v:
        v.read(0, 4096)
    with pytest.raises(FormatError, match="overlaps the footer copy|overlaps the dynamic header"):
        VhdFile.open(tmp_path / "p.vhd", writable=True)


def test_footer_size_limits_are_checked_before_allocation():
    from vhdcore.format import Footer

    raw = bytearray(Footer.new(3, 64 * KiB).pack())
    raw[48:56] = ((1 << 64) - 1).to_bytes(8, "big")
    from _mutate import fix_checksums

    fix_checksums(raw)
    with pytest.raises(VhdError, match="maximum"):
        Footer.parse(bytes(raw))
