"""Parent resolution is confined: absolute paths, ``..`` escapes, symlinks
leading out of the allowed directories, devices and FIFOs are refused
(ConfinementError) unless explicitly allowed, a FIFO never blocks, and
chains that are too deep or loop are refused before any block is read."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _builders import read_all
from _mutate import rewrite_parent, uuid_of

from vhdcore.chain import Chain
from vhdcore.check import check_chain, check_file
from vhdcore.coalesce import coalesce, flatten
from vhdcore.disk import VhdFile, create_differencing, create_dynamic
from vhdcore.errors import (
    ChainCycleError,
    ChainDepthError,
    ConfinementError,
    FormatError,
    ParentMismatchError,
    ParentNotFoundError,
    VhdError,
)

KiB = 1024
SIZE = 64 * KiB
BS = 4 * KiB
CODES = (b"W2ru", b"W2ku", b"MacX")


def _pair(d: Path, parent_name: str = "p.vhd", child_name: str = "c.vhd") -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    p = d / parent_name
    create_dynamic(p, SIZE, block_size=BS).close()
    with Chain.open(p, writable=True) as c:
        c.write(0, b"parent" * 100)
    c = d / child_name
    create_differencing(c, p).close()
    with Chain.open(c, writable=True) as ch:
        ch.write(8 * KiB, b"child" * 100)
    return p, c


def _point(child: Path, path: str, *, name: str = "", uuid: bytes | None = None) -> None:
    """Every locator and the parent name say ``path`` (stored verbatim)."""
    rewrite_parent(child, locators=[(code, path) for code in CODES], name=name,
                   parent_uuid=uuid)


def _snapshot(*paths: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in paths}


@pytest.fixture
def no_block_reads(monkeypatch):
    """Call it once the files are built: from then on, reading any block
    data or bitmap fails the test."""
    def refuse(self, block):  # pragma: no cover - only runs on a bug
        raise AssertionError(f"block {block} of {self.path} was read")

    def arm() -> None:
        monkeypatch.setattr(VhdFile, "block_views", refuse)
        monkeypatch.setattr(Chain, "merge_block", lambda self, *a, **k: refuse(self.leaf, a[0]))

    return arm


# ------------------------------------------------------------------ absolute paths
def test_absolute_parent_path_refused_unless_allowed(tmp_path):
    p, c = _pair(tmp_path)
    _point(c, str(p.resolve()))
    with pytest.raises(ConfinementError, match="absolute"):
        Chain.open(c)
    # allowed: still confined to the allowed directories
    with Chain.open(c, allow_absolute=True) as ch:
        assert len(ch) == 2
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ConfinementError, match="outside"):
        Chain.open(c, allow_absolute=True, allowed_dirs=[other])


def test_absolute_parent_name_refused(tmp_path):
    p, c = _pair(tmp_path)
    rewrite_parent(c, locators=[], name=str(p.resolve()))
    with pytest.raises(ConfinementError, match="absolute"):
        Chain.open(c)


def test_windows_absolute_path_never_followed(tmp_path):
    # the path itself is never followed; only its base name is looked for in
    # the allowed directories (and accepted by UUID: tests/test_windows.py)
    _, c = _pair(tmp_path)
    _point(c, "C:\\images\\q.vhd", name="\\\\server\\share\\q.vhd")
    images = tmp_path / "C:" / "images"
    images.mkdir(parents=True)
    shutil.copy(tmp_path / "p.vhd", images / "q.vhd")
    with pytest.raises((ParentNotFoundError, ConfinementError)):
        Chain.open(c, allow_absolute=True)


# ------------------------------------------------------------------ .. escapes
@pytest.mark.parametrize("how", ["locators", "name"])
def test_dotdot_escape_refused(tmp_path, how):
    other = tmp_path / "other"
    p, _ = _pair(other)
    leafdir = tmp_path / "leaf"
    leafdir.mkdir()
    c = leafdir / "c.vhd"
    create_differencing(c, p).close()  # records "../other/p.vhd"
    if how == "name":
        rewrite_parent(c, locators=[], name="../other/p.vhd")
    before = _snapshot(p, c)
    with pytest.raises(ConfinementError, match="outside the allowed"):
        Chain.open(c)
    for fn in (lambda: flatten(c, tmp_path / "flat.vhd"), lambda: coalesce(c)):
        with pytest.raises(ConfinementError):
            fn()
    assert _snapshot(p, c) == before
    assert not (tmp_path / "flat.vhd").exists()
    problems = check_chain(c)
    assert any("outside the allowed" in pr.message for pr in problems)
    # explicitly allowed
    with Chain.open(c, allowed_dirs=[leafdir, other]) as ch:
        assert len(ch) == 2


def test_dotdot_that_stays_inside_is_fine(tmp_path):
    _, c = _pair(tmp_path / "d")
    _point(c, "../d/./p.vhd")
    with Chain.open(c) as ch:
        assert len(ch) == 2


def test_deep_dotdot_is_refused(tmp_path):
    p, _ = _pair(tmp_path / "other")
    leafdir = tmp_path / "a" / "b"
    leafdir.mkdir(parents=True)
    c = leafdir / "c.vhd"
    create_differencing(c, p).close()
    _point(c, "../" * 40 + str(p.resolve()).lstrip("/"), name="../" * 40)
    with pytest.raises(ConfinementError, match="outside"):
        Chain.open(c)


# ------------------------------------------------------------------ symlinks
def test_symlink_out_of_allowed_dirs_refused(tmp_path):
    other = tmp_path / "other"
    p, _ = _pair(other)
    leafdir = tmp_path / "leaf"
    leafdir.mkdir()
    c = leafdir / "c.vhd"
    create_differencing(c, p).close()
    os.symlink(p, leafdir / "link.vhd")
    _point(c, "link.vhd", name="link.vhd")
    with pytest.raises(ConfinementError, match="outside"):
        Chain.open(c)
    with Chain.open(c, allowed_dirs=[leafdir, other]) as ch:
        assert len(ch) == 2


def test_symlinked_directory_out_of_allowed_dirs_refused(tmp_path):
    other = tmp_path / "other"
    p, _ = _pair(other)
    leafdir = tmp_path / "leaf"
    leafdir.mkdir()
    os.symlink(other, leafdir / "sub")
    c = leafdir / "c.vhd"
    create_differencing(c, p).close()
    _point(c, "sub/p.vhd", name="sub/p.vhd")
    with pytest.raises(ConfinementError, match="outside"):
        Chain.open(c)


def test_symlink_inside_allowed_dir_is_fine(tmp_path):
    _, c = _pair(tmp_path)
    os.symlink("p.vhd", tmp_path / "alias.vhd")
    _point(c, "alias.vhd", name="alias.vhd")
    assert read_all(c)[8 * KiB : 8 * KiB + 5] == b"child"


def test_leaf_directory_is_a_symlink(tmp_path):
    """The allowed directory is the leaf's real directory."""
    _pair(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "view")
    with Chain.open(tmp_path / "view" / "c.vhd") as ch:
        assert len(ch) == 2


