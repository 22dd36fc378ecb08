"""The commands that write, each with its promise, as scenarios for the
power-cut simulator (tests/_crashsim.py).  Used by tests/test_powercut.py
(bounded) and scripts/crashcheck.py (exhaustive, with figures).

A scenario builds its inputs in ``root`` and returns ``(run, check)``:
``run()`` is the command, recorded once; ``check(where)`` is called on
every rebuilt crash state and raises AssertionError when the command's
promise is broken."""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from _builders import build_chain, read_all

from vhdcore import cli
from vhdcore.chain import Chain
from vhdcore.check import check_chain, check_file
from vhdcore.coalesce import checkpoint_path, coalesce, compact, flatten, repair
from vhdcore.disk import VhdFile, create_differencing
from vhdcore.errors import VhdError

KiB = 1024
SECTOR_BYTES = 512
Scenario = Callable[[Path], tuple[Callable[[], object], Callable[[str], None]]]


def errors_of(problems):
    return [p for p in problems if p.severity == "error"]


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main(argv)


# ------------------------------------------------------------------ coalesce
def _coalesce_chain(root: Path, base: str, grow: bool, grandchildren: int,
                    bat_room: bool = False) -> dict[str, bytes]:
    size = 96 * KiB
    mc = build_chain(root, size=size, depth=1, base=base, block_size=8 * KiB,
                     writes_per_layer=4, max_len=8 * KiB, seed=31)
    if bat_room:
        # a parent whose BAT has room for more entries (as other tools make
        # them), the spare ones zero: growing it must write them "unused"
        # and make that durable before the footer says the disk is larger
        with VhdFile.open(mc.paths[0], writable=True) as v:
            h = v.header
            assert h is not None
            v._pwrite(bytes(SECTOR_BYTES - v.nblocks * 4), h.table_offset + v.nblocks * 4)
            v.write_header(h.with_(max_table_entries=SECTOR_BYTES // 4))
    create_differencing(root / "c.vhd", mc.paths[0], size=size + (40 * KiB if grow else 0),
                        block_size=8 * KiB if base == "fixed" else None).close()
    with Chain.open(root / "c.vhd", writable=True) as c:
        c.write(0, b"\x01" * 3000)
        c.write(20 * KiB + 512, b"\x02" * 9000)
        c.write(44 * KiB, os.urandom(12 * KiB))
        c.write(60 * KiB, bytes(2048))
        c.write(c.virtual_size - 4096, b"\x03" * 4096)
    names = ["c.vhd"]
    for i in range(grandchildren):
        g = f"g{i + 1}.vhd"
        create_differencing(root / g, root / "c.vhd").close()
        with Chain.open(root / g, writable=True) as c:
            c.write(30 * KiB if i == 0 else 0, g.encode() * 100)
        names.append(g)
    return {n: read_all(root / n) for n in names}


def _larger_chain(root: Path) -> dict[str, bytes]:
    """A larger chain: 3 MiB, 16 KiB blocks, a hundred scattered writes in
    the child, two grandchildren."""
    mc = build_chain(root, size=3 * 1024 * KiB, depth=4, block_size=16 * KiB,
                     writes_per_layer=60, max_len=40 * KiB, seed=44)
    names = {"d0.vhd": "d0.vhd", "d1.vhd": "c.vhd", "d2.vhd": "g1.vhd", "d3.vhd": "g2.vhd"}
    for old, new in names.items():
        if old != new:
            os.rename(root / old, root / new)
    # the locators name the old paths: point each disk at its renamed parent
    from vhdcore.coalesce import relink
    relink(root / "c.vhd", root / "d0.vhd")
    relink(root / "g1.vhd", root / "c.vhd")
    relink(root / "g2.vhd", root / "g1.vhd")
    with Chain.open(root / "c.vhd", writable=True) as c:
        c.write(1000 * KiB, os.urandom(300 * KiB))
    return {n: read_all(root / n) for n in ("c.vhd", "g1.vhd", "g2.vhd")}


def _crash_in_fixed_growth(root: Path, grand: list[Path]) -> None:
    """Stop a coalesce (as a killed process would) just after a fixed
    parent's footer was rewritten with the new size: the resumed run then
    zeroes the old footer's place itself."""
    import shutil
    import tempfile

    from vhdcore import _io

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "p"
        shutil.copytree(root, probe)
        with _io.inject(_io.FaultPlan(at=0)) as plan:
            coalesce(probe / "c.vhd", relink_children=[probe / g.name for g in grand],
                     batch_blocks=3)
    first = plan.ops.index("replace")  # the checkpoint announcing the growth
    writes = [i for i, op in enumerate(plan.ops) if i > first and op == "pwrite"]
    stop = writes[2] + 2  # the fsync after the third write (the new footer), 1-based
    try:
        with _io.inject(_io.FaultPlan(at=stop, kind="stop")):
            coalesce(root / "c.vhd", relink_children=grand, batch_blocks=3)
    except _io.SimulatedCrash:
        pass
    else:
        raise AssertionError("the coalesce was not stopped")


def coalesce_scenario(base: str, grow: bool, relink: bool, larger: bool = False,
                      bat_room: bool = False, resume_growth: bool = False) -> Scenario:
    def make(root: Path):
        views = (_larger_chain(root) if larger
                 else _coalesce_chain(root, base, grow, 2 if relink else 0, bat_room))
        # the child's children (g2 is a grandchild's child in the larger chain)
        grand = [root / n for n in views if n != "c.vhd" and not (larger and n == "g2.vhd")]
        batch = 8 if larger else 3
        if resume_growth:
            _crash_in_fixed_growth(root, grand)

        def run() -> None:
            coalesce(root / "c.vhd", relink_children=grand, batch_blocks=batch)

        def check(where: str, done: bool) -> None:
            # the child and every grandchild read exactly as before
            for n, view in views.items():
                assert read_all(root / n) == view, f"{n} reads differently"
            assert errors_of(check_file(root / "d0.vhd")) == [], "parent fails check"
            ck = checkpoint_path(root / "c.vhd")
            if done:  # coalesce returned: all of it is durable
                assert not os.path.exists(ck), "the checkpoint is back after a finished run"
                assert read_all(root / "d0.vhd") == views["c.vhd"], "a finished run was lost"
                for n in ["d0.vhd"] + [g.name for g in grand]:
                    assert check_file(root / n) == [], f"{n} not clean after a finished run"
            if os.path.exists(ck) or read_all(root / "d0.vhd") != views["c.vhd"]:
                coalesce(root / "c.vhd", relink_children=grand, batch_blocks=batch)
            # the run completed: the parent holds the child's old view
            assert read_all(root / "d0.vhd") == views["c.vhd"], "parent != child's old view"
            assert errors_of(check_file(root / "d0.vhd")) == []
            assert not os.path.exists(ck)
            for g in grand:
                with Chain.open(g) as c:
                    assert os.path.basename(c.layers[1].path) == "d0.vhd", f"{g.name} not relinked"
                assert errors_of(check_chain(g)) == []
            if grand:
                os.unlink(root / "c.vhd")
                for n, view in views.items():
                    if n != "c.vhd":
                        assert read_all(root / n) == view, f"{n} after removing the child"
        return run, check
    return make


def relink_scenario() -> Scenario:
    """``relink``: the child's parent was copied elsewhere (same UUID) and
    the child is re-pointed at the copy.  It points at one or the other,
    never at a mixture, reads the same, and passes check; a re-run
    finishes."""
    import shutil

    from vhdcore.coalesce import relink

    def make(root: Path):
        views = _coalesce_chain(root, "dynamic", True, 1)
        shutil.copyfile(root / "d0.vhd", root / "d0-moved.vhd")
        c = root / "c.vhd"

        def run() -> None:
            relink(c, root / "d0-moved.vhd")

        def check(where: str, done: bool) -> None:
            assert errors_of(check_chain(c)) == [], "fails check"
            with Chain.open(c) as ch:
                parent = os.path.basename(ch.layers[1].path)
            assert parent in ("d0.vhd", "d0-moved.vhd")
            if done:
                assert parent == "d0-moved.vhd", "a finished relink was lost"
                assert check_file(c) == [], "not clean after a finished relink"
            assert read_all(c) == views["c.vhd"], "reads differently"
            relink(c, root / "d0-moved.vhd")
            os.unlink(root / "d0.vhd")
            assert read_all(c) == views["c.vhd"], "reads differently after a re-run"
        return run, check
    return make


# ------------------------------------------------------------------ write, repair
def write_scenario(kind: str) -> Scenario:
    """``vhdcore write`` into a differencing or dynamic disk: new blocks and
    partly filled ones.  Every sector reads its old or its new content."""
    def make(root: Path):
        mc = build_chain(root, size=64 * KiB, depth=1, block_size=8 * KiB,
                         writes_per_layer=3, max_len=6 * KiB, seed=5)
        target = mc.leaf
        if kind == "differencing":
            # a parent with data everywhere: a sector the child claims
            # without its data reads differently from the parent's
            with Chain.open(target, writable=True) as c:
                c.write(0, os.urandom(64 * KiB))
            target = root / "child.vhd"
            create_differencing(target, mc.leaf).close()
            with Chain.open(target, writable=True) as c:
                c.write(3 * KiB, os.urandom(3 * KiB))
                c.write(40 * KiB + 512, os.urandom(1024))
        payload = os.urandom(20 * KiB + 1000)
        (root / "payload.bin").write_bytes(payload)
        off = 5 * KiB + 100
        old = read_all(target)
        new = bytearray(old)
        new[off : off + len(payload)] = payload
        new = bytes(new)

        def run() -> None:
            assert _quiet(["write", str(target), "--offset", str(off),
                           "--from", str(root / "payload.bin")]) == 0

        def check(where: str, done: bool) -> None:
            assert errors_of(check_file(target)) == [], "fails check"
            got = read_all(target)
            if done:
                assert got == new, "a finished write was lost"
            for s in range(0, len(got), 512):
                sec = got[s : s + 512]
                assert sec in (old[s : s + 512], new[s : s + 512]), \
                    f"sector {s // 512} reads neither its old nor its new content"
        return run, check
    return make


def repair_scenario(kind: str) -> Scenario:
    """``repair`` of a torn primary footer (``primary``) or of a stale copy at
    offset 0 (``copy``): the disk reads the same, and it is the old file or
    the repaired one (a rerun then finishes)."""
    def make(root: Path):
        mc = build_chain(root, size=64 * KiB, depth=1, block_size=8 * KiB,
                         writes_per_layer=4, max_len=6 * KiB, seed=9)
        p = mc.leaf
        if kind == "gap":
            # reserved room nobody used (a stopped writer), an older footer
            # left where the data ends, then a footer update: repair must
            # not let the older footer come back
            with VhdFile.open(p, writable=True) as v:
                old = v.footer
                v.reserve(8 * KiB)
                v.write_footer(old.with_(timestamp=old.timestamp + 100))
        raw = bytearray(p.read_bytes())
        good = bytes(raw[:512])
        if kind in ("primary", "gap"):
            raw[-512 + 70] ^= 0xFF  # checksum area of the footer at EOF
            raw += bytes(3 * 512)   # and junk after it
        else:
            raw[70] ^= 0xFF  # the copy at offset 0
        p.write_bytes(bytes(raw))
        view = read_all(p)
        before = bytes(raw)

        def run() -> None:
            assert repair(p) is True

        def check(where: str, done: bool) -> None:
            data = p.read_bytes()
            with VhdFile.open(p) as v:
                assert v.footer.pack() == good or not v.primary_footer_ok, \
                    "a footer other than the copy at offset 0 is in force"
            if done:
                assert errors_of(check_file(p)) == [], "a finished repair was lost"
            if data != before:
                assert read_all(p) == view, "reads differently"
            repair(p)
            assert errors_of(check_file(p)) == [], "fails check after a rerun"
            assert read_all(p) == view
        return run, check
    return make


def write_block_scenario() -> Scenario:
    """The API under ``write``/``coalesce``: ``VhdFile.write_block`` of new
    blocks, then ``flush()``.  Each block reads as before or as written."""
    def make(root: Path):
        mc = build_chain(root, size=64 * KiB, depth=1, block_size=8 * KiB,
                         writes_per_layer=2, max_len=4 * KiB, seed=8)
        p = mc.leaf
        old = read_all(p)
        with VhdFile.open(p) as v:
            free = [b for b in range(v.nblocks) if v.block_offset(b) is None][:3]
            bm = b"\xff" * v.bitmap_size
        blocks = {b: os.urandom(8 * KiB) for b in free}
        new = bytearray(old)
        for b, d in blocks.items():
            new[b * 8 * KiB : (b + 1) * 8 * KiB] = d

        def run() -> None:
            with VhdFile.open(p, writable=True) as v:
                for b, d in blocks.items():
                    v.write_block(b, bm, d)
                v.flush()

        def check(where: str, done: bool) -> None:
            assert errors_of(check_file(p)) == [], "fails check"
            got = read_all(p)
            if done:
                assert got == bytes(new), "a flushed block was lost"
            for b in range(len(got) // (8 * KiB)):
                r = slice(b * 8 * KiB, (b + 1) * 8 * KiB)
                assert got[r] in (old[r], new[r]), f"block {b} reads neither old nor new"
        return run, check
    return make


# ------------------------------------------------------------------ create, snapshot
def create_scenario(kind: str) -> Scenario:
    """``create`` (dynamic or fixed) and ``snapshot``: the new disk is absent
    or complete."""
    def make(root: Path):
        parent = None
        if kind == "snapshot":
            mc = build_chain(root, size=64 * KiB, depth=1, block_size=8 * KiB,
                             writes_per_layer=3, max_len=6 * KiB, seed=3)
            parent = mc.leaf
            pview = read_all(parent)
        out = root / "new.vhd"

        def run() -> None:
            if kind == "snapshot":
                argv = ["snapshot", str(out), "--parent", str(parent)]
            else:
                argv = ["create", str(out), "--size", "80K", "--type", kind]
                if kind == "dynamic":
                    argv += ["--block-size", "8K"]
            assert _quiet(argv) == 0

        def check(where: str, done: bool) -> None:
            if not out.exists():
                assert not done, "the new disk vanished after the command returned"
                return
            assert errors_of(check_file(out)) == [], "an incomplete disk at the path"
            if kind == "snapshot":
                assert read_all(out) == pview
            else:
                assert read_all(out) == bytes(80 * KiB)
        return run, check
    return make


# ------------------------------------------------------------------ flatten, compact
def output_scenario(kind: str) -> Scenario:
    """``flatten`` (vhd, fixed, raw), ``cat -o`` and ``compact``: the output
    path holds nothing or the complete, right file."""
    def make(root: Path):
        mc = build_chain(root, size=80 * KiB + 1536, depth=3, block_size=8 * KiB,
                         writes_per_layer=5, max_len=9 * KiB, seed=12)
        leaf = mc.leaf
        out = root / "out.img"
        if kind == "compact":
            expect = read_all(leaf)
        else:
            expect = read_all(leaf)

        def run() -> None:
            if kind.startswith("flatten-"):
                flatten(leaf, out, kind.split("-")[1])
            elif kind == "cat":
                assert _quiet(["cat", str(leaf), "-o", str(out)]) == 0
            else:
                compact(leaf, out)

        def check(where: str, done: bool) -> None:
            if not out.exists():
                assert not done, "the output vanished after the command returned"
                return
            if kind in ("flatten-raw", "cat"):
                assert out.read_bytes() == expect, "raw output incomplete"
                return
            assert errors_of(check_file(out)) == [], "output fails check"
            if kind == "compact":
                # a compacted differencing disk reads through the same parent
                assert read_all(out) == expect, "output reads wrong"
            else:
                assert read_all(out) == expect, "output reads wrong"
        return run, check
    return make


# ------------------------------------------------------------------ image, restore
def _image_chain(root: Path, seed: int) -> Path:
    mc = build_chain(root / "src", size=256 * KiB, depth=2, block_size=16 * KiB,
                     writes_per_layer=6, max_len=24 * KiB, seed=seed)
    return mc.leaf


def image_scenario(previous: bool, state_dir: bool = False) -> Scenario:
    """``image`` to a directory store: the previous image (if any) still
    restores, the job state is never half-written, and ``--resume`` (or a
    fresh run when no state survived) completes the new image."""
    from vhdcore.imaging import _load_state, create_image, job_state_path
    from vhdcore.store.restore import restore

    def make(root: Path):
        (root / "src").mkdir()
        (root / "store").mkdir()
        leaf = _image_chain(root, 21)
        url = f"file://{root / 'store' / 'img'}"
        old_view = None
        if previous:
            create_image(leaf, url, segment_size=64 * KiB, fs_aware=False)
            old_view = read_all(leaf)
            with Chain.open(leaf, writable=True) as c:
                c.write(17 * KiB, os.urandom(40 * KiB))
        new_view = read_all(leaf)
        opts: dict = {"segment_size": 64 * KiB, "fs_aware": False, "replace": True}
        if state_dir:  # a state directory that does not exist yet
            opts["state_dir"] = root / "jobs"
        spath = job_state_path(url, opts.get("state_dir"))

        def run() -> None:
            create_image(leaf, url, **opts)

        def restored() -> bytes | None:
            out = root / "check.vhd"
            try:
                restore(url, out)
            except VhdError:
                return None
            try:
                return read_all(out)
            finally:
                out.unlink()

        def check(where: str, done: bool) -> None:
            if os.path.exists(spath):
                st = _load_state(spath)  # raises on a half-written state
                assert st is not None
            elif not (root / "store" / "img.manifest.json").exists():
                # a job that stored something is resumable: its state survived
                segs = root / "store" / "img.segments"
                assert not (segs.exists() and any(segs.glob("*.md5"))), \
                    "segments were stored but the job state is gone"
            got = restored()
            if done:
                assert got == new_view, "a finished image was lost"
                assert not os.path.exists(spath), "a finished job's state came back"
            if got is not None:
                assert got in (old_view, new_view), "the image restores to a third thing"
            elif previous:
                raise AssertionError("the previous image no longer restores")
            if got != new_view:
                create_image(leaf, url, resume=os.path.exists(spath), **opts)
                assert restored() == new_view, "resume did not complete the new image"
        return run, check
    return make


def restore_scenario(fmt: str) -> Scenario:
    from vhdcore.imaging import create_image
    from vhdcore.store.restore import restore

    def make(root: Path):
        (root / "src").mkdir()
        (root / "store").mkdir()
        leaf = _image_chain(root, 33)
        url = f"file://{root / 'store' / 'img'}"
        create_image(leaf, url, segment_size=64 * KiB, fs_aware=False)
        view = read_all(leaf)
        out = root / "out.vhd"

        def run() -> None:
            restore(url, out, fmt)

        def check(where: str, done: bool) -> None:
            if not out.exists():
                assert not done, "the output vanished after the command returned"
                return
            if fmt == "raw":
                assert out.read_bytes() == view, "raw output incomplete"
            else:
                assert errors_of(check_file(out)) == [], "output fails check"
                assert read_all(out) == view
        return run, check
    return make


def repo_image_scenario() -> Scenario:
    """``image --repo`` into a directory repository, incremental over a
    previous image of the same name: every image the repository lists
    restores to its own view and passes ``verify --read-data`` (no listed
    image names a chunk that a power cut lost), the previous image is never
    lost, and running the command again completes the new image."""
    from vhdcore import repo as R

    def make(root: Path):
        (root / "src").mkdir()
        leaf = _image_chain(root, 45)
        url = f"file://{root / 'repo'}"
        R.init_repo(url, chunk_size=64 * KiB)
        R.create_image(leaf, url, "vm", fs_aware=False)
        old_view = read_all(leaf)
        with Chain.open(leaf, writable=True) as c:
            c.write(70 * KiB, os.urandom(90 * KiB))
        new_view = read_all(leaf)

        def run() -> None:
            R.create_image(leaf, url, "vm", fs_aware=False)

        def images() -> dict[str, bytes]:
            out = root / "check.vhd"
            got = {}
            for img in R.list_images(url, "vm"):
                ref = f"vm@{img['id']}"
                R.restore(url, ref, out)
                try:
                    got[ref] = read_all(out)
                finally:
                    out.unlink()
            return got

        def check(where: str, done: bool) -> None:
            res = R.verify(url, read_data=True, mark=False)
            assert res.ok, f"verify: missing {res.missing} damaged {res.damaged} {res.errors}"
            got = images()
            assert old_view in got.values(), "the previous image was lost"
            assert set(got.values()) <= {old_view, new_view}, "an image restores to a third thing"
            if done:
                assert new_view in got.values(), "a finished image was lost"
            if new_view not in got.values():
                R.create_image(leaf, url, "vm", fs_aware=False)
                assert new_view in images().values(), "running again did not complete the image"
        return run, check
    return make


#: name -> (scenario, crash points sampled in the suite: None for all of them)
SCENARIOS: dict[str, tuple[Scenario, int | None]] = {
    "coalesce": (coalesce_scenario("dynamic", False, False), None),
    "coalesce --relink (grow, BAT moves)": (coalesce_scenario("dynamic", True, True), None),
    "coalesce --relink (fixed parent grows)": (coalesce_scenario("fixed", True, True), None),
    "coalesce (grow, BAT has room)": (coalesce_scenario("dynamic", True, False, bat_room=True), None),
    "coalesce --relink (resumed in fixed growth)": (
        coalesce_scenario("fixed", True, True, resume_growth=True), None),
    "coalesce --relink (larger chain)": (coalesce_scenario("dynamic", False, True, True), 15),
    "relink": (relink_scenario(), None),
    "write (differencing)": (write_scenario("differencing"), None),
    "write (dynamic)": (write_scenario("dynamic"), None),
    "VhdFile.write_block + flush (API)": (write_block_scenario(), None),
    "repair (primary footer)": (repair_scenario("primary"), None),
    "repair (stale copy)": (repair_scenario("copy"), None),
    "repair (older footer where the data ends)": (repair_scenario("gap"), None),
    "create --type dynamic": (create_scenario("dynamic"), None),
    "create --type fixed": (create_scenario("fixed"), None),
    "snapshot": (create_scenario("snapshot"), None),
    "flatten --format vhd": (output_scenario("flatten-vhd"), None),
    "flatten --format fixed": (output_scenario("flatten-fixed"), None),
    "flatten --format raw": (output_scenario("flatten-raw"), None),
    "cat -o": (output_scenario("cat"), None),
    "compact": (output_scenario("compact"), None),
    "restore": (restore_scenario("vhd"), None),
    "restore --format raw": (restore_scenario("raw"), None),
    "image (new)": (image_scenario(False), None),
    "image (state in a new --state-dir)": (image_scenario(False, state_dir=True), None),
    "image (over a previous image)": (image_scenario(True), None),
    "image --repo (incremental, directory repository)": (repo_image_scenario(), None),
}


def run_scenario(name: str, root: Path, *, points: int | None, subsets: int, seed: int = 0,
                 stop_at_first: bool = True, unit: int = 4096):
    from _crashsim import explore, no_real_fsync

    make, _ = SCENARIOS[name]
    root.mkdir(parents=True, exist_ok=True)
    with no_real_fsync():
        run, check = make(root)
    return explore(name, root, run, check, points=points, subsets=subsets, seed=seed,
                   stop_at_first=stop_at_first, unit=unit)


__all__ = ["SCENARIOS", "run_scenario", "json"]
