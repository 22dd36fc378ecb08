"""The imaging job: staged progress, round trips through every target,
timeout/interrupt and resume, estimate vs what is stored, bad input, the CLI
contract (exit codes, --json) and the demo."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import vhdcore.imaging as imaging
from _swift import CountingStore, require_s3, require_swift, unique
from vhdcore.chain import Chain
from vhdcore.errors import JobStateError, StoreError, VhdError, VhdTimeoutError
from vhdcore.estimate import estimate
from vhdcore.imaging import create_image, job_state_path
from vhdcore.store import open_store, restore
from vhdcore._workloads import make_chain

MiB = 1024 * 1024


def digest_of(path) -> str:
    h = hashlib.sha256()
    with Chain.open(path) as c:
        for v in c.iter_raw(8 * MiB):
            h.update(v)
    return h.hexdigest()


def file_hashes(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("chain"), "realistic", size=48 * MiB, layers=3,
                      seed=5, block_size=512 * 1024)


def _targets():
    return ["file", "swift", "s3"]


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        (tmp_path / "out").mkdir()
        return f"file://{tmp_path}/out/image"
    if kind == "swift":
        require_swift()
        from _swift import swift_connection

        c = unique("img")
        swift_connection().put_container(c)
        return f"swift://{c}/disk-image"
    require_s3()
    from _swift import s3_client

    b = unique("img").lower().replace("_", "-")
    s3_client().create_bucket(Bucket=b)
    return f"s3://{b}/disk-image"


@pytest.mark.parametrize("kind", _targets())
def test_stages_progress_and_round_trip(chain, tmp_path, kind):
    url = _url(kind, tmp_path)
    before = file_hashes(chain.paths)
    events = []
    res = create_image(chain.leaf, url, segment_size=5 * MiB + 64 * 1024, progress=events.append,
                       state_dir=tmp_path / "state", fs_aware=False)
    # the published stages in order, with their percentages
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["queued", "coalescing", "uploading", "done"]
    assert {e.stage: e.percent for e in events} == {"queued": 0, "coalescing": 25,
                                                   "uploading": 50, "done": 100}
    for stage, total in (("coalescing", res.virtual_size), ("uploading", res.stream_size)):
        ev = [e for e in events if e.stage == stage]
        done = [e.bytes_done for e in ev]
        assert done == sorted(done), f"{stage} progress went backwards"
        assert all(e.bytes_total == total for e in ev)
        assert all(0.0 <= e.fraction <= 1.0 for e in ev)
    up = [e for e in events if e.stage == "uploading"]
    assert up[-1].bytes_done == res.stream_size
    assert up[-1].blocks_done == up[-1].blocks_total == res.blocks_stored
    assert events[-1].bytes_done == events[-1].bytes_total == res.stream_size
    assert events[-1].eta == 0.0
    assert res.segments >= 2
    assert not os.path.exists(job_state_path(url, tmp_path / "state"))
    # restore gives the chain's disk exactly; metadata describes it
    out = tmp_path / "restored.vhd"
    man = restore(url, out)
    assert digest_of(out) == digest_of(chain.leaf)
    assert man.metadata["virtual-size"] == str(chain.virtual_size)
    assert man.metadata["sha256"] == res.sha256
    assert man.metadata["codec"] and man.metadata["vhdcore-version"]
    raw = tmp_path / "restored.raw"
    restore(url, raw, format="raw")
    with Chain.open(chain.leaf) as c:
        assert hashlib.sha256(raw.read_bytes()).hexdigest() == hashlib.sha256(
            c.read(0, c.virtual_size)).hexdigest()
    assert file_hashes(chain.paths) == before, "imaging modified the source chain"


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 tool not installed")
def test_stock_lz4_restores_the_stored_image(chain, tmp_path):
    url = f"file://{tmp_path}/image"
    create_image(chain.leaf, url, segment_size=5 * MiB, state_dir=tmp_path)
    seg_dir = tmp_path / "image.segments"
    whole = b"".join(p.read_bytes() for p in sorted(seg_dir.glob("*.lz4")))
    (tmp_path / "image.vhd.lz4").write_bytes(whole)
    subprocess.run(["lz4", "-d", "-f", "-q", str(tmp_path / "image.vhd.lz4"),
                    str(tmp_path / "image.vhd")], check=True)
    assert digest_of(tmp_path / "image.vhd") == digest_of(chain.leaf)
    if shutil.which("qemu-img"):
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(tmp_path / "image.vhd"),
                        str(tmp_path / "q.raw")], check=True)
        with Chain.open(chain.leaf) as c:
            assert (tmp_path / "q.raw").read_bytes() == c.read(0, c.virtual_size)


class _Clock:
    """A monotonic clock that jumps far ahead once ``jump`` is set, or after
    ``after`` readings."""

    def __init__(self, after: int | None = None) -> None:
        import time as _t

        self.after = after
        self.jump = False
        self.n = 0
        self._t = _t

    def monotonic(self) -> float:
        self.n += 1
        if self.after is not None and self.n > self.after:
            self.jump = True
        return self._t.monotonic() + (1e9 if self.jump else 0.0)

    def __getattr__(self, name):
        return getattr(self._t, name)


def _counting(monkeypatch):
    stores = []
    real = imaging.open_store

    def wrapped(url, **kw):
        s = CountingStore(real(url, **kw))
        stores.append(s)
        return s

    monkeypatch.setattr(imaging, "open_store", wrapped)
    return stores


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_timeout_then_resume_matches_uninterrupted(chain, tmp_path, monkeypatch, seed):
    (tmp_path / "ref").mkdir()
    (tmp_path / "job").mkdir()
    ref_url = f"file://{tmp_path}/ref/image"
    ref = create_image(chain.leaf, ref_url, segment_size=5 * MiB, state_dir=tmp_path)
    ref_man = open_store(ref_url).get_manifest()
    url = f"file://{tmp_path}/job/image"
    stores = _counting(monkeypatch)
    # stop at its timeout at a random point of the upload, then resume
    stop_at = random.Random(seed).randrange(1, ref.stream_size)
    clock = _Clock()
    monkeypatch.setattr(imaging, "time", clock)

    def watch(ev):
        if ev.stage == "uploading" and ev.bytes_done >= stop_at:
            clock.jump = True

    with pytest.raises(VhdTimeoutError, match="--resume"):
        create_image(chain.leaf, url, segment_size=5 * MiB, timeout=100, progress=watch)
    assert os.path.exists(job_state_path(url))
    with pytest.raises(StoreError):
        open_store(url).get_manifest()  # nothing claims to be complete
    import time as real_time

    monkeypatch.setattr(imaging, "time", real_time)
    res = create_image(chain.leaf, url, segment_size=5 * MiB, resume=True)
    assert res.resumed
    first, second = stores[0].puts, stores[1].puts
    assert first, "the first run stopped before uploading anything"
    assert not set(first) & set(second), "a finished segment was sent again"
    assert sorted(first + second) == list(range(ref.segments))
    man = open_store(url).get_manifest()
    assert [(s.size, s.etag) for s in man.segments] == [(s.size, s.etag) for s in ref_man.segments]
    assert man.metadata["sha256"] == ref.sha256
    assert not os.path.exists(job_state_path(url))


def test_interrupt_then_resume(chain, tmp_path):
    url = f"file://{tmp_path}/image"
    calls = {"n": 0}

    def ctrl_c(ev):
        calls["n"] += 1
        if ev.stage == "uploading" and ev.bytes_done > 0:
            raise KeyboardInterrupt

    with pytest.raises(VhdTimeoutError, match="interrupted"):
        create_image(chain.leaf, url, segment_size=5 * MiB, progress=ctrl_c)
    res = create_image(chain.leaf, url, segment_size=5 * MiB, resume=True)
    out = tmp_path / "r.vhd"
    restore(url, out)
    assert digest_of(out) == digest_of(chain.leaf)
    assert res.sha256 == open_store(url).get_manifest().metadata["sha256"]


def test_coalesce_timeout_then_resume(chain, tmp_path, monkeypatch):
    url = f"file://{tmp_path}/image"
    monkeypatch.setattr(imaging, "time", _Clock(6))
    with pytest.raises(VhdTimeoutError, match="coalesc"):
        create_image(chain.leaf, url, coalesce_timeout=50)
    state = json.loads(open(job_state_path(url)).read())
    assert state["stage"] == "coalescing" and 0 < state["scanned_to"]
    import time as real_time

    monkeypatch.setattr(imaging, "time", real_time)
    create_image(chain.leaf, url, resume=True)
    out = tmp_path / "r.vhd"
    restore(url, out)
    assert digest_of(out) == digest_of(chain.leaf)


def test_job_state_rules(chain, tmp_path, monkeypatch):
    url = f"file://{tmp_path}/image"
    with pytest.raises(JobStateError, match="nothing to resume"):
        create_image(chain.leaf, url, resume=True)
    monkeypatch.setattr(imaging, "time", _Clock(5))
    with pytest.raises(VhdTimeoutError):
        create_image(chain.leaf, url, timeout=10)
    import time as real_time

    monkeypatch.setattr(imaging, "time", real_time)
    # a state exists: a plain re-run must not silently resume or discard it
    with pytest.raises(JobStateError, match="--resume"):
        create_image(chain.leaf, url)
    # the state belongs to another job when the source is another chain
    other = make_chain(tmp_path / "other", "sparse", size=8 * MiB, layers=2, seed=9)
    with pytest.raises(JobStateError, match="another job"):
        create_image(other.leaf, url, resume=True)
    # a damaged state file
    spath = job_state_path(url)
    good = open(spath).read()
    open(spath, "w").write("{garbage")
    with pytest.raises(JobStateError):
        create_image(chain.leaf, url, resume=True)
    open(spath, "w").write(good)
    create_image(chain.leaf, url, restart=True)
    assert not os.path.exists(spath)


def test_estimate_matches_what_is_stored(chain, tmp_path):
    est = estimate(chain.leaf)
    res = create_image(chain.leaf, f"file://{tmp_path}/image")
    assert est["blocks_stored"] == res.blocks_stored
    assert est["stream_bytes"] == res.stream_size
    assert est["virtual_size"] == res.virtual_size
    assert est["vhd_bytes"] == sum(os.path.getsize(p) for p in chain.paths)
    assert abs(est["expected_compressed_bytes"] - res.compressed_size) <= 0.15 * res.compressed_size
    assert est["rule_of_thumb_seconds"] == pytest.approx(est["vhd_bytes"] / 1e9 * 120, abs=0.1)
    assert est["predicted_seconds"] > 0
    assert [ly["allocated_bytes"] for ly in est["layers"]][::-1] == [
        w for w in chain.written]


def test_bad_input_and_refusing_targets(chain, tmp_path):
    not_vhd = tmp_path / "x.vhd"
    not_vhd.write_bytes(b"hello" * 1000)
    with pytest.raises(VhdError):
        create_image(not_vhd, f"file://{tmp_path}/a")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in chain.paths[1:]:
        shutil.copy(p, broken / p.name)  # the base is missing
    with pytest.raises(VhdError, match="parent"):
        create_image(broken / chain.leaf.name, f"file://{tmp_path}/b")
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises((StoreError, OSError)):
        create_image(chain.leaf, f"file://{blocker}/sub/image", state_dir=tmp_path / "st")
    with pytest.raises(StoreError):
        create_image(chain.leaf, "ftp://example/image")


def _cli(*args, check=None):
    return subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True,
                          text=True)


def test_cli_contract(chain, tmp_path):
    url = f"file://{tmp_path}/image"
    r = _cli("image", chain.leaf, "--to", url, "--json", "--timeout", "0", "--no-fs-aware")
    assert r.returncode == 4, r.stderr
    assert "--resume" in r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["event"] == "progress" and lines[0]["stage"] == "queued"
    assert lines[-1]["event"] == "error" and lines[-1]["exit_code"] == 4
    r = _cli("image", chain.leaf, "--to", url, "--json", "--no-fs-aware")
    assert r.returncode == 1 and "--resume" in r.stderr
    r = _cli("image", chain.leaf, "--to", url, "--json", "--resume", "--no-fs-aware")
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines()]
    stages = [e.get("stage") for e in events if e["event"] == "progress"]
    assert stages[0] == "queued" and stages[-1] == "done"
    assert events[-1]["event"] == "result"
    r = _cli("restore", url, tmp_path / "r.raw", "--format", "raw")
    assert r.returncode == 0, r.stderr
    r = _cli("estimate", chain.leaf, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["blocks_stored"] > 0
    r = _cli("image", tmp_path / "missing.vhd", "--to", url + "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = _cli("restore", f"file://{tmp_path}/nothing-here", tmp_path / "x.vhd")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not (tmp_path / "x.vhd").exists()


def test_cli_demo_runs(tmp_path):
    r = _cli("demo", "--size", "48M", "--json")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["event"] == "result" and last["verified"] is True
    assert last["stored_bytes"] < last["vhd_files_bytes"]


def test_zero_blocks_are_never_compressed_or_sent(tmp_path, monkeypatch):
    """A mostly-zero disk, including allocated blocks that hold only zeros:
    exactly the stored blocks (+ head and footer) are compressed and sent."""
    w = make_chain(tmp_path / "c", "sparse", size=64 * MiB, layers=2, seed=3,
                   block_size=512 * 1024)
    with Chain.open(w.leaf) as c:
        candidates = len(c.allocated_blocks())
    calls = []
    real = imaging.compress_frame
    monkeypatch.setattr(imaging, "compress_frame", lambda b: calls.append(len(b)) or real(b))
    (tmp_path / "o").mkdir()
    res = create_image(w.leaf, f"file://{tmp_path}/o/img")
    assert res.blocks_stored < candidates  # the all-zero allocated blocks were dropped
    assert len(calls) == res.blocks_stored + 2
    assert res.stream_size == (calls[0] + sum(calls[1:-1]) + calls[-1])


@pytest.fixture(scope="module")
def odd_chain(tmp_path_factory):
    """A chain whose virtual size ends 7 sectors into its last block, with
    full blocks before it written everywhere (so pooled buffers carry bits)."""
    from _builders import build_chain

    return build_chain(tmp_path_factory.mktemp("odd"), size=12 * 512 * 1024 + 7 * 512, depth=2,
                       block_size=512 * 1024, writes_per_layer=200, base_writes=0,
                       max_len=512 * 1024, seed=3)


def test_short_last_block_has_zero_bitmap_padding(odd_chain):
    from vhdcore.coalesce import iter_image_blocks

    with Chain.open(odd_chain.leaf) as c:
        n_last = c.block_sectors(c.nblocks - 1)
        assert n_last == 7
        for threads in (1, 2, 3):
            seen = False
            for blk in iter_image_blocks(c, threads=threads):
                if blk.index == c.nblocks - 1:
                    seen = True
                    bm = bytes(blk.bitmap)
                    # sectors 0..6 are bits 7..1 of byte 0; everything after is padding
                    assert bm[0] & 0x01 == 0 and not any(bm[1:]), f"stale bits (threads={threads})"
            assert seen


def test_odd_size_image_is_deterministic_and_restores(odd_chain, tmp_path, monkeypatch):
    """Same chain and options give identical image bytes whatever the thread
    count, and across a stop + --resume; the restored disk equals the model."""
    urls = []
    for i, threads in enumerate((1, 2, 3)):
        (tmp_path / f"o{i}").mkdir()
        url = f"file://{tmp_path}/o{i}/img"
        create_image(odd_chain.leaf, url, threads=threads, segment_size=1 * MiB,
                     state_dir=tmp_path / "st")
        urls.append(url)
    # a stopped and resumed run, from a pass with other threads
    (tmp_path / "r").mkdir()
    url = f"file://{tmp_path}/r/img"
    clock = _Clock()
    monkeypatch.setattr(imaging, "time", clock)

    def watch(ev):
        if ev.stage == "uploading" and ev.bytes_done > 2 * MiB:
            clock.jump = True

    with pytest.raises(VhdTimeoutError):
        create_image(odd_chain.leaf, url, threads=1, segment_size=1 * MiB, timeout=100,
                     progress=watch, state_dir=tmp_path / "st")
    import time as real_time

    monkeypatch.setattr(imaging, "time", real_time)
    create_image(odd_chain.leaf, url, threads=3, segment_size=1 * MiB, resume=True,
                 state_dir=tmp_path / "st")
    urls.append(url)
    mans = [open_store(u).get_manifest() for u in urls]
    first = [(s.size, s.etag) for s in mans[0].segments]
    for m in mans[1:]:
        assert [(s.size, s.etag) for s in m.segments] == first
        assert m.sha256 == mans[0].sha256
    for i, u in enumerate(urls):
        out = tmp_path / f"restored{i}.vhd"
        restore(u, out)
        with Chain.open(out) as c:
            assert c.read(0, c.virtual_size) == bytes(odd_chain.model)


# ---------------------------------------------------------------- re-imaging
#: a re-image onto a complete image may need an explicit opt-in (``replace``)
_REPLACE = ({"replace": True} if "replace" in __import__("inspect").signature(
    create_image).parameters else {})


@pytest.fixture(scope="module")
def chain_b(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("chain_b"), "realistic", size=40 * MiB, layers=2,
                      seed=11, block_size=512 * 1024)


def _stored_objects(url: str) -> set[str]:
    """Every object the target holds for the image at ``url`` (segments of any
    generation, unfinished uploads, manifests)."""
    from urllib.parse import urlparse

    p = urlparse(url)
    if p.scheme == "file":
        d = Path(p.path).parent
        return {str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()}
    if p.scheme == "swift":
        from _swift import swift_connection

        conn = swift_connection()
        name = p.path.lstrip("/")
        _, segs = conn.get_container(f"{p.netloc}_segments", prefix=name + "/", full_listing=True)
        _, objs = conn.get_container(p.netloc, full_listing=True)
        return {"seg:" + o["name"] for o in segs} | {o["name"] for o in objs}
    from _swift import s3_client

    c = s3_client()
    key = p.path.lstrip("/")
    objs = {o["Key"] for o in c.list_objects_v2(Bucket=p.netloc).get("Contents", [])}
    ups = {"upload:" + u["Key"] for u in c.list_multipart_uploads(Bucket=p.netloc).get("Uploads", [])}
    assert all(k.startswith(key) for k in objs)
    return objs | ups


def _expected_objects(url: str) -> int:
    """How many objects a complete image at ``url`` consists of, with nothing
    left over: per segment 2 files (data + .md5) plus the manifest for a
    directory; segments plus the SLO manifest for Swift; the object and
    its record for S3."""
    man = open_store(url).get_manifest()
    kind = url.split(":")[0]
    return {"file": 2 * len(man.segments) + 1, "swift": len(man.segments) + 1, "s3": 2}[kind]


@pytest.mark.parametrize("kind,how", [("file", "timeout"), ("file", "interrupt"),
                                      ("file", "store-failure"), ("swift", "timeout"),
                                      ("swift", "store-failure"), ("s3", "timeout"),
                                      ("s3", "store-failure")])
def test_stopped_reimage_keeps_the_old_image(chain, chain_b, tmp_path, monkeypatch, kind, how):
    """A re-image over a complete image that stops midway leaves the old image
    complete and restorable, and the new job resumable; once the new one is
    complete, nothing of the old one is left."""
    url = _url(kind, tmp_path)
    seg = 5 * MiB + 64 * 1024
    st = tmp_path / "state"
    create_image(chain.leaf, url, segment_size=seg, state_dir=st)
    old_digest = digest_of(chain.leaf)
    old_objects = _stored_objects(url)
    assert len(old_objects) == _expected_objects(url)
    clock = _Clock()
    monkeypatch.setattr(imaging, "time", clock)
    stores = _counting(monkeypatch)

    submitted = []

    class Recording(imaging.SegmentUploader):
        def submit(self, index, data, md5_hex=None):
            super().submit(index, data, md5_hex)
            submitted.append(index)

    monkeypatch.setattr(imaging, "SegmentUploader", Recording)

    def watch(ev):
        # stop once a segment of the new image is handed to the uploader (the
        # stop lets it finish; the segment's own progress event sees it)
        if ev.stage == "uploading" and submitted:
            if how == "timeout":
                clock.jump = True
            elif how == "interrupt":
                raise KeyboardInterrupt

    if how == "store-failure":
        real = imaging.open_store

        def failing(u, **kw):
            s = CountingStore(real(u, **kw), fail_after=1)
            stores.append(s)
            return s

        monkeypatch.setattr(imaging, "open_store", failing)
    with pytest.raises((VhdTimeoutError, StoreError)):
        create_image(chain_b.leaf, url, segment_size=seg, timeout=1000, progress=watch,
                     state_dir=st, **_REPLACE)
    assert stores[-1].puts, "the re-image stopped before writing anything"
    import time as real_time

    monkeypatch.setattr(imaging, "time", real_time)
    monkeypatch.undo()
    # the old image is still complete, and every object of it untouched
    assert old_objects <= _stored_objects(url)
    out = tmp_path / "old.vhd"
    man = restore(url, out)
    assert digest_of(out) == old_digest
    # the new job resumes and replaces it; nothing of the old image stays
    res = create_image(chain_b.leaf, url, segment_size=seg, resume=True, state_dir=st, **_REPLACE)
    assert res.resumed and res.segments_skipped >= 1
    out = tmp_path / "new.vhd"
    man = restore(url, out)
    assert digest_of(out) == digest_of(chain_b.leaf)
    assert man.sha256 == res.sha256
    left = _stored_objects(url)
    assert len(left) == _expected_objects(url), sorted(left)
    if kind != "s3":  # S3 keeps the record's name; its content changed
        assert not (left & old_objects) - {"image.manifest.json", url.rsplit("/", 1)[1]}
    # and a third image over that one (the generations alternate)
    create_image(chain.leaf, url, segment_size=seg, state_dir=st, **_REPLACE)
    restore(url, out, overwrite=True)
    assert digest_of(out) == old_digest
    assert len(_stored_objects(url)) == _expected_objects(url)


def test_s3_reimage_failing_at_the_switch_keeps_the_old_image(chain, chain_b, tmp_path,
                                                               monkeypatch):
    """S3: the new multipart upload completes, then writing the manifest
    record (the switch) fails: the old image must still restore (its object
    was never replaced), and a resume finishes the new one."""
    url = _url("s3", tmp_path)
    seg = 5 * MiB + 64 * 1024
    st = tmp_path / "state"
    create_image(chain.leaf, url, segment_size=seg, state_dir=st)
    real = imaging.open_store

    def failing_record(u, **kw):
        s = real(u, **kw)
        put = s._client.put_object

        def put_object(**a):
            if a.get("Key", "").endswith(".vhdcore.json"):
                raise ConnectionResetError("injected: connection lost writing the record")
            return put(**a)

        s._client.put_object = put_object
        s.retry = type(s.retry)(attempts=1)
        return s

    monkeypatch.setattr(imaging, "open_store", failing_record)
    with pytest.raises(StoreError):
        create_image(chain_b.leaf, url, segment_size=seg, state_dir=st, **_REPLACE)
    monkeypatch.undo()
    out = tmp_path / "old.vhd"
    restore(url, out)
    assert digest_of(out) == digest_of(chain.leaf)
    create_image(chain_b.leaf, url, segment_size=seg, resume=True, state_dir=st, **_REPLACE)
    restore(url, out, overwrite=True)
    assert digest_of(out) == digest_of(chain_b.leaf)
    assert len(_stored_objects(url)) == 2


def test_image_files_honour_the_umask_and_job_state_stays_private(odd_chain, tmp_path,
                                                                   monkeypatch):
    url = f"file://{tmp_path}/img"
    old = os.umask(0o002)
    try:
        monkeypatch.setattr(imaging, "time", _Clock(8))
        with pytest.raises(VhdTimeoutError):
            create_image(odd_chain.leaf, url, segment_size=1 * MiB, timeout=100)
        assert os.stat(job_state_path(url)).st_mode & 0o777 == 0o600
        monkeypatch.undo()
        create_image(odd_chain.leaf, url, segment_size=1 * MiB, resume=True)
        restore(url, tmp_path / "out.vhd")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 3
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o664, p