# ------------------------------------------------------------------ devices and FIFOs
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device_parent_refused(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"{device} absent")
    _, c = _pair(tmp_path)
    _point(c, device)
    with pytest.raises(ConfinementError):
        Chain.open(c)
    with pytest.raises(ConfinementError, match="not a regular file"):
        Chain.open(c, allow_absolute=True, allowed_dirs=[tmp_path, os.path.dirname(device)])
    # explicitly allowed: the device is opened, found not to be a VHD, and refused fast
    with pytest.raises(VhdError):
        Chain.open(c, allow_absolute=True, allow_special=True,
                   allowed_dirs=[tmp_path, os.path.dirname(device)])
    # a symlink to it in the allowed directory
    os.symlink(device, tmp_path / "dev.vhd")
    _point(c, "dev.vhd", name="dev.vhd")
    with pytest.raises(ConfinementError):
        Chain.open(c)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device_as_leaf(device):
    if not os.path.exists(device):
        pytest.skip(f"{device} absent")
    with pytest.raises(ConfinementError):
        Chain.open(device)
    with pytest.raises(VhdError):
        Chain.open(device, allow_special=True)
    with pytest.raises(FormatError, match="not a regular file"):
        VhdFile.open(device)
    assert check_file(device)[0].severity == "error"


FIFO_SCRIPT = textwrap.dedent("""
    import sys
    from vhdcore.chain import Chain
    from vhdcore.check import check_chain, check_file
    from vhdcore.disk import VhdFile
    from vhdcore.errors import ConfinementError, VhdError
    child, fifo = sys.argv[1], sys.argv[2]
    try:
        Chain.open(child)
        raise SystemExit("opened a FIFO parent")
    except ConfinementError:
        pass
    for fn in (lambda: Chain.open(child, allow_special=True), lambda: VhdFile.open(fifo),
               lambda: Chain.open(fifo, allow_special=True)):
        try:
            fn()
            raise SystemExit("opened a FIFO")
        except VhdError:
            pass
    try:
        Chain.open(fifo)
        raise SystemExit("opened a FIFO leaf")
    except ConfinementError:
        pass
    assert check_file(fifo)[0].severity == "error"
    assert any("not a regular file" in p.message for p in check_chain(child))
    print("ok")
""")


