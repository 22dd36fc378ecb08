"""Injected write faults: coalesce, flatten, compact, repair and raw export
fail at every write, fsync, truncate and rename they make, with each kind of
fault (EIO, ENOSPC, a short write, a stop that acts like a crash).

After every fault: the inputs read exactly as before (the whole virtual disk,
through a fresh chain); for coalesce the child's view and every
grandchild's view are unchanged and the parent passes ``check_file``; no
output claims to be complete (only ``.part`` files may remain); and a run
without faults then succeeds with the right content.

The count of operations comes from a run with ``FaultPlan(at=0)``; then
each operation 1..count fails once per kind.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _builders import build_chain, read_all

from vhdcore import _io
from vhdcore.chain import Chain
from vhdcore.check import check_chain, check_file
from vhdcore.coalesce import checkpoint_path, coalesce, compact, flatten, repair
from vhdcore.disk import VhdFile, create_differencing, vhd_to_raw
from vhdcore.errors import NoSpaceError, VhdError

KiB = 1024
KINDS = ("eio", "enospc", "short", "stop")
#: (operation, kind) -> failure points injected, for the report
POINTS: dict[tuple[str, str], int] = {}


@pytest.fixture(autouse=True)
def no_real_fsync(monkeypatch):
    """Faults are process-level (nothing is lost by a power cut here), so the
    fsyncs themselves are skipped; they are still counted and can fail."""
    monkeypatch.setattr(_io.os, "fsync", lambda fd: None)


def errors_of(problems):
    return [p for p in problems if p.severity == "error"]


def _report(op: str, kind: str, n: int) -> None:
    POINTS[(op, kind)] = POINTS.get((op, kind), 0) + n
    path = os.environ.get("VHDCORE_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"faults": op, "kind": kind, "points": n}) + "\n")


def sweep(name: str, template: Path, work: Path, op: Callable[[Path], object],
          after_fault: Callable[[Path, BaseException | None], bool | None],
          after_rerun: Callable[[Path], None], kinds=KINDS) -> int:
    """Run ``op`` on a fresh copy of ``template`` with a fault at every
    operation and of every kind; check with ``after_fault`` (the exception
    raised, or None when the fault was absorbed and the run completed), then
    re-run without faults when ``after_fault`` says so (by default: after a
    failed run) and check with ``after_rerun``.  Returns the number of operations."""
    probe = work / f"{name}-count"
    shutil.copytree(template, probe)
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        op(probe)
    count = plan.count
    assert count > 0
    after_rerun(probe)
    shutil.rmtree(probe)
    for kind in kinds:
        for n in range(1, count + 1):
            d = work / f"{name}-{kind}-{n}"
            shutil.copytree(template, d)
            plan = _io.FaultPlan(at=n, kind=kind)
            exc: BaseException | None = None
            try:
                with _io.inject(plan):
                    op(d)
            except (OSError, _io.SimulatedCrash, VhdError) as e:
                exc = e
            where = f"{name}: {kind} at operation {n}/{count} ({plan.ops[n - 1]})"
            assert plan.fired, where
            try:
                rerun = after_fault(d, exc)
                if rerun if rerun is not None else exc is not None:
                    op(d)
                after_rerun(d)
            except BaseException as e:
                raise AssertionError(f"{where}, raised {exc!r}: {e}") from e
            shutil.rmtree(d)
        _report(name, kind, count)
    return count


def _no_claim_of_completion(d: Path, out_name: str, complete: Callable[[Path], None]) -> None:
    """After a failed run the output does not exist (a ``.part`` file may),
    unless the fault came after the rename that completed it (the directory
    fsync): then it must be complete and right."""
    if (d / out_name).exists():
        complete(d)


def _template(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


# ------------------------------------------------------------------ coalesce
def _coalesce_scenario(tmp_path: Path, base: str, grow: bool) -> tuple[Path, dict]:
    """base <- child <- two grandchildren; the child has blocks new to the
    parent and blocks that merge into existing ones; optionally larger than
    the parent (the parent grows; a dynamic parent's BAT must move)."""
    t = _template(tmp_path, f"co-{base}-{grow}")
    size = 96 * KiB
    mc = build_chain(t, size=size, depth=1, base=base, block_size=8 * KiB,
                     writes_per_layer=4, max_len=8 * KiB, seed=31)
    create_differencing(t / "c.vhd", mc.paths[0], size=size + (40 * KiB if grow else 0),
                        block_size=8 * KiB if base == "fixed" else None).close()
    with Chain.open(t / "c.vhd", writable=True) as c:
        c.write(0, b"\x01" * 3000)
        c.write(20 * KiB + 512, b"\x02" * 9000)
        c.write(60 * KiB, bytes(2048))
        c.write(c.virtual_size - 4096, b"\x03" * 4096)
    for g in ("g1.vhd", "g2.vhd"):
        create_differencing(t / g, t / "c.vhd").close()
        with Chain.open(t / g, writable=True) as c:
            c.write(30 * KiB if g == "g1.vhd" else 0, g.encode() * 100)
    views = {n: read_all(t / n) for n in ("c.vhd", "g1.vhd", "g2.vhd")}
    if base == "dynamic" and grow:
        with VhdFile.open(t / "d0.vhd") as p:
            assert p.header is not None and p.header.max_table_entries < -(-(size + 40 * KiB)
                                                                            // (8 * KiB))
    return t, views


@pytest.mark.parametrize("base,grow", [("dynamic", False), ("dynamic", True), ("fixed", True)])
def test_coalesce_faults(tmp_path, base, grow):
    template, views = _coalesce_scenario(tmp_path, base, grow)

    def op(d: Path) -> None:
        coalesce(d / "c.vhd", relink_children=[d / "g1.vhd", d / "g2.vhd"], batch_blocks=2)

    def after_fault(d: Path, exc: BaseException | None) -> bool:
        for n, view in views.items():
            assert read_all(d / n) == view, f"{n} reads differently"
        assert errors_of(check_file(d / "d0.vhd")) == []
        if exc is None or os.path.exists(checkpoint_path(d / "c.vhd")):
            return exc is not None  # resume from the checkpoint
        # no checkpoint: the parent was not touched yet, or all was done and
        # the fault hit the last step (the directory fsync after removing it)
        if (d / "d0.vhd").read_bytes() == (template / "d0.vhd").read_bytes():
            return True
        assert read_all(d / "d0.vhd") == views["c.vhd"]
        return False

    def after_rerun(d: Path) -> None:
        assert read_all(d / "d0.vhd") == views["c.vhd"]
        assert errors_of(check_file(d / "d0.vhd")) == []
        assert not os.path.exists(checkpoint_path(d / "c.vhd"))
        for g in ("g1.vhd", "g2.vhd"):
            with Chain.open(d / g) as c:
                assert os.path.basename(c.layers[1].path) == "d0.vhd"
            assert errors_of(check_chain(d / g)) == []
        os.unlink(d / "c.vhd")
        for g in ("g1.vhd", "g2.vhd"):
            assert read_all(d / g) == views[g]

    name = f"coalesce-{base}{'-grow' if grow else ''}"
    assert sweep(name, template, tmp_path, op, after_fault, after_rerun) >= 10


def test_coalesce_refuses_up_front_when_space_is_short(tmp_path, monkeypatch):
    """ENOSPC is predicted: the space needed is computed before any write and
    the refusal carries it (and what is available)."""
    template, _ = _coalesce_scenario(tmp_path, "dynamic", True)
    before = {p.name: p.read_bytes() for p in template.iterdir()}

    class Usage:
        free = 4096

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    with _io.inject(_io.FaultPlan(at=0)) as plan, pytest.raises(NoSpaceError) as ei:
        coalesce(template / "c.vhd")
    assert plan.count == 0  # nothing written, not even a checkpoint
    err = ei.value
    assert err.needed > 4096 and err.available == 4096
    assert f"needs up to {err.needed} bytes" in str(err) and "4096 are available" in str(err)
    assert {p.name: p.read_bytes() for p in template.iterdir()} == before


# ------------------------------------------------------------------ flatten, compact, raw
def _flatten_template(tmp_path: Path, base: str = "dynamic") -> tuple[Path, bytes]:
    t = _template(tmp_path, f"fl-{base}")
    mc = build_chain(t, size=80 * KiB + 1536, depth=3, base=base, block_size=8 * KiB,
                     writes_per_layer=5, max_len=9 * KiB, seed=12)
    (t / "leaf.txt").write_text(mc.leaf.name)
    return t, bytes(mc.model)


def _inputs_unchanged(d: Path, template: Path) -> None:
    for p in template.iterdir():
        assert (d / p.name).read_bytes() == p.read_bytes(), f"{p.name} was modified"


@pytest.mark.parametrize("fmt", ["vhd", "fixed", "raw"])
def test_flatten_faults(tmp_path, fmt):
    template, model = _flatten_template(tmp_path)
    leaf = (template / "leaf.txt").read_text()
    assert read_all(template / leaf) == model

    def op(d: Path) -> None:
        flatten(d / leaf, d / "out.img", fmt, overwrite=True)

    def after_fault(d: Path, exc: BaseException | None) -> None:
        assert read_all(d / leaf) == model
        _inputs_unchanged(d, template)
        if exc is not None:
            _no_claim_of_completion(d, "out.img", after_rerun)

    def after_rerun(d: Path) -> None:
        got = (d / "out.img").read_bytes() if fmt == "raw" else read_all(d / "out.img")
        assert got == model
        if fmt != "raw":
            assert errors_of(check_file(d / "out.img")) == []

    assert sweep(f"flatten-{fmt}", template, tmp_path, op, after_fault, after_rerun) >= 4


@pytest.mark.parametrize("which", ["dynamic", "differencing"])
def test_compact_faults(tmp_path, which):
    template, _ = _flatten_template(tmp_path)
    src = "d0.vhd" if which == "dynamic" else (template / "leaf.txt").read_text()
    want = read_all(template / src)

    def op(d: Path) -> None:
        compact(d / src, d / "out.vhd", overwrite=True)

    def after_fault(d: Path, exc: BaseException | None) -> None:
        assert read_all(d / src) == want
        _inputs_unchanged(d, template)
        if exc is not None:
            _no_claim_of_completion(d, "out.vhd", after_rerun)

    def after_rerun(d: Path) -> None:
        assert read_all(d / "out.vhd") == want
        assert errors_of(check_chain(d / "out.vhd")) == []

    assert sweep(f"compact-{which}", template, tmp_path, op, after_fault, after_rerun) >= 4


def test_raw_export_faults(tmp_path):
    template, model = _flatten_template(tmp_path, base="fixed")
    leaf = (template / "leaf.txt").read_text()

    def op(d: Path) -> None:
        vhd_to_raw(d / leaf, d / "out.raw")

    def after_fault(d: Path, exc: BaseException | None) -> None:
        _inputs_unchanged(d, template)
        if exc is not None:
            _no_claim_of_completion(d, "out.raw", after_rerun)

    def after_rerun(d: Path) -> None:
        assert (d / "out.raw").read_bytes() == model

    assert sweep("cat-raw", template, tmp_path, op, after_fault, after_rerun) >= 3


# ------------------------------------------------------------------ repair
def test_repair_faults(tmp_path):
    t = _template(tmp_path, "rep")
    mc = build_chain(t, size=64 * KiB, depth=1, block_size=8 * KiB, writes_per_layer=6,
                     max_len=8 * KiB, seed=2)
    p = mc.leaf
    size = os.path.getsize(p)
    with open(p, "r+b") as f:  # a torn write: garbage over the footer and a partial tail
        f.seek(size - 512)
        f.write(b"\xee" * 512 + b"\x11" * 700)
    model = bytes(mc.model)
    assert read_all(p) == model

    def op(d: Path) -> None:
        repair(d / p.name)

    def after_fault(d: Path, exc: BaseException | None) -> None:
        assert read_all(d / p.name) == model  # the copy at offset 0 still serves

    def after_rerun(d: Path) -> None:
        assert errors_of(check_file(d / p.name)) == []
        assert read_all(d / p.name) == model
        assert os.path.getsize(d / p.name) == size
        assert repair(d / p.name) is False

    assert sweep("repair", t, tmp_path, op, after_fault, after_rerun) >= 3


# ------------------------------------------------------------------ imaging
def test_create_image_faults(tmp_path):
    """Imaging to a ``file://`` target: the faults reach the job state and
    every segment and manifest file of the directory store (all written
    through ``vhdcore._io``)."""
    imaging = pytest.importorskip("vhdcore.imaging")
    from vhdcore.store import open_store, restore

    template, model = _flatten_template(tmp_path)
    leaf = (template / "leaf.txt").read_text()

    def url(d: Path) -> str:
        return f"file://{d}/out/image"

    def op(d: Path) -> None:
        (d / "out").mkdir(exist_ok=True)
        state = imaging.job_state_path(url(d), d / "state")
        imaging.create_image(d / leaf, url(d), state_dir=d / "state",
                             resume=os.path.exists(state), segment_size=16 * KiB,
                             replace=True)  # a re-run after a fault past the manifest

    def complete(d: Path) -> None:
        restore(url(d), d / "restored.vhd")
        assert read_all(d / "restored.vhd") == model
        os.unlink(d / "restored.vhd")

    def after_fault(d: Path, exc: BaseException | None) -> None:
        _inputs_unchanged(d, template)
        if exc is not None:
            try:
                open_store(url(d)).get_manifest()
            except VhdError:
                return  # no manifest: the image does not claim to be complete
            complete(d)  # the fault came after the manifest: it must be right

    def after_rerun(d: Path) -> None:
        complete(d)
        assert not os.path.exists(imaging.job_state_path(url(d), d / "state"))

    assert sweep("create_image-file", template, tmp_path, op, after_fault, after_rerun) >= 10


# ------------------------------------------------------------------ regressions
def test_growth_with_footer_beyond_the_end_of_data(tmp_path):
    """A parent whose footer sits past its last block (a gap, as other
    writers or an interrupted reserve leave): new data and footers must go
    after that footer, or the footer written for a growth is not the one at
    EOF and the growth (and every block past the old size) is lost."""
    create_fixed_or_dynamic = build_chain(tmp_path, size=32 * KiB, depth=1, block_size=4 * KiB,
                                          writes_per_layer=3, max_len=4 * KiB, seed=4)
    p = create_fixed_or_dynamic.paths[0]
    raw = p.read_bytes()
    p.write_bytes(raw[:-512] + b"\xab" * 8192 + raw[-512:])  # a gap before the footer
    create_differencing(tmp_path / "c.vhd", p, size=48 * KiB).close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(40 * KiB, b"\x07" * 4096)
    want = read_all(tmp_path / "c.vhd")
    coalesce(tmp_path / "c.vhd")
    with VhdFile.open(p) as v:
        assert v.virtual_size == 48 * KiB
    assert read_all(p) == want
    assert errors_of(check_file(p)) == []


def test_growth_clears_stale_bat_entries(tmp_path):
    """BAT entries past the old size (room for them is preallocated) that are
    not "unused" on disk must not become blocks when the disk grows."""
    from _mutate import craft_vhd

    from vhdcore.format import FOOTER_SIZE, HEADER_SIZE

    # a 16 KiB disk of 4 KiB blocks with room for 16 entries; entries 4..15
    # hold garbage pointing at block 0's data
    first = (FOOTER_SIZE + HEADER_SIZE + 512) // 512
    data = bytearray(craft_vhd(size=16 * KiB, block_size=4 * KiB, max_table_entries=16,
                               bat=[first] + [0xFFFFFFFF] * 3 + [first] * 12, body=4608))
    data[first * 512 : first * 512 + 512] = b"\xff" * 512  # bitmap: all present
    data[first * 512 + 512 : first * 512 + 4608] = b"\x42" * 4096
    (tmp_path / "p.vhd").write_bytes(bytes(data))
    assert read_all(tmp_path / "p.vhd") == b"\x42" * 4096 + bytes(12 * KiB)
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd", size=64 * KiB).close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(1024, b"\x01" * 512)  # no new block: the BAT is not rewritten for one
    want = read_all(tmp_path / "c.vhd")
    coalesce(tmp_path / "c.vhd")
    assert read_all(tmp_path / "p.vhd") == want


def test_fixed_parent_with_hidden_data_is_not_grown(tmp_path):
    """A fixed disk whose footer says less than the data it holds (fuzz
    finding): growing it would expose that data to the child."""
    from vhdcore.disk import create_fixed
    from vhdcore.errors import CoalesceError

    create_fixed(tmp_path / "p.vhd", 16 * KiB).close()
    raw = bytearray((tmp_path / "p.vhd").read_bytes())
    raw[: 16 * KiB] = b"\x99" * (16 * KiB)
    from vhdcore.format import Footer

    f = Footer.parse(bytes(raw[-512:]))
    raw[-512:] = f.with_(current_size=4 * KiB, original_size=4 * KiB).pack()
    (tmp_path / "p.vhd").write_bytes(bytes(raw))
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd", size=16 * KiB,
                        block_size=4 * KiB).close()
    before = (tmp_path / "p.vhd").read_bytes()
    want = read_all(tmp_path / "c.vhd")
    assert want == b"\x99" * (4 * KiB) + bytes(12 * KiB)
    with pytest.raises(CoalesceError, match="refusing to grow"):
        coalesce(tmp_path / "c.vhd")
    assert (tmp_path / "p.vhd").read_bytes() == before
    assert read_all(tmp_path / "c.vhd") == want


def test_stale_footer_copy_is_a_warning_and_repair_rewrites_it(tmp_path):
    mc = build_chain(tmp_path, size=32 * KiB, depth=1, block_size=4 * KiB, writes_per_layer=3,
                     max_len=4 * KiB, seed=6)
    p = mc.paths[0]
    with VhdFile.open(p) as v:
        stale = v.footer.with_(timestamp=v.footer.timestamp + 1).pack()
    raw = bytearray(p.read_bytes())
    raw[:512] = stale
    p.write_bytes(bytes(raw))
    problems = check_file(p)
    assert [pr.severity for pr in problems if "copy" in pr.message] == ["warning"]
    assert repair(p) is True
    assert check_file(p) == []
    assert repair(p) is False


def test_relink_never_mixes_old_and_new_parent(tmp_path):
    """Interrupted anywhere (a short write at each operation), a relinked
    disk reads through its old parent or its new one.  Before, the locators
    were rewritten in place and said the new parent's path while the header
    kept the old UUID (ParentMismatchError), and the header was rewritten in
    place (a torn write left it damaged).

    d2 is re-pointed over d0, skipping d1, on purpose (so that the two links
    read differently): the public relink() refuses that (d0 does not read like
    d1), so the write path it uses after its checks is driven directly."""
    from vhdcore.coalesce import _relink_unchecked as relink
    from vhdcore.coalesce import relink as checked_relink
    from vhdcore.errors import ParentMismatchError

    mc = build_chain(tmp_path, size=32 * KiB, depth=3, block_size=4 * KiB, writes_per_layer=3,
                     max_len=4 * KiB, seed=9)
    views = {p.name: read_all(p) for p in mc.paths}
    probe = tmp_path / "probe"
    probe.mkdir()
    for p in mc.paths:
        shutil.copy(p, probe / p.name)
    with pytest.raises(ParentMismatchError):
        checked_relink(probe / "d2.vhd", probe / "d0.vhd")
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        relink(probe / "d2.vhd", probe / "d0.vhd")
    n = plan.count
    assert n >= 4
    relinked_view = read_all(probe / "d2.vhd")  # d2 over d0 (d1 skipped on purpose)
    assert relinked_view != views["d2.vhd"]
    for at in range(1, n + 1):
        d = tmp_path / f"r{at}"
        d.mkdir()
        for p in mc.paths:
            shutil.copy(p, d / p.name)
        with pytest.raises((OSError, _io.SimulatedCrash)), \
                _io.inject(_io.FaultPlan(at=at, kind="short")):
            relink(d / "d2.vhd", d / "d0.vhd")
        # the old link or the new one, never an error or a mixture
        assert read_all(d / "d2.vhd") in (views["d2.vhd"], relinked_view), f"operation {at}"


def test_growth_moves_a_bat_whose_room_holds_a_block(tmp_path):
    """``max table entries`` claims room for 1024 entries, but a block sits
    right after the first BAT sector (a damaged or tightly packed file):
    growing must move the BAT rather than write entries over that block."""
    from _mutate import craft_vhd

    from vhdcore.format import FOOTER_SIZE, HEADER_SIZE

    bat_at = FOOTER_SIZE + HEADER_SIZE
    blk = (bat_at + 512) // 512  # the sector after the first BAT sector
    data = bytearray(craft_vhd(size=128 * 4 * KiB, block_size=4 * KiB, max_table_entries=1024,
                               bat=[blk], body=4608))
    data[blk * 512 : blk * 512 + 512] = b"\xff" * 512
    data[blk * 512 + 512 : blk * 512 + 4608] = b"\x42" * 4096
    (tmp_path / "p.vhd").write_bytes(bytes(data))
    assert errors_of(check_file(tmp_path / "p.vhd")) == []
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd", size=1024 * 4 * KiB).close()
    with Chain.open(tmp_path / "c.vhd", writable=True) as c:
        c.write(3 * 1024 * KiB, b"\x05" * 4096)
    want = read_all(tmp_path / "c.vhd")
    assert want[:4096] == b"\x42" * 4096
    coalesce(tmp_path / "c.vhd")
    assert read_all(tmp_path / "p.vhd") == want
    assert errors_of(check_file(tmp_path / "p.vhd")) == []
