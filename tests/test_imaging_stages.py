"""The imaging pipeline's stages, each alone: the planner agrees with the
block stream on which blocks carry data (over drawn chain shapes, with and
without a free map), the segment packer packs like ``pack_segments``, the
frame window keeps order and passes skipped frames through, and the stream
source produces the head, the planned blocks and the footer in order."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _shapes_image import build, shapes
from vhdcore.chain import Chain
from vhdcore.coalesce import DynamicLayout, iter_image_blocks
from vhdcore.compress import FrameCompressor, compress_frame, decompress_frames
from vhdcore.errors import IntegrityError
from vhdcore.imaging.plan import BlockPlanner
from vhdcore.imaging.stages import StreamSource
from vhdcore.store import SegmentPacker, pack_segments

EXAMPLES = int(os.environ.get("VHDCORE_SHAPE_EXAMPLES", "20"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 20,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _HalfFree:
    """A free map: every other sector of every odd block is free, and block
    2 entirely."""

    skip_blocks = {2}

    def __call__(self, block: int, nsectors: int) -> bytes | None:
        if block % 2 == 0:
            return None
        bits = np.zeros(nsectors, dtype=np.uint8)
        bits[::2] = 1
        return np.packbits(bits).tobytes()


@PROPS
@given(shape=shapes(), threads=st.sampled_from([1, 3]), with_free=st.booleans())
def test_planner_agrees_with_the_block_stream(shape, threads, with_free):
    free = _HalfFree() if with_free else None
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp), shape)
        with Chain.open(built.leaf) as chain:
            planner = BlockPlanner(chain, free, threads=threads)
            cand = planner.candidates()
            planned = [b for b, keep in planner.scan(cand) if keep]
            streamed = [blk.index for blk in iter_image_blocks(chain, threads=2, free_map=free)]
            assert planned == streamed
            assert all(planner.stores(b) for b in planned)


def test_planner_reads_only_until_the_first_data(tmp_path):
    """A block whose first sector holds data is settled by one small read:
    the probe does not merge the block."""
    from vhdcore.disk import create_dynamic

    path = tmp_path / "d.vhd"
    create_dynamic(path, 8 << 20, block_size=2 << 20).close()
    with Chain.open(path, writable=True) as d:
        d.write(0, b"\x01" * 512)                 # block 0: data at once
        d.write(2 << 20, bytes(2 << 20))          # block 1: allocated, all zero
        d.write((4 << 20) + (2 << 20) - 512, b"\x02" * 512)  # block 2: its last sector
    with Chain.open(path) as chain:
        planner = BlockPlanner(chain, threads=1)
        reads: list[int] = []
        real = planner._sector_data

        def counting(layer, block, first, count):
            reads.append(count)
            return real(layer, block, first, count)

        planner._sector_data = counting  # type: ignore[method-assign]
        assert [b for b, keep in planner.scan(planner.candidates()) if keep] == [0, 2]
        # block 0 and block 2 hold one sector each: one read of it settles them;
        # the all-zero block 1 is read whole, in growing pieces from 64 KiB
        assert reads[0] == reads[-1] == 1
        assert reads[1:3] == [128, 256] and sum(reads[1:-1]) == 4096


@pytest.mark.parametrize("size", [1, 7, 64, 100])
def test_packer_packs_like_pack_segments(size):
    rng = np.random.default_rng(size)
    frames = [bytes(int(n)) for n in rng.integers(1, 50, size=size)]
    expect = list(pack_segments(frames, 60))
    p = SegmentPacker(60)
    got = []
    for i, f in enumerate(frames):
        seg = p.add(i, f)
        if seg is not None:
            got.append(seg)
    last = p.flush(len(frames))
    if last is not None:
        got.append(last)
    assert [(s[0], s[3]) for s in got] == expect
    # the frame ranges tile the frames
    assert [s[1] for s in got] == [0] + [s[1] + s[2] for s in got][:-1]
    assert sum(s[2] for s in got) == len(frames)


def test_packer_skip_numbers_the_stored_segment():
    p = SegmentPacker(10)
    assert p.add(0, b"abc") is None
    assert p.flush(1) == (0, 0, 1, b"abc")
    assert p.skip(1, 3) == 1
    assert p.add(4, b"de") is None
    assert p.flush(5) == (2, 4, 1, b"de")
    p.add(5, b"x")
    with pytest.raises(ValueError):
        p.skip(6, 1)


@pytest.mark.parametrize("threads", [1, 3])
def test_frame_window_keeps_order_and_skips(threads):
    chunks = [os.urandom(1000 + i) if i % 3 else None for i in range(40)]
    with FrameCompressor(threads=threads, max_in_flight=4) as fc:
        out = list(fc.compress_optional(chunks))
    assert len(out) == len(chunks)
    for c, f in zip(chunks, out):
        assert (f is None) == (c is None)
        if c is not None:
            assert decompress_frames(f) == c


def test_stream_source_frames_in_order(tmp_path):
    from vhdcore._workloads import make_chain

    w = make_chain(tmp_path / "c", "sparse", size=16 << 20, layers=2, seed=3,
                   block_size=512 * 1024)
    with Chain.open(w.leaf) as chain:
        blocks = [blk.index for blk in iter_image_blocks(chain)]
        layout = DynamicLayout(chain.virtual_size, chain.block_size)
        head, tail = layout.head(blocks), layout.tail()
        src = StreamSource(chain, blocks, head, tail, threads=2)
        frames = list(src.frames(lambda i: i != 1))
        assert len(frames) == len(blocks) + 2 == src.nframes
        assert frames[0] == head and frames[-1] == tail and frames[1] is None
        assert [m.index for m in src.meta] == list(range(src.nframes))
        assert [m.rank for m in src.meta] == [-1, *range(len(blocks)), -1]
        assert src.bytes_read == layout.stream_size(len(blocks))
        h = hashlib.sha256(head)
        for blk in iter_image_blocks(chain):
            h.update(bytes(blk.bitmap) + bytes(blk.data))
        h.update(tail)
        assert src.sha.hexdigest() == h.hexdigest()
        # a plan that names a block the chain does not hold: the chain changed
        bad = StreamSource(chain, blocks + [chain.nblocks - 1] if chain.nblocks - 1 not in blocks
                           else blocks[:-1] + [0], head, tail)
        with pytest.raises(IntegrityError):
            list(bad.frames())
    assert compress_frame(b"") != b""


def _interrupted_upload(tmp_path):
    """A job interrupted after its first segment is stored: (leaf, url)."""
    from vhdcore._workloads import make_chain
    from vhdcore.errors import VhdTimeoutError
    from vhdcore.imaging import create_image

    w = make_chain(tmp_path / "c", "realistic", size=24 << 20, layers=2, seed=4,
                   block_size=512 * 1024)
    url = f"file://{tmp_path}/image"

    def stop(ev):
        if ev.stage == "uploading" and ev.blocks_done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(VhdTimeoutError):
        create_image(w.leaf, url, segment_size=1 << 20, progress=stop, fs_aware=False)
    return w.leaf, url


def test_adopted_segment_must_match_the_chain(tmp_path):
    """A resumed job checks the xxh3 its state recorded for each segment it
    adopts without sending it again: a mismatch means the chain changed."""
    import json

    from vhdcore.imaging import create_image, job_state_path

    leaf, url = _interrupted_upload(tmp_path)
    spath = job_state_path(url)
    state = json.loads(open(spath).read())
    assert state["segments"] and all("xxh3" in r for r in state["segments"].values())
    good = json.dumps(state)
    for rec in state["segments"].values():
        rec["xxh3"] = "0" * 16
    open(spath, "w").write(json.dumps(state))
    with pytest.raises(IntegrityError, match="no longer matches"):
        create_image(leaf, url, segment_size=1 << 20, resume=True, fs_aware=False)
    open(spath, "w").write(good)
    res = create_image(leaf, url, segment_size=1 << 20, resume=True, fs_aware=False)
    assert res.segments_skipped >= 1


def test_state_of_earlier_releases_resumes(tmp_path):
    """A job state whose plan lists ``[block, fingerprint, sectors]`` (as
    the two-pass job wrote it) and whose segments carry no xxh3 resumes
    into the same image."""
    import json

    from vhdcore.imaging import create_image, job_state_path
    from vhdcore.store import open_store

    leaf, url = _interrupted_upload(tmp_path)
    spath = job_state_path(url)
    state = json.loads(open(spath).read())
    state["plan"] = [[b, "feedfacecafebeef", 1024] for b in state["plan"]]
    for rec in state["segments"].values():
        del rec["xxh3"]
    open(spath, "w").write(json.dumps(state))
    res = create_image(leaf, url, segment_size=1 << 20, resume=True, fs_aware=False)
    assert res.resumed and res.segments_skipped >= 1
    (tmp_path / "ref").mkdir()
    ref = create_image(leaf, f"file://{tmp_path}/ref/image", segment_size=1 << 20,
                       fs_aware=False)
    assert res.sha256 == ref.sha256
    a = open_store(url).get_manifest().segments
    b = open_store(f"file://{tmp_path}/ref/image").get_manifest().segments
    assert [(s.size, s.etag) for s in a] == [(s.size, s.etag) for s in b]


def _source(tmp_path, seed=5):
    from vhdcore._workloads import make_chain

    w = make_chain(tmp_path / "c", "realistic", size=16 << 20, layers=2, seed=seed,
                   block_size=512 * 1024)
    chain = Chain.open(w.leaf)
    blocks = [blk.index for blk in iter_image_blocks(chain)]
    layout = DynamicLayout(chain.virtual_size, chain.block_size)
    expected = [layout.head(blocks)]
    expected += [bytes(b.bitmap) + bytes(b.data) for b in iter_image_blocks(chain)]
    expected.append(layout.tail())
    return chain, blocks, layout, expected


def test_stream_source_frames_are_merged_in_place_and_kept_until_released(tmp_path):
    """Each block's frame is merged into a buffer of its own (no join) that
    the merge does not reuse before the consumer releases it: without
    releases every frame still reads as it was yielded; with a release after
    each frame the merge cycles through a few buffers only."""
    chain, blocks, layout, expected = _source(tmp_path)
    with chain:
        assert len(blocks) > 12
        src = StreamSource(chain, blocks, expected[0], expected[-1], threads=2)
        kept = list(src.frames())
        src.close()
        assert [bytes(f) for f in kept] == expected
        owners = {id(f.obj) for f in kept[1:-1] if isinstance(f, memoryview)}
        assert len(owners) == len(blocks)  # nothing reused without a release

        src = StreamSource(chain, blocks, expected[0], expected[-1], threads=2)
        seen, owners = [], set()
        for i, frame in enumerate(src.frames()):
            seen.append(bytes(frame))
            if isinstance(frame, memoryview):
                owners.add(id(frame.obj))
            src.release(i)
        src.close()
        assert seen == expected
        # the merge window, the frames the hasher has not reached (its queue
        # and the one in its hands), and the frame in hand
        assert len(owners) <= 2 * 2 + src.hasher._q.maxsize + 2


def test_stream_source_release_waits_for_the_hasher(tmp_path):
    """A released frame's buffer goes back to the merge only once the
    stream's SHA-256 has read it: with a slow hasher and a release right
    after each frame, the digest is still the stream's, and the merge
    used more buffers than with a fast one but no more than the hasher's
    queue allows."""
    import time as _time

    chain, blocks, layout, expected = _source(tmp_path, seed=6)

    class SlowSha:
        def __init__(self):
            self.inner = hashlib.sha256()

        def update(self, data):
            _time.sleep(0.002)  # lets the merge run ahead of the hasher
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    with chain:
        src = StreamSource(chain, blocks, expected[0], expected[-1], threads=2)
        slow = src.hasher.sha = SlowSha()
        owners = set()
        for i, frame in enumerate(src.frames()):
            if isinstance(frame, memoryview):
                owners.add(id(frame.obj))
            src.release(i)
        src.close()
    assert slow.hexdigest() == hashlib.sha256(b"".join(expected)).hexdigest()
    assert 2 * 2 + 1 < len(owners) <= 2 * 2 + src.hasher._q.maxsize + 2


def test_held_block_is_not_reused_and_hold_is_once(tmp_path):
    chain, blocks, layout, expected = _source(tmp_path, seed=7)
    with chain:
        it = iter_image_blocks(chain, threads=2, frames=True)
        first = next(it)
        give_back = first.hold()
        with pytest.raises(ValueError):
            first.hold()
        copy = bytes(first.frame)
        assert copy == bytes(first.bitmap) + bytes(first.data) == expected[1]
        rest = [bytes(b.frame) for b in it]
        assert bytes(first.frame) == copy  # kept while the others were merged
        assert rest == expected[2:-1]
        give_back()


def test_segments_above_the_memory_budget_are_spilled(tmp_path, monkeypatch):
    """Segments larger than the job's memory budget (a target allowing few
    segments makes them large) are packed into scratch files beside the job
    state: the stored image is the one an in-memory job stores, segment for
    segment, it restores byte for byte, an interrupted spilling job resumes,
    and no scratch file is left anywhere."""
    from vhdcore._workloads import make_chain
    from vhdcore.errors import VhdTimeoutError
    from vhdcore.imaging import create_image, job as job_mod
    from vhdcore.store import SpillSegment, open_store, restore
    from vhdcore.store import base as store_base

    w = make_chain(tmp_path / "c", "realistic", size=24 << 20, layers=2, seed=4,
                   block_size=512 * 1024)
    (tmp_path / "ref").mkdir()
    ref = create_image(w.leaf, f"file://{tmp_path}/ref/image", segment_size=1 << 20,
                       fs_aware=False)
    spilled = []
    real_init = SpillSegment.__init__

    def counting_init(self, directory=None):
        spilled.append(directory)
        real_init(self, directory)

    monkeypatch.setattr(store_base.SpillSegment, "__init__", counting_init)
    monkeypatch.setattr(job_mod, "_PENDING_BYTES", 512 * 1024)  # 1 MiB segments now spill
    state_dir = tmp_path / "state"
    url = f"file://{tmp_path}/image"

    def stop(ev):
        if ev.stage == "uploading" and ev.blocks_done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(VhdTimeoutError):
        create_image(w.leaf, url, segment_size=1 << 20, progress=stop, fs_aware=False,
                     state_dir=state_dir)
    n_first = len(spilled)
    assert n_first >= 1
    res = create_image(w.leaf, url, segment_size=1 << 20, resume=True, fs_aware=False,
                       state_dir=state_dir)
    assert res.resumed and res.segments_skipped >= 1
    assert len(spilled) > n_first and set(spilled) == {str(state_dir.resolve())}
    assert res.sha256 == ref.sha256
    a = open_store(url).get_manifest().segments
    b = open_store(f"file://{tmp_path}/ref/image").get_manifest().segments
    assert [(s.size, s.etag) for s in a] == [(s.size, s.etag) for s in b]
    out = tmp_path / "restored.vhd"
    restore(open_store(url), out)
    with Chain.open(w.leaf) as chain, Chain.open(out) as back:
        assert back.virtual_size == chain.virtual_size
        assert back.read(0, chain.virtual_size) == chain.read(0, chain.virtual_size)
    assert list(state_dir.iterdir()) == []  # scratch files are unnamed; the state is gone