def test_fifo_parent_refused_and_never_blocks(tmp_path):
    _, c = _pair(tmp_path)
    fifo = tmp_path / "fifo.vhd"
    os.mkfifo(fifo)
    _point(c, "fifo.vhd", name="fifo.vhd")
    # in a subprocess: a blocking open would hang the test run, not fail it
    proc = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(c), str(fifo)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_fifo_sibling_does_not_block_coalesce(tmp_path):
    """coalesce scans the parent's directory for other children."""
    _, c = _pair(tmp_path)
    os.mkfifo(tmp_path / "zz.vhd")
    script = f"from vhdcore.coalesce import coalesce; coalesce({str(c)!r}); print('ok')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ depth
def _deep_chain(d: Path, depth: int) -> list[Path]:
    d.mkdir()
    paths = [d / "d0.vhd"]
    create_dynamic(paths[0], 8 * KiB, block_size=BS).close()
    for i in range(1, depth):
        paths.append(d / f"d{i}.vhd")
        create_differencing(paths[i], paths[i - 1]).close()
    return paths


def test_depth_limit(tmp_path, no_block_reads):
    paths = _deep_chain(tmp_path / "x", 6)
    no_block_reads()
    with Chain.open(paths[-1], max_depth=6) as ch:
        assert len(ch) == 6
    with pytest.raises(ChainDepthError):
        Chain.open(paths[-1], max_depth=5)
    assert any("deeper" in p.message for p in check_chain(paths[-1], max_depth=5))
    with pytest.raises(ChainDepthError):
        flatten(paths[-1], tmp_path / "f.vhd", chain_options={"max_depth": 5})
    with pytest.raises(ChainDepthError):
        coalesce(paths[-1], chain_options={"max_depth": 5})


def test_default_depth_limit(tmp_path, no_block_reads):
    from vhdcore.chain import DEFAULT_MAX_DEPTH

    paths = _deep_chain(tmp_path / "x", DEFAULT_MAX_DEPTH + 1)
    no_block_reads()
    with pytest.raises(ChainDepthError):
        Chain.open(paths[-1])
    with Chain.open(paths[-2]) as ch:
        assert len(ch) == DEFAULT_MAX_DEPTH


# ------------------------------------------------------------------ cycles
def _all_refuse_cycle(leaf: Path, tmp_path: Path) -> None:
    with pytest.raises(ChainCycleError):
        Chain.open(leaf)
    assert any(isinstance(p.message, str) and "loop" in p.message for p in check_chain(leaf))
    with pytest.raises(ChainCycleError):
        flatten(leaf, tmp_path / "flat.vhd")
    assert not (tmp_path / "flat.vhd").exists()
    with pytest.raises(ChainCycleError):
        coalesce(leaf)


def test_self_cycle(tmp_path, no_block_reads):
    p, c = _pair(tmp_path)
    _point(c, "c.vhd", name="c.vhd", uuid=uuid_of(c))
    no_block_reads()
    before = _snapshot(p, c)
    _all_refuse_cycle(c, tmp_path)
    assert _snapshot(p, c) == before


