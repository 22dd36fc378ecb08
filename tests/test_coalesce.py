"""Flatten, coalesce, relink, compact and repair, checked against the model
(a plain buffer receiving the same writes), the fixtures and qemu-img."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _builders import build_chain, read_all
from _helpers import fixture_params, have_tool
from vhdcore.chain import Chain
from vhdcore.check import check_chain, check_file
from vhdcore.coalesce import checkpoint_path, coalesce, compact, flatten, repair
from vhdcore.disk import VhdFile, create_differencing, create_dynamic, create_fixed
from vhdcore.errors import (
    CheckpointError,
    CoalesceError,
    NoSpaceError,
    ParentMismatchError,
    VhdError,
    VhdTimeoutError,
)

MiB = 1024 * 1024


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def errors_of(problems):
    return [p for p in problems if p.severity == "error"]


# ------------------------------------------------------------------ flatten
@pytest.mark.parametrize("fmt", ["vhd", "fixed", "raw"])
@pytest.mark.parametrize("base", ["dynamic", "fixed"])
def test_flatten_matches_model(tmp_path, kernel_backend, fmt, base):
    mc = build_chain(tmp_path, size=7 * MiB + 512 * 9, depth=4, base=base, block_size=512 * 1024,
                     writes_per_layer=15, seed=11)
    out = tmp_path / f"flat.{fmt}"
    flatten(mc.leaf, out, fmt)
    data = out.read_bytes() if fmt == "raw" else read_all(out)
    assert data == bytes(mc.model)
    assert not (tmp_path / f"flat.{fmt}.part").exists()


def test_flatten_vhd_stores_no_zero_blocks_or_sectors(tmp_path):
    size = 8 * MiB
    create_dynamic(tmp_path / "b.vhd", size).close()
    with Chain.open(tmp_path / "b.vhd", writable=True) as c:
        c.write(0, b"\x01" * (2 * MiB))          # block 0: data
        c.write(2 * MiB, bytes(2 * MiB))          # block 1: allocated, all zero
        c.write(4 * MiB + 4096, b"\x02" * 512)    # block 2: one sector
    create_differencing(tmp_path / "c.vhd", tmp_path / "b.vhd").close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(0, bytes(512))                    # a zero sector over data: must stay zero
    res = flatten(tmp_path / "c.vhd", tmp_path / "f.vhd")
    with VhdFile.open(tmp_path / "f.vhd") as f:
        assert f.allocated_blocks().tolist() == [0, 2]
        assert f.allocated_bytes() == (4096 - 1) * 512 + 512
    assert res.blocks_stored == 2
    model = bytearray(size)
    model[512 : 2 * MiB] = b"\x01" * (2 * MiB - 512)
    model[4 * MiB + 4096 : 4 * MiB + 4608] = b"\x02" * 512
    assert read_all(tmp_path / "f.vhd") == bytes(model)


@pytest.mark.skipif(not have_tool("qemu-img"), reason="qemu-img not installed")
def test_flatten_output_read_by_qemu(tmp_path):
    mc = build_chain(tmp_path, size=9 * MiB, depth=3, writes_per_layer=20, seed=4)
    for fmt in ("vhd", "fixed"):
        out = tmp_path / f"f.{fmt}"
        flatten(mc.leaf, out, fmt)
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(out),
                        str(tmp_path / "q.raw")], check=True)
        assert (tmp_path / "q.raw").read_bytes() == bytes(mc.model)


def test_flatten_refuses_to_overwrite_a_chain_disk(tmp_path):
    mc = build_chain(tmp_path, size=2 * MiB, depth=2, writes_per_layer=2)
    before = sha(mc.paths[0])
    with pytest.raises(CoalesceError):
        flatten(mc.leaf, mc.paths[0])
    assert sha(mc.paths[0]) == before


# ------------------------------------------------------------------ fixtures
@pytest.mark.parametrize("fixture_chain", fixture_params(), indirect=True)
def test_fixture_flatten_and_coalesce(fixture_chain, tmp_path):
    leaf, meta = fixture_chain
    out = tmp_path / "flat.raw"
    flatten(leaf, out, "raw")
    assert sha(out) == meta["flat_sha256"]
    flatten(leaf, tmp_path / "flat.vhd", "vhd")
    assert hashlib.sha256(read_all(tmp_path / "flat.vhd")).hexdigest() == meta["flat_sha256"]
    if have_tool("qemu-img"):
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw",
                        str(tmp_path / "flat.vhd"), str(tmp_path / "q.raw")], check=True)
        assert sha(tmp_path / "q.raw") == meta["flat_sha256"]
    # coalesce the whole chain leaf-first down to the base
    names = meta["chain_base_to_leaf"]
    d = leaf.parent
    for i in range(len(names) - 1, 0, -1):
        coalesce(d / names[i])
        assert hashlib.sha256(read_all(d / names[i - 1])).hexdigest() == meta["flat_sha256"]
        assert errors_of(check_chain(d / names[i - 1])) == []


# ------------------------------------------------------------------ coalesce
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    depth=st.integers(2, 4),
    block_kib=st.sampled_from([512, 2048]),
    base=st.sampled_from(["dynamic", "fixed"]),
    writes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2 * 4096 - 1),
                              st.integers(1, 5000), st.sampled_from([0, 1, 2, 255])),
                    max_size=30),
    grow=st.booleans(),
)
def test_property_flatten_and_coalesce(tmp_path_factory, depth, block_kib, base, writes, grow):
    """read(flatten(chain)) == read(chain) and read(parent after coalesce) ==
    read(child before), on random sector-granular chains (tag byte per sector;
    runs crossing blocks, full blocks, zero writes over data, empty children,
    a child larger than its parent)."""
    tmp = tmp_path_factory.mktemp("p")
    nsec = 2 * 4096  # 4 MiB
    size = nsec * 512
    paths = [tmp / "d0.vhd"]
    if base == "fixed":
        create_fixed(paths[0], size).close()
    else:
        create_dynamic(paths[0], size, block_size=block_kib * 1024).close()
    for i in range(1, depth):
        paths.append(tmp / f"d{i}.vhd")
        big = size + (block_kib * 1024 + 4096 if grow and i == depth - 1 else 0)
        create_differencing(paths[i], paths[i - 1], size=big,
                            block_size=block_kib * 1024 if base == "fixed" else None).close()
    for layer, sector, count, tag in sorted(writes, key=lambda w: w[0] % depth):
        layer %= depth
        with Chain.open(paths[layer], writable=True) as c:
            vs = c.virtual_size // 512
            s = sector % vs
            n = min(count, vs - s)
            c.write(s * 512, bytes([tag]) * (n * 512))
    expected = read_all(paths[-1])
    flatten(paths[-1], tmp / "flat.vhd")
    assert read_all(tmp / "flat.vhd") == expected
    flatten(paths[-1], tmp / "flat.raw", "raw")
    assert (tmp / "flat.raw").read_bytes() == expected
    before_parent_view = read_all(paths[-1])
    coalesce(paths[-1])
    assert read_all(paths[-2]) == before_parent_view
    assert errors_of(check_file(paths[-2])) == []


def test_coalesce_middle_with_relink(tmp_path, kernel_backend):
    mc = build_chain(tmp_path, size=6 * MiB, depth=4, writes_per_layer=20, seed=21)
    mid_view = read_all(mc.paths[2])
    coalesce(mc.paths[2], relink_children=[mc.paths[3]])
    assert read_all(mc.paths[1]) == mid_view
    os.unlink(mc.paths[2])  # the caller removes the merged child
    assert read_all(mc.leaf) == bytes(mc.model)
    with Chain.open(mc.leaf) as c:
        assert [os.path.basename(ly.path) for ly in c.layers] == ["d3.vhd", "d1.vhd", "d0.vhd"]
    assert errors_of(check_chain(mc.leaf)) == []


def test_coalesce_skips_equal_sectors_and_zero_over_zero(tmp_path):
    create_dynamic(tmp_path / "p.vhd", 4 * MiB).close()
    with Chain.open(tmp_path / "p.vhd", writable=True) as c:
        c.write(0, b"\x07" * MiB)
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd").close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(0, b"\x07" * 4096)           # equal to the parent: skipped
        c.write(8192, bytes(4096))            # zero over data: must be written
        c.write(3 * MiB, bytes(4096))         # zero over an unallocated parent block
    res = coalesce(tmp_path / "c.vhd")
    assert res.sectors_skipped_equal == 16
    assert res.sectors_written == 8
    assert res.blocks_allocated == 0
    model = bytearray(4 * MiB)
    model[:MiB] = b"\x07" * MiB
    model[8192 : 8192 + 4096] = bytes(4096)
    assert read_all(tmp_path / "p.vhd") == bytes(model)


def test_coalesce_grows_parent(tmp_path):
    for base in ("dynamic", "fixed"):
        d = tmp_path / base
        d.mkdir()
        (create_fixed if base == "fixed" else create_dynamic)(d / "p.vhd", 3 * MiB).close()
        with Chain.open(d / "p.vhd", writable=True) as c:
            c.write(3 * MiB - 512, b"\x09" * 512)
        create_differencing(d / "c.vhd", d / "p.vhd", size=9 * MiB).close()
        with Chain.open(d / "c.vhd", writable=True) as c:
            c.write(8 * MiB, b"\x05" * 4096)
        want = read_all(d / "c.vhd")
        res = coalesce(d / "c.vhd")
        assert res.grown
        assert read_all(d / "p.vhd") == want
        with VhdFile.open(d / "p.vhd") as p:
            assert p.virtual_size == 9 * MiB
        assert errors_of(check_file(d / "p.vhd")) == []


def _snapshot_bytes(paths):
    return {str(p): open(p, "rb").read() for p in paths}


def test_coalesce_refusals_change_nothing(tmp_path):
    # not a differencing disk
    create_dynamic(tmp_path / "a.vhd", 2 * MiB).close()
    snap = _snapshot_bytes([tmp_path / "a.vhd"])
    with pytest.raises(CoalesceError):
        coalesce(tmp_path / "a.vhd")
    assert _snapshot_bytes([tmp_path / "a.vhd"]) == snap
    # a parent with two children
    create_differencing(tmp_path / "c1.vhd", tmp_path / "a.vhd").close()
    create_differencing(tmp_path / "c2.vhd", tmp_path / "a.vhd").close()
    with Chain.open(tmp_path / "c1.vhd", writable=True) as c:
        c.write(0, b"x" * 4096)
    files = [tmp_path / n for n in ("a.vhd", "c1.vhd", "c2.vhd")]
    snap = _snapshot_bytes(files)
    with pytest.raises(CoalesceError, match="other children"):
        coalesce(tmp_path / "c1.vhd")
    assert _snapshot_bytes(files) == snap
    assert not os.path.exists(checkpoint_path(tmp_path / "c1.vhd"))
    # a sibling named by the caller elsewhere
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.replace(tmp_path / "c2.vhd", other / "c2.vhd")
    with pytest.raises(CoalesceError, match="other children"):
        coalesce(tmp_path / "c1.vhd", siblings=[other / "c2.vhd"])


def test_coalesce_mismatched_block_size_refused(tmp_path):
    create_dynamic(tmp_path / "p.vhd", 4 * MiB, block_size=512 * 1024).close()
    create_dynamic(tmp_path / "q.vhd", 4 * MiB, block_size=2 * MiB).close()
    create_differencing(tmp_path / "c.vhd", tmp_path / "q.vhd").close()
    # point c at p by swapping files: same name, other block size, other UUID
    os.replace(tmp_path / "p.vhd", tmp_path / "q.vhd")
    snap = _snapshot_bytes([tmp_path / "q.vhd", tmp_path / "c.vhd"])
    with pytest.raises((ParentMismatchError, CoalesceError)):
        coalesce(tmp_path / "c.vhd")
    assert _snapshot_bytes([tmp_path / "q.vhd", tmp_path / "c.vhd"]) == snap


def test_coalesce_refuses_without_space(tmp_path, monkeypatch):
    # the child's blocks are all new to the (empty) parent: 4 x 2 MiB needed
    mc = build_chain(tmp_path, size=8 * MiB, depth=2, writes_per_layer=20, seed=2, base_writes=0)
    snap = _snapshot_bytes(mc.paths)

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(NoSpaceError) as ei:
        coalesce(mc.leaf)
    assert ei.value.needed >= 4 * (2 * MiB + 512) and ei.value.available == 1000
    assert "needs up to" in str(ei.value)
    assert _snapshot_bytes(mc.paths) == snap


def test_coalesce_timeout_then_resume(tmp_path):
    mc = build_chain(tmp_path, size=24 * MiB, depth=2, block_size=512 * 1024,
                     writes_per_layer=60, seed=8, max_len=400_000)
    want = read_all(mc.leaf)
    with pytest.raises(VhdTimeoutError, match="resume"):
        coalesce(mc.leaf, timeout=0)
    ck = json.loads(open(checkpoint_path(mc.leaf)).read())
    assert ck["stage"] == "merging"
    assert read_all(mc.leaf) == want
    assert errors_of(check_file(mc.paths[0])) == []
    # stop part-way through with tiny batches, then resume
    calls = {"n": 0}
    import time as _time

    real = _time.monotonic

    def fake_monotonic():
        calls["n"] += 1
        return real() + (1e6 if calls["n"] > 12 else 0)

    import vhdcore.coalesce as co

    orig = co.time.monotonic
    co.time.monotonic = fake_monotonic
    try:
        with pytest.raises(VhdTimeoutError):
            coalesce(mc.leaf, timeout=100, batch_blocks=2)
    finally:
        co.time.monotonic = orig
    ck = json.loads(open(checkpoint_path(mc.leaf)).read())
    assert ck["next_block"] > 0
    assert read_all(mc.leaf) == want
    res = coalesce(mc.leaf)
    assert res.resumed
    assert read_all(mc.paths[0]) == want
    assert not os.path.exists(checkpoint_path(mc.leaf))


def test_resume_refuses_changed_or_foreign_files(tmp_path):
    mc = build_chain(tmp_path, size=8 * MiB, depth=2, writes_per_layer=20, seed=9)
    with pytest.raises(VhdTimeoutError):
        coalesce(mc.leaf, timeout=0)
    # the child changed meanwhile
    with Chain.open(mc.leaf, writable=True) as c:
        c.write(7 * MiB, b"changed!" * 64)
    with pytest.raises(CheckpointError, match="changed"):
        coalesce(mc.leaf)
    # a checkpoint of other files
    ck = json.loads(open(checkpoint_path(mc.leaf)).read())
    ck["child_uuid"] = "00000000-0000-0000-0000-000000000000"
    open(checkpoint_path(mc.leaf), "w").write(json.dumps(ck))
    with pytest.raises(CheckpointError, match="belongs to"):
        coalesce(mc.leaf)
    open(checkpoint_path(mc.leaf), "w").write("{not json")
    with pytest.raises(CheckpointError):
        coalesce(mc.leaf)


# ------------------------------------------------------------------ compact / repair
def test_compact_dynamic_and_differencing(tmp_path):
    create_dynamic(tmp_path / "d.vhd", 8 * MiB).close()
    with Chain.open(tmp_path / "d.vhd", writable=True) as c:
        c.write(0, b"a" * MiB)
        c.write(4 * MiB, bytes(2 * MiB))  # an allocated all-zero block
    want = read_all(tmp_path / "d.vhd")
    compact(tmp_path / "d.vhd", tmp_path / "d2.vhd")
    assert read_all(tmp_path / "d2.vhd") == want
    with VhdFile.open(tmp_path / "d2.vhd") as v:
        assert v.allocated_blocks().tolist() == [0]
    assert os.path.getsize(tmp_path / "d2.vhd") < os.path.getsize(tmp_path / "d.vhd")
    # differencing: zero sectors override the parent and stay
    create_differencing(tmp_path / "c.vhd", tmp_path / "d.vhd").close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(0, bytes(4096))
        c.write(6 * MiB, b"z" * 512)
    want = read_all(tmp_path / "c.vhd")
    compact(tmp_path / "c.vhd", tmp_path / "c2.vhd")
    assert read_all(tmp_path / "c2.vhd") == want
    assert errors_of(check_chain(tmp_path / "c2.vhd")) == []


def test_repair_restores_primary_footer(tmp_path):
    mc = build_chain(tmp_path, size=6 * MiB, depth=1, writes_per_layer=10, seed=1)
    want = read_all(mc.leaf)
    p = mc.leaf
    size = os.path.getsize(p)
    with open(p, "r+b") as f:  # a torn write: garbage over the footer and a partial tail
        f.seek(size - 512)
        f.write(b"\xee" * 512 + b"\x11" * 1000)
    assert any("primary footer" in pr.message for pr in check_file(p))
    assert read_all(p) == want  # the copy at offset 0 is used for reading
    assert repair(p) is True
    assert errors_of(check_file(p)) == []
    assert read_all(p) == want
    assert os.path.getsize(p) == size
    assert repair(p) is False
