"""Power cuts: every command that writes, run under the crash simulator
(tests/_crashsim.py), keeps its promise at every crash point (15 sampled
ones of the larger chain), with "all kept", "none kept", "newest only" and
two random subsets of the pages and directory entries not yet made durable;
four scenarios again with 512-byte units.  ``scripts/crashcheck.py`` runs
every point with more subsets and prints the figures (docs/guarantees.md
quotes them).

The self-tests prove the simulator can fail: without the fsync that makes a
coalesce batch durable before its checkpoint records it, or without the
directory fsync after a flatten's rename, it reports a violation.
``scripts/fsync_mutants.py`` does the same for every fsync call site."""
from __future__ import annotations

import os

import pytest
from _crashsim import PAGE, Inode, _file_after_crash, explore, supported
from _powercut import SCENARIOS, coalesce_scenario, output_scenario, run_scenario

from vhdcore import _io
from vhdcore.disk import VhdFile

pytestmark = pytest.mark.skipif(not supported(), reason="cannot map a file descriptor to its path here")

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_power_cut(tmp_path, name):
    _, points = SCENARIOS[name]
    st = run_scenario(name, tmp_path / "w", points=points, subsets=2, seed=1)
    print(st.line())
    assert st.points >= min(points or st.operations, st.operations) > 0
    assert st.variants >= st.points
    assert st.violations == []


#: scenarios also run with each 512-byte sector kept or lost on its own (the
#: smallest unit storage writes whole): metadata written side by side, such
#: as a relocated header and the footer after it, may then part
SECTOR_SCENARIOS = ["relink", "coalesce --relink (grow, BAT moves)",
                    "write (differencing)", "repair (older footer where the data ends)"]


@pytest.mark.parametrize("name", SECTOR_SCENARIOS)
def test_power_cut_sectors(tmp_path, name):
    st = run_scenario(name, tmp_path / "w", points=None, subsets=2, seed=2, unit=512)
    print(st.line())
    assert st.points > 0 and st.violations == []


def test_self_test_missing_fsync_before_checkpoint(tmp_path, monkeypatch):
    """Coalesce without the fsync that makes a batch (its blocks and BAT
    entries) durable before the checkpoint records it: after a power cut
    the re-run skips blocks the parent never received."""
    real = VhdFile._sync

    def sync(self: VhdFile) -> None:
        # the fsync at the end of flush(): the BAT was just written
        import sys
        if sys._getframe(1).f_code.co_name == "flush" and os.path.basename(self.path) == "d0.vhd":
            return
        real(self)

    monkeypatch.setattr(VhdFile, "_sync", sync)
    root = tmp_path / "w"
    root.mkdir()
    run, check = coalesce_scenario("dynamic", False, False)(root)
    st = explore("coalesce without the checkpoint barrier", root, run, check, subsets=2, seed=1)
    assert st.violations, "the simulator missed a missing fsync"
    assert "parent != child's old view" in st.violations[0] or "lost" in st.violations[0]


def test_self_test_missing_directory_fsync(tmp_path, monkeypatch):
    """flatten without the directory fsync after its rename: the finished
    output can vanish."""
    monkeypatch.setattr("vhdcore.coalesce._fsync_dir", lambda path: None)
    root = tmp_path / "w"
    root.mkdir()
    run, check = output_scenario("flatten-vhd")(root)
    st = explore("flatten without the directory fsync", root, run, check, subsets=0)
    assert st.violations and "vanished" in st.violations[0]


def test_model_of_one_file():
    """The crash model itself: durable bytes stay, dirty pages come or go one
    by one, and the length follows the page holding the new last byte."""
    ino = Inode(b"a" * PAGE * 2)
    ino.vol[:] = b"b" * PAGE * 3  # rewrote both pages, appended a third
    ino.dirty = {0: 1, 1: 1, 2: 2}
    assert _file_after_crash(ino, lambda k=0: True) == b"b" * PAGE * 3
    assert _file_after_crash(ino, lambda k=0: False) == b"a" * PAGE * 2
    flips = iter([True, False, False])  # page 0 kept, 1 lost, 2 (the new end) lost
    assert _file_after_crash(ino, lambda k=0: next(flips)) == b"b" * PAGE + b"a" * PAGE
    # only the newest write (operation 2, the new last page) kept: the file grows
    assert _file_after_crash(ino, lambda k=0: k == 2) == b"a" * PAGE * 2 + b"b" * PAGE


def test_recorder_sees_creates_renames_and_directory_fsyncs(tmp_path):
    from _crashsim import Recorder, crash_view, replay
    import random

    root = tmp_path / "r"
    root.mkdir()
    (root / "old").write_bytes(b"old")
    with Recorder(root) as rec:
        _io.atomic_write(str(root / "old"), b"new!")
    kinds = [op[0] for op in rec.ops]
    assert kinds == ["create", "write", "fsync", "rename", "fsyncdir"]
    states = {k: (crash_view(st, "none", random.Random(0)), crash_view(st, "all", random.Random(0)))
              for k, st in replay(rec)}
    # before the directory fsync the rename may be lost; after it, never
    none4, all4 = states[4]
    assert none4[str(root / "old")] == b"old" and all4[str(root / "old")] == b"new!"
    none5, _ = states[5]
    assert none5[str(root / "old")] == b"new!"
