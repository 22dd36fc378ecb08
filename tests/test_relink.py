"""Grandchildren, relink and parents found again (issue 13, bugs 5 and 6;
Windows chains; confinement that cannot be raced)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from _builders import build_chain, read_all
from _mutate import rewrite_parent
from vhdcore import relink
from vhdcore.chain import Chain
from vhdcore.check import check_chain
from vhdcore.coalesce import coalesce, compact
from vhdcore.disk import VhdFile, create_differencing, create_dynamic
from vhdcore.errors import (
    CoalesceError,
    ConfinementError,
    ParentMismatchError,
    ParentNotFoundError,
    VhdError,
)
from vhdcore.format import decode_locator_path

MiB = 1024 * 1024
KiB = 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or os.path.join(ROOT, "src"))
    return subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def errors_of(problems):
    return [p for p in problems if p.severity == "error"]


def snap(*paths):
    return {str(p): open(p, "rb").read() for p in paths}


# ------------------------------------------------------------ bug 5
def test_coalesce_relinks_grandchildren_it_finds(tmp_path):
    """Without --relink, the child's children in its directory are relinked
    (and reported), so removing the child strands nobody."""
    mc = build_chain(tmp_path, size=4 * MiB, depth=3, writes_per_layer=10, seed=3)
    d0, d1, d2 = mc.paths
    res = coalesce(d1)
    assert [os.path.realpath(p) for p in res.relinked] == [os.path.realpath(d2)]
    os.unlink(d1)
    assert read_all(d2) == bytes(mc.model)
    assert errors_of(check_chain(d2)) == []


def test_coalesce_relinks_grandchildren_in_allowed_dirs(tmp_path):
    base_dir = tmp_path / "base"
    kids = tmp_path / "kids"
    base_dir.mkdir()
    kids.mkdir()
    create_dynamic(base_dir / "b.vhd", 2 * MiB, block_size=512 * KiB).close()
    create_differencing(base_dir / "m.vhd", base_dir / "b.vhd").close()
    with Chain.open(base_dir / "m.vhd", writable=True) as c:
        c.write(4096, b"m" * 8192)
    create_differencing(kids / "g.vhd", base_dir / "m.vhd").close()
    with Chain.open(kids / "g.vhd", writable=True, allowed_dirs=[kids, base_dir]) as c:
        c.write(0, b"g" * 5000)
    want = Chain.open(kids / "g.vhd", allowed_dirs=[kids, base_dir])
    want_bytes = want.read(0, want.virtual_size)
    want.close()
    r = cli("coalesce", base_dir / "m.vhd", "--allow-dir", kids, "-q")
    assert r.returncode == 0, r.stderr
    assert "relinked" in r.stdout and "g.vhd" in r.stdout
    os.unlink(base_dir / "m.vhd")
    with Chain.open(kids / "g.vhd", allowed_dirs=[kids, base_dir]) as c:
        assert c.read(0, c.virtual_size) == want_bytes
        assert [os.path.basename(ly.path) for ly in c.layers] == ["g.vhd", "b.vhd"]


def test_coalesce_sibling_in_allowed_dir_refused(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    create_dynamic(a / "p.vhd", 2 * MiB).close()
    create_differencing(a / "c1.vhd", a / "p.vhd").close()
    create_differencing(b / "c2.vhd", a / "p.vhd").close()
    with Chain.open(a / "c1.vhd", writable=True) as c:
        c.write(0, b"x" * 4096)
    before = snap(a / "p.vhd", a / "c1.vhd", b / "c2.vhd")
    with pytest.raises(CoalesceError, match="other children"):
        coalesce(a / "c1.vhd", chain_options={"allowed_dirs": [a, b]})
    assert snap(a / "p.vhd", a / "c1.vhd", b / "c2.vhd") == before


def test_coalesce_refuses_a_named_disk_that_is_no_child(tmp_path):
    mc = build_chain(tmp_path, size=2 * MiB, depth=2, writes_per_layer=3)
    other = tmp_path / "other"
    other.mkdir()
    create_dynamic(other / "x.vhd", 2 * MiB).close()
    create_differencing(other / "y.vhd", other / "x.vhd").close()
    before = snap(*mc.paths, other / "y.vhd")
    with pytest.raises(CoalesceError, match="not a child"):
        coalesce(mc.leaf, relink_children=[other / "y.vhd"])
    assert snap(*mc.paths, other / "y.vhd") == before


def test_coalesce_rechecks_the_parent_it_reopens(tmp_path, monkeypatch):
    mc = build_chain(tmp_path, size=2 * MiB, depth=2, writes_per_layer=3)
    imposter = tmp_path / "imposter.vhd"
    create_dynamic(imposter, 2 * MiB).close()
    import vhdcore.coalesce as co

    real_open = VhdFile.open

    def swapping_open(path, *, writable=False):
        if writable and os.path.basename(os.fspath(path)) == "d0.vhd":
            os.replace(imposter, path)  # swapped after the chain was resolved
        return real_open(path, writable=writable)

    monkeypatch.setattr(co.VhdFile, "open", staticmethod(swapping_open))
    before = open(mc.paths[0], "rb").read()
    with pytest.raises(ParentMismatchError):
        coalesce(mc.leaf)
    monkeypatch.undo()
    assert open(mc.paths[0], "rb").read() != before  # the imposter, untouched:
    with VhdFile.open(mc.paths[0]) as v:
        assert v.allocated_blocks().size == 0


# ------------------------------------------------------------ relink DISK --parent NEW
def test_relink_to_a_moved_parent_same_uuid(tmp_path):
    mc = build_chain(tmp_path, size=3 * MiB, depth=2, writes_per_layer=6, seed=4)
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(mc.paths[0], moved / "renamed.vhd")
    with pytest.raises(ParentNotFoundError):
        Chain.open(mc.leaf)
    res = relink(mc.leaf, moved / "renamed.vhd")
    assert res.reason == "uuid" and res.written
    with Chain.open(mc.leaf, allowed_dirs=[tmp_path, moved]) as c:
        assert c.read(0, c.virtual_size) == bytes(mc.model)
    assert relink(mc.leaf, moved / "renamed.vhd").written is False  # repeated: no change


def test_relink_to_a_coalesced_parent_by_content(tmp_path):
    mc = build_chain(tmp_path, size=3 * MiB, depth=3, writes_per_layer=6, seed=5)
    d0, d1, d2 = mc.paths
    # merge d1 into d0 but tell coalesce about no grandchild: move d2 away first
    away = tmp_path / "away"
    away.mkdir()
    os.replace(d2, away / "d2.vhd")
    rewrite_parent(away / "d2.vhd", locators=[(b"W2ru", "..\\d1.vhd")], name="d1.vhd")
    with Chain.open(away / "d2.vhd", allowed_dirs=[tmp_path, away]) as c:
        assert c.read(0, c.virtual_size) == bytes(mc.model)
    coalesce(d1)
    r = cli("relink", away / "d2.vhd", "--parent", d0, "--allow-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "content" in r.stdout
    os.unlink(d1)
    with Chain.open(away / "d2.vhd", allowed_dirs=[tmp_path, away]) as c:
        assert c.read(0, c.virtual_size) == bytes(mc.model)


def test_relink_refuses_another_disk(tmp_path):
    mc = build_chain(tmp_path, size=2 * MiB, depth=2, writes_per_layer=6, seed=6)
    other = tmp_path / "other.vhd"
    create_dynamic(other, 2 * MiB).close()
    with Chain.open(other, writable=True) as c:
        c.write(0, b"different" * 100)
    before = snap(mc.leaf)
    with pytest.raises(ParentMismatchError, match="does not read like"):
        relink(mc.leaf, other)
    r = cli("relink", mc.leaf, "--parent", other)
    assert r.returncode == 1 and "does not read like" in r.stderr
    # the current parent gone: nothing to compare with, refused
    os.unlink(mc.paths[0])
    with pytest.raises(ParentMismatchError, match="cannot be opened"):
        relink(mc.leaf, other)
    assert snap(mc.leaf) == before


# ------------------------------------------------------------ bug 6
def test_compact_differencing_into_another_directory(tmp_path):
    mc = build_chain(tmp_path, size=3 * MiB, depth=2, writes_per_layer=8, seed=7)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    compact(mc.leaf, out_dir / "c.vhd")
    with Chain.open(out_dir / "c.vhd", allowed_dirs=[out_dir, tmp_path]) as c:
        assert c.read(0, c.virtual_size) == bytes(mc.model)
    with VhdFile.open(out_dir / "c.vhd") as v:
        locs = dict(v.parent_locators())
    assert locs["W2ru"].replace("\\", "/") == "../d0.vhd"
    assert locs["W2ku"].replace("\\", "/") == str(mc.paths[0].resolve())


# ------------------------------------------------------------ writer
def test_new_differencing_disks_get_absolute_w2ku_and_relative_w2ru(tmp_path):
    create_dynamic(tmp_path / "p.vhd", MiB).close()
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd").close()
    with VhdFile.open(tmp_path / "c.vhd") as v:
        locs = dict(v.parent_locators())
    assert locs["W2ru"] == ".\\p.vhd"
    assert locs["W2ku"] == str((tmp_path / "p.vhd").resolve()).replace("/", "\\")
    assert locs["MacX"] == "./p.vhd"


# ------------------------------------------------------------ Windows chains
def _windows_child(tmp_path, parent_dir=None):
    pdir = parent_dir or tmp_path
    pdir.mkdir(exist_ok=True)
    create_dynamic(pdir / "base.vhd", 2 * MiB, block_size=512 * KiB).close()
    with Chain.open(pdir / "base.vhd", writable=True) as c:
        c.write(0, b"B" * 3000)
    create_differencing(tmp_path / "c.vhd", pdir / "base.vhd").close()
    with Chain.open(tmp_path / "c.vhd", writable=True,
                    allowed_dirs=[tmp_path, pdir]) as c:
        c.write(1024, b"C" * 1000)
    # as a Hyper-V host leaves it: only an absolute Windows path
    rewrite_parent(tmp_path / "c.vhd", locators=[(b"W2ku", "C:\\VMs\\base.vhd")],
                   name="C:\\VMs\\base.vhd")
    want = bytearray(2 * MiB)
    want[:3000] = b"B" * 3000
    want[1024:2024] = b"C" * 1000
    return tmp_path / "c.vhd", bytes(want)


def test_windows_parent_found_by_base_name_and_uuid(tmp_path):
    c, want = _windows_child(tmp_path)
    with Chain.open(c) as ch:
        assert ch.read(0, ch.virtual_size) == want
    # in an allowed directory
    d = tmp_path / "w"
    d.mkdir()
    c2, want2 = _windows_child(d, parent_dir=d / "parents")
    with pytest.raises(ParentNotFoundError):
        Chain.open(c2)
    with Chain.open(c2, allowed_dirs=[d, d / "parents"]) as ch:
        assert ch.read(0, ch.virtual_size) == want2


def test_windows_parent_with_other_uuid_refused(tmp_path):
    c, _ = _windows_child(tmp_path)
    os.unlink(tmp_path / "base.vhd")
    create_dynamic(tmp_path / "base.vhd", 2 * MiB, block_size=512 * KiB).close()
    with pytest.raises(ParentNotFoundError, match="UUID"):
        Chain.open(c)


def test_explicit_parent_option(tmp_path):
    c, want = _windows_child(tmp_path)
    os.replace(tmp_path / "base.vhd", tmp_path / "other-name.vhd")
    with pytest.raises(ParentNotFoundError):
        Chain.open(c)
    with Chain.open(c, parent=tmp_path / "other-name.vhd") as ch:
        assert ch.read(0, ch.virtual_size) == want
    r = cli("cat", c, "--parent", tmp_path / "other-name.vhd", "-o", tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.raw").read_bytes() == want
    for args in (("check", c, "--chain"), ("chain", c), ("estimate", c),
                 ("flatten", c, tmp_path / "f.vhd", "-q")):
        r = cli(*args, "--parent", tmp_path / "other-name.vhd")
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert read_all(tmp_path / "f.vhd") == want
    # compact with --parent: the copy's locators name the parent
    r = cli("compact", c, tmp_path / "k.vhd", "-q", "--parent", tmp_path / "other-name.vhd")
    assert r.returncode == 0, r.stderr
    assert read_all(tmp_path / "k.vhd") == want
    # a wrong explicit parent is refused by UUID
    create_dynamic(tmp_path / "wrong.vhd", 2 * MiB, block_size=512 * KiB).close()
    with pytest.raises(ParentMismatchError):
        Chain.open(c, parent=tmp_path / "wrong.vhd")
    r = cli("cat", c, "--parent", tmp_path / "wrong.vhd", "-o", tmp_path / "x.raw")
    assert r.returncode == 1 and "UUID" in r.stderr
    # coalesce through the explicit parent, then the parent reads as the child did
    # (the compacted copy is another child of the parent: refused while it exists)
    r = cli("coalesce", c, "-q", "--parent", tmp_path / "other-name.vhd")
    assert r.returncode == 1 and "other children" in r.stderr
    os.unlink(tmp_path / "k.vhd")
    r = cli("coalesce", c, "-q", "--parent", tmp_path / "other-name.vhd")
    assert r.returncode == 0, r.stderr
    assert read_all(tmp_path / "other-name.vhd") == want


# ------------------------------------------------------------ confinement race
def test_parent_swapped_for_a_symlink_after_the_check_is_refused(tmp_path, monkeypatch):
    """The check (realpath) sees a regular file inside the allowed directory;
    by the time it is opened it is a symlink to a file outside.  The open
    (O_NOFOLLOW, relative to the directory fd) must refuse it."""
    inside = tmp_path / "in"
    outside = tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    create_dynamic(inside / "p.vhd", MiB).close()
    create_differencing(inside / "c.vhd", inside / "p.vhd").close()
    shutil.copy(inside / "p.vhd", outside / "p.vhd")
    os.unlink(inside / "p.vhd")
    os.symlink(outside / "p.vhd", inside / "p.vhd")
    # the state at check time: realpath says it is the file inside
    monkeypatch.setattr(os.path, "realpath", lambda p, **k: os.path.abspath(p))
    with pytest.raises(ConfinementError):
        Chain.open(inside / "c.vhd")
