"""A re-image over a complete image in a directory store, with a fault at
every write, fsync and rename it makes (EIO, a full disk, a torn write, a
stop): at every point the target holds a complete image -- the old one until
the manifest switched, the new one after -- and a re-run (``--resume`` when
the job left its state) completes the new image with nothing of the old one
left behind."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _builders import build_chain, read_all
from vhdcore import _io
from vhdcore.errors import VhdError
from vhdcore.imaging import create_image, job_state_path
from vhdcore.store import open_store, restore

KiB = 1024
KINDS = ("eio", "enospc", "short", "stop")


@pytest.fixture(autouse=True)
def no_real_fsync(monkeypatch):
    """Process-level faults (nothing is lost by a power cut here): skip the
    real fsyncs, which are still counted and can fail."""
    monkeypatch.setattr(_io.os, "fsync", lambda fd: None)


def _template(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    t = tmp_path / "template"
    (t / "old").mkdir(parents=True)
    (t / "new").mkdir()
    (t / "out").mkdir()
    a = build_chain(t / "old", size=80 * KiB + 1536, depth=2, block_size=8 * KiB,
                    writes_per_layer=6, max_len=9 * KiB, seed=21)
    b = build_chain(t / "new", size=72 * KiB + 512, depth=3, block_size=8 * KiB,
                    writes_per_layer=5, max_len=9 * KiB, seed=22)
    create_image(a.leaf, _url(t), segment_size=16 * KiB, state_dir=t / "state")
    assert not list((t / "state").glob("*")) if (t / "state").exists() else True
    return t, bytes(a.model), bytes(b.model)


def _url(d: Path) -> str:
    return f"file://{d}/out/image"


def _leaf(d: Path) -> Path:
    return d / "new" / "d2.vhd"


def _op(d: Path) -> None:
    state = job_state_path(_url(d), d / "state")
    create_image(_leaf(d), _url(d), segment_size=16 * KiB, state_dir=d / "state",
                 resume=os.path.exists(state), replace=True)


def _restored(d: Path) -> bytes:
    out = d / "restored.vhd"
    restore(_url(d), out)
    data = read_all(out)
    out.unlink()
    return data


def test_reimage_faults_keep_an_image_at_every_point(tmp_path):
    template, old, new = _template(tmp_path)
    probe = tmp_path / "count"
    shutil.copytree(template, probe)
    with _io.inject(_io.FaultPlan(at=0)) as plan:
        _op(probe)
    count = plan.count
    assert _restored(probe) == new
    assert count >= 20, plan.ops
    print(f"re-image: {count} fault points per kind")
    for kind in KINDS:
        switched = 0
        for n in range(1, count + 1):
            d = tmp_path / f"{kind}-{n}"
            shutil.copytree(template, d)
            plan = _io.FaultPlan(at=n, kind=kind)
            exc: BaseException | None = None
            try:
                with _io.inject(plan):
                    _op(d)
            except (OSError, _io.SimulatedCrash, VhdError) as e:
                exc = e
            where = f"{kind} at operation {n}/{count} ({plan.ops[n - 1]}), raised {exc!r}"
            assert plan.fired, where
            now = _restored(d)  # a complete image is there at every point
            assert now in (old, new), where
            if now == new:
                switched += 1
            else:
                assert exc is not None, where
            if exc is not None:
                _op(d)
            assert _restored(d) == new, where
            assert not os.path.exists(job_state_path(_url(d), d / "state")), where
            man = open_store(_url(d)).get_manifest()
            left = sorted(p.name for p in (d / "out").rglob("*") if p.is_file())
            assert len(left) == 2 * len(man.segments) + 1, (where, left)
            shutil.rmtree(d)
        # the faults fell on both sides of the switch
        assert 0 < switched < count, (kind, switched, count)