def test_self_cycle_with_wrong_uuid(tmp_path, no_block_reads):
    _, c = _pair(tmp_path)
    _point(c, "c.vhd", name="c.vhd")  # parent UUID still the real parent's
    no_block_reads()
    with pytest.raises((ChainCycleError, ParentMismatchError)):
        Chain.open(c)


def test_two_disk_cycle(tmp_path, no_block_reads):
    p, a = _pair(tmp_path, child_name="a.vhd")
    b = tmp_path / "b.vhd"
    create_differencing(b, a).close()
    _point(a, "b.vhd", name="b.vhd", uuid=uuid_of(b))  # a -> b -> a
    no_block_reads()
    before = _snapshot(p, a, b)
    _all_refuse_cycle(a, tmp_path)
    _all_refuse_cycle(b, tmp_path)
    assert _snapshot(p, a, b) == before


def test_three_disk_cycle(tmp_path, no_block_reads):
    _, a = _pair(tmp_path, child_name="a.vhd")
    b = tmp_path / "b.vhd"
    create_differencing(b, a).close()
    c = tmp_path / "c.vhd"
    create_differencing(c, b).close()
    _point(a, "c.vhd", name="c.vhd", uuid=uuid_of(c))  # a -> c -> b -> a
    no_block_reads()
    _all_refuse_cycle(c, tmp_path)


def test_cycle_through_symlink(tmp_path, no_block_reads):
    _, c = _pair(tmp_path)
    os.symlink("c.vhd", tmp_path / "me.vhd")
    _point(c, "me.vhd", name="me.vhd", uuid=uuid_of(c))
    no_block_reads()
    _all_refuse_cycle(c, tmp_path)


def test_cycle_through_hard_link(tmp_path, no_block_reads):
    _, c = _pair(tmp_path)
    os.link(c, tmp_path / "same.vhd")
    _point(c, "same.vhd", name="same.vhd", uuid=uuid_of(c))
    no_block_reads()
    with pytest.raises(ChainCycleError):
        Chain.open(c)


def test_locators_cannot_smuggle_nul_or_empty_paths(tmp_path):
    _, c = _pair(tmp_path)
    rewrite_parent(c, raw_locators=[(b"W2ru", "\0p.vhd".encode("utf-16-le")),
                                    (b"MacX", b"file://p.vhd%00/../../x"),
                                    (b"W2ku", b"")], name="")
    with pytest.raises(ParentNotFoundError):
        Chain.open(c)


def test_a_damaged_locator_does_not_hide_the_parent(tmp_path):
    """One locator pointing past the end of the file: the other locators (and
    the parent name) still find the parent; check still reports the damage."""
    import struct

    from vhdcore.chain import Chain
    from vhdcore.check import check_file
    from vhdcore.disk import VhdFile, create_differencing, create_dynamic
    from vhdcore.errors import ParentNotFoundError
    from vhdcore.format import HEADER_SIZE, checksum

    create_dynamic(tmp_path / "p.vhd", 4 << 20).close()
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd").close()
    with VhdFile.open(tmp_path / "c.vhd") as c:
        hoff = c.footer.data_offset
    raw = bytearray((tmp_path / "c.vhd").read_bytes())
    # first locator entry: data offset far past the end of the file
    struct.pack_into(">Q", raw, hoff + 576 + 16, len(raw) * 4)
    struct.pack_into(">I", raw, hoff + 36, checksum(raw[hoff : hoff + HEADER_SIZE], 36))
    (tmp_path / "c.vhd").write_bytes(raw)
    with Chain.open(tmp_path / "c.vhd") as ch:
        assert len(ch) == 2
    assert any("locator" in p.message for p in check_file(tmp_path / "c.vhd"))
    # all locators and the name pointing nowhere: a clear error that mentions the damage
    (tmp_path / "p.vhd").rename(tmp_path / "gone.vhd")
    with pytest.raises(ParentNotFoundError, match="damaged locator"):
        Chain.open(tmp_path / "c.vhd")
