"""Imaging properties over drawn disk shapes (tests/_shapes_image.py):
virtual sizes that are block multiples, odd sector counts and sizes within a
few sectors of a block boundary; block sizes from 4 KiB to 2 MiB; a base
whose last block is stored short; a fixed or dynamic base under 0-4
differencing layers; sector-granular writes.  For each shape:

* ``image`` + ``restore`` through a directory store gives the model's bytes,
  and the same chain gives the same image whatever the thread count;
* ``image`` stopped at a random point then ``--resume``\\d gives the same
  image as an uninterrupted run;
* a re-image over an existing image stopped at a random point leaves the
  old image restorable, and the resumed new one restores to the new content
  with nothing of the old one left.

Bounded for the normal run (the whole file takes well under a minute on an
idle machine).  ``VHDCORE_SHAPE_EXAMPLES=N`` sets the examples per property
(default 20), e.g. ``VHDCORE_SHAPE_EXAMPLES=500`` for a long run.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import time as real_time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vhdcore.imaging as imaging
from _shapes_image import build, disk_bytes, shapes
from vhdcore.errors import VhdTimeoutError
from vhdcore.imaging import create_image, job_state_path
from vhdcore.store import open_store, restore

EXAMPLES = int(os.environ.get("VHDCORE_SHAPE_EXAMPLES", "20"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 20,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: a re-image onto a complete image may need an explicit opt-in
REPLACE = {"replace": True} if "replace" in inspect.signature(create_image).parameters else {}
KiB = 1024


class _StopClock:
    """imaging's clock: jumps far ahead after ``after`` readings, so that the
    job stops at its timeout there (at a safe point)."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.n = 0

    def monotonic(self) -> float:
        self.n += 1
        return real_time.monotonic() + (1e9 if self.n > self.after else 0.0)

    def __getattr__(self, name):
        return getattr(real_time, name)


def _readings(leaf, url, **kw) -> int:
    """Run an imaging job to the end; how many times it read its clock."""
    clock = _StopClock(1 << 60)
    imaging.time = clock  # type: ignore[assignment]
    try:
        create_image(leaf, url, **kw)
    finally:
        imaging.time = real_time  # type: ignore[assignment]
    return clock.n


def _image(leaf, url, *, stop_after: int, **kw) -> bool:
    """Run an imaging job stopped at its timeout after ``stop_after`` clock
    readings.  True if it completed all the same."""
    imaging.time = _StopClock(stop_after)  # type: ignore[assignment]
    try:
        create_image(leaf, url, timeout=1000.0, **kw)
        return True
    except VhdTimeoutError:
        return False
    finally:
        imaging.time = real_time  # type: ignore[assignment]


def _files(d: Path) -> set[str]:
    return {p.name for p in d.rglob("*") if p.is_file()}


def _restored(url: str, out: Path) -> bytes:
    restore(url, out)
    data = disk_bytes(out)
    out.unlink()
    return data


@PROPS
@given(shape=shapes(), threads=st.integers(1, 3), seg_kib=st.sampled_from([16, 64, 256, 4096]))
def test_image_restore_equals_the_model(shape, threads, seg_kib):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chain = build(tmp, shape)
        event(f"short last block: {chain.short_last}; size % block: {shape.size % shape.block_size > 0}")
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        url_a, url_b = f"file://{tmp}/a/img", f"file://{tmp}/b/img"
        res = create_image(chain.leaf, url_a, threads=threads, segment_size=seg_kib * KiB,
                           state_dir=tmp / "st")
        assert res.virtual_size == shape.size
        assert _restored(url_a, tmp / "r.vhd") == bytes(chain.model)
        # deterministic: another thread count, the same image
        create_image(chain.leaf, url_b, threads=4 - threads, segment_size=seg_kib * KiB,
                     state_dir=tmp / "st")
        a, b = open_store(url_a).get_manifest(), open_store(url_b).get_manifest()
        assert a.sha256 == b.sha256 and a.segments == b.segments


@PROPS
@given(shape=shapes(), stop=st.floats(0.0, 1.0), threads=st.integers(1, 3))
def test_stopped_then_resumed_image_is_the_same_image(shape, stop, threads):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chain = build(tmp, shape)
        (tmp / "ref").mkdir()
        (tmp / "job").mkdir()
        ref_url, url = f"file://{tmp}/ref/img", f"file://{tmp}/job/img"
        seg = 32 * KiB
        n = _readings(chain.leaf, ref_url, segment_size=seg, state_dir=tmp / "st")
        done = _image(chain.leaf, url, stop_after=1 + int(stop * (n - 2)), threads=threads,
                      segment_size=seg, state_dir=tmp / "st")
        event("stopped, then resumed" if not done else "ran to the end before the stop")
        if not done:
            assert os.path.exists(job_state_path(url, tmp / "st"))
            create_image(chain.leaf, url, resume=True, threads=4 - threads, segment_size=seg,
                         state_dir=tmp / "st")
        assert not os.path.exists(job_state_path(url, tmp / "st"))
        ref, man = open_store(ref_url).get_manifest(), open_store(url).get_manifest()
        assert man.sha256 == ref.sha256
        assert [(s.size, s.etag) for s in man.segments] == [(s.size, s.etag) for s in ref.segments]
        assert _restored(url, tmp / "r.vhd") == bytes(chain.model)
        assert len(_files(tmp / "job")) == 2 * len(man.segments) + 1


@PROPS
@given(old=shapes(max_depth=3), new=shapes(max_depth=3), stop=st.floats(0.0, 1.0))
def test_stopped_reimage_keeps_the_old_image(old, new, stop):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        (tmp / "new").mkdir()
        (tmp / "out").mkdir()
        a = build(tmp / "old", old, tag="a")
        b = build(tmp / "new", new, tag="b", extra_seed=1)
        url = f"file://{tmp}/out/img"
        seg = 32 * KiB
        (tmp / "scratch").mkdir()
        n = _readings(b.leaf, f"file://{tmp}/scratch/img", segment_size=seg, state_dir=tmp / "st")
        create_image(a.leaf, url, segment_size=seg, state_dir=tmp / "st")
        done = _image(b.leaf, url, stop_after=1 + int(stop * (n - 2)), segment_size=seg,
                      state_dir=tmp / "st", **REPLACE)
        event("re-image stopped, then resumed" if not done else "re-image ran to the end")
        event(f"short last block: {a.short_last or b.short_last}")
        if not done:
            # stopped: the old image is complete and restores to the old content
            assert _restored(url, tmp / "r.vhd") == bytes(a.model)
            create_image(b.leaf, url, resume=True, segment_size=seg, state_dir=tmp / "st",
                         **REPLACE)
        assert _restored(url, tmp / "r.vhd") == bytes(b.model)
        man = open_store(url).get_manifest()
        assert len(_files(tmp / "out")) == 2 * len(man.segments) + 1
