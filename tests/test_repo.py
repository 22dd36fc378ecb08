"""The content-addressed repository (vhdcore.repo): chunk format, images,
incremental reuse from the chain, byte-exact restores across a series of
snapshots, verify and corruption, forget/gc with leases and real concurrent
processes, export to the stream format, resume, hostile content, the CLI."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vhdcore import repo as R
from vhdcore.chain import Chain
from vhdcore.coalesce import coalesce
from vhdcore.disk import create_differencing
from vhdcore.errors import IntegrityError, VhdError, VhdTimeoutError
from vhdcore.repo.format import (
    ZERO_ID,
    RepoFormatError,
    decode_chunk,
    decode_index,
    encode_chunk,
    parse_manifest,
)
from vhdcore._workloads import make_chain

MiB = 1 << 20
SRC = str(Path(__file__).resolve().parent.parent / "src")


def disk_bytes(path) -> bytes:
    with Chain.open(path) as c:
        return c.read(0, c.virtual_size)


def write(path, offset: int, data: bytes) -> None:
    with Chain.open(path, writable=True) as c:
        c.write(offset, data)


def snapshot(parent: Path, child: Path) -> Path:
    create_differencing(child, parent).close()
    return child


def restored(repo: str, ref: str, tmp: Path, fmt: str) -> bytes:
    out = tmp / f"restore-{ref.replace('@', '_')}.{fmt}"
    R.restore(repo, ref, out, format=fmt)
    try:
        if fmt == "raw":
            return out.read_bytes()
        return disk_bytes(out)
    finally:
        out.unlink()


def run_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "vhdcore", *args], capture_output=True, text=True,
                       env=e, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"vhdcore {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture()
def repo(tmp_path) -> str:
    url = str(tmp_path / "repo")
    R.init_repo(url).close()
    return url


# ------------------------------------------------------------------ formats
def test_chunk_roundtrip_and_header_checks():
    rnd = random.Random(1)
    for raw in (rnd.randbytes(100_000), bytes(5000) + b"x", b"a" * 70000):
        for codec in ("lz4", "none"):
            obj = encode_chunk(raw, codec)
            assert obj[:8] == b"VHDCCHK1"
            assert decode_chunk(obj) == raw
    obj = bytearray(encode_chunk(b"hello" * 1000))
    for pos in (0, 9, 13, 20, 31, 40, len(obj) - 1):
        bad = bytearray(obj)
        bad[pos] ^= 0x40
        with pytest.raises(RepoFormatError):
            decode_chunk(bytes(bad))
    with pytest.raises(RepoFormatError, match="truncated"):
        decode_chunk(bytes(obj[:-3]))
    with pytest.raises(RepoFormatError):
        decode_chunk(b"short")


def test_init_config_and_zero_chunk_never_stored(tmp_path, repo):
    cfg = json.loads((Path(repo) / "config").read_text())
    assert cfg["hash"] == "blake3-keyed" and len(bytes.fromhex(cfg["key"])) == 32
    assert cfg["chunk_size"] == 2 * MiB
    with pytest.raises(VhdError, match="already exists"):
        R.init_repo(repo)
    with pytest.raises(VhdError, match="power of two"):
        R.init_repo(str(tmp_path / "r2"), chunk_size=3 * MiB)
    # keyed: two repositories give the same data different IDs
    other = R.init_repo(str(tmp_path / "r3"))
    with R.open_repo(repo) as a:
        assert a.chunk_id(b"x" * 100) != other.chunk_id(b"x" * 100)
    other.close()
    w = make_chain(tmp_path / "c", "sparse", size=64 * MiB, layers=1)
    img = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    assert str(img) == f"vm@{img.id}" and img.name == "vm"
    chunks = list((Path(repo) / "chunks").rglob("*"))
    files = [p for p in chunks if p.is_file()]
    assert ZERO_ID.hex() not in {p.name for p in files}
    with R.open_repo(repo) as r:
        ids = r.index(R.ImageRef("vm", img.id))
        zero_rows = int((ids == 0).all(axis=1).sum())
        assert zero_rows > 0 and zero_rows + len(files) == len(ids)
        assert img.counts["zero"] == zero_rows
        assert len(files) == img.counts["new"]
        # every stored chunk is named by the keyed hash of its bytes
        for f in files:
            raw = decode_chunk(f.read_bytes())
            assert r.chunk_id(raw).hex() == f.name
            assert f.parent.name == f.name[:4]


# ------------------------------------------------------------------ the series
def test_series_incremental_clone_coalesce_forget_gc(tmp_path, repo):
    """Byte-exact restores of every image through incrementals, a clone, a
    coalesce in between, forgets and gcs."""
    w = make_chain(tmp_path / "vm1", "realistic", size=96 * MiB, layers=2, seed=3)
    leaf = w.paths[-1]
    expect: dict[str, bytes] = {}
    rng = random.Random(5)

    img1 = R.create_image(leaf, repo, "vm1", fs_aware=False)
    expect[str(img1)] = disk_bytes(leaf)
    assert img1.parent is None and img1.counts["new"] > 0

    # a new child layer that changes ~5% of the blocks: incremental
    s2 = snapshot(leaf, tmp_path / "vm1" / "s2.vhd")
    nblocks = 48
    changed = rng.sample(range(nblocks), 3)
    for b in changed:
        write(s2, b * 2 * MiB + 4096, rng.randbytes(8192))
    img2 = R.create_image(s2, repo, "vm1", fs_aware=False)
    expect[str(img2)] = disk_bytes(s2)
    assert img2.parent == img1.id
    # only the blocks of the new layer were read
    assert img2.bytes["read"] == len(changed) * 2 * MiB
    assert img2.counts["new"] == len(changed)
    assert img2.counts["reused"] + img2.counts["zero"] == 48 - len(changed)

    # a second VM cloned from the same base: only its own chunks are new
    (tmp_path / "vm2").mkdir()
    for src in w.paths:
        shutil.copy(src, tmp_path / "vm2" / src.name)
    clone = snapshot(tmp_path / "vm2" / leaf.name, tmp_path / "vm2" / "clone.vhd")
    for b in rng.sample(range(nblocks), 2):
        write(clone, b * 2 * MiB, rng.randbytes(4096))
    img_c = R.create_image(clone, repo, "vm2", fs_aware=False)
    expect[str(img_c)] = disk_bytes(clone)
    assert img_c.parent is None
    assert img_c.counts["new"] <= 2

    # coalesce s2 into its parent: layer identity changes, everything is
    # re-read and hashed, but nothing already stored is stored again
    s3 = snapshot(s2, tmp_path / "vm1" / "s3.vhd")
    write(s3, 7 * 2 * MiB, rng.randbytes(2 * MiB))
    coalesce(s2, relink_children=[s3])
    img3 = R.create_image(s3, repo, "vm1", fs_aware=False)
    expect[str(img3)] = disk_bytes(s3)
    assert "unchanged" in json.loads((Path(repo) / "images" / "vm1" / f"{img3.id}.json")
                                     .read_text())["reuse"]
    assert img3.bytes["read"] > 20 * 2 * MiB  # re-read
    assert img3.counts["new"] <= 1

    # rehash: nothing reused from the chain, same content
    img4 = R.create_image(s3, repo, "vm1", fs_aware=False, rehash=True)
    expect[str(img4)] = expect[str(img3)]
    assert img4.counts["new"] == 0 and img4.bytes["read"] > 0

    for ref, data in expect.items():
        assert restored(repo, ref, tmp_path, "raw") == data, ref
        assert restored(repo, ref, tmp_path, "vhd") == data, ref

    # forget the first two, gc with no grace: the rest still restore
    R.forget(repo, str(img1))
    R.forget(repo, str(img2))
    # vm2 still references every chunk of img1: nothing to delete yet
    assert R.gc(repo, grace=0).deleted == 0
    assert restored(repo, str(img_c), tmp_path, "raw") == expect[str(img_c)]
    R.forget(repo, str(img_c))
    before = sum(1 for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    g = R.gc(repo, grace=0)
    # the old block 7 and the clone's own chunks go
    assert g.deleted >= 2 and g.images == 2
    after = sum(1 for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    assert after == before - g.deleted
    for ref in (str(img3), str(img4)):
        assert restored(repo, ref, tmp_path, "raw") == expect[ref], ref
    assert R.verify(repo, read_data=True).ok
    # policy forget keeps the newest
    gone = R.forget(repo, None, name="vm1", keep_last=1)
    assert gone == [str(img3)]
    R.gc(repo, grace=0)
    assert restored(repo, "vm1", tmp_path, "vhd") == expect[str(img4)]
    with pytest.raises(VhdError):
        R.restore(repo, "vm2", tmp_path / "gone.raw")


def test_fs_aware_mask_change_forces_read(tmp_path, repo):
    w = make_chain(tmp_path / "c", "realistic", size=32 * MiB, layers=1)
    leaf = w.paths[-1]
    a = R.create_image(leaf, repo, "vm", fs_aware=True)
    b = R.create_image(leaf, repo, "vm", fs_aware=True)
    assert b.bytes["read"] == 0 and b.parent == a.id
    # the fs mask file exists and a restore is exact (no filesystem: nothing dropped)
    assert restored(repo, str(b), tmp_path, "raw") == disk_bytes(leaf)


# ------------------------------------------------------------------ export
def test_export_is_the_image_to_stream(tmp_path, repo):
    from vhdcore.imaging import create_image as image_to
    from vhdcore.store import restore as stream_restore

    w = make_chain(tmp_path / "c", "realistic", size=64 * MiB, layers=3)
    leaf = w.paths[-1]
    img = R.create_image(leaf, repo, "vm", fs_aware=False)
    (tmp_path / "out").mkdir()
    image_to(leaf, f"file://{tmp_path}/out/direct", fs_aware=False)
    meta = R.export(repo, str(img), f"file://{tmp_path}/out/exported")
    direct = json.loads((tmp_path / "out" / "direct.manifest.json").read_text())["metadata"]
    assert meta["sha256"] == direct["sha256"]
    assert meta["stream-size"] == direct["stream-size"]
    stream_restore(f"file://{tmp_path}/out/exported", tmp_path / "x.vhd")
    assert disk_bytes(tmp_path / "x.vhd") == disk_bytes(leaf)
    if shutil.which("lz4"):
        segs = sorted((tmp_path / "out" / "exported.segments").glob("*.lz4"))
        cat = b"".join(s.read_bytes() for s in segs)
        p = subprocess.run(["lz4", "-d", "-c"], input=cat, capture_output=True, check=True)
        assert p.stdout == (tmp_path / "x.vhd").read_bytes()


# ------------------------------------------------------------------ corruption
def _one_chunk(repo: str) -> Path:
    return sorted(p for p in (Path(repo) / "chunks").rglob("*") if p.is_file())[0]


@pytest.mark.parametrize("damage", ["flip", "missing", "truncated-index"])
def test_corruption_found_by_verify_and_refused_by_restore(tmp_path, repo, damage):
    w = make_chain(tmp_path / "c", "realistic", size=32 * MiB, layers=2)
    img = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    assert R.verify(repo).ok
    ch = _one_chunk(repo)
    if damage == "flip":
        b = bytearray(ch.read_bytes())
        b[len(b) // 2] ^= 1
        ch.write_bytes(bytes(b))
    elif damage == "missing":
        ch.unlink()
    else:
        ix = Path(repo) / "images" / "vm" / f"{img.id}.index"
        ix.write_bytes(ix.read_bytes()[:-32])
    out = tmp_path / "out.raw"
    with pytest.raises(IntegrityError):
        R.restore(repo, str(img), out, format="raw")
    assert not out.exists() and not list(tmp_path.glob(".out.raw*"))
    res = R.verify(repo, read_data=True)
    assert not res.ok and res.images[str(img)] == "damaged"
    if damage == "flip":
        assert res.damaged == {ch.name: [str(img)]}
    elif damage == "missing":
        assert res.missing == {ch.name: [str(img)]}
    else:
        assert "truncated" in res.errors[str(img)]
    # CLI: verify exits 1 (a damaged chunk was moved aside: now missing)
    p = run_cli("verify", "--repo", repo, check=False)
    assert p.returncode == 1 and "damaged" in p.stdout
    # a damaged image is marked, and never the base of the next image
    if damage != "truncated-index":
        man = json.loads((Path(repo) / "images" / "vm" / f"{img.id}.json").read_text())
        assert man["verify"]["state"] == "damaged"
        nxt = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
        assert nxt.parent is None and nxt.bytes["read"] > 0
        assert nxt.counts["new"] >= 1  # the damaged chunk is stored again
        assert restored(repo, str(nxt), tmp_path, "raw") == disk_bytes(w.paths[-1])
        # the good copy stored again makes the old image whole
        assert R.verify(repo, read_data=True).ok


def test_verify_subset(tmp_path, repo):
    w = make_chain(tmp_path / "c", "full", size=64 * MiB, layers=1)
    R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    counts = [R.verify(repo, read_data=True, subset=f"{i}/3").chunks_checked for i in (1, 2, 3)]
    assert sum(counts) == R.verify(repo, read_data=True).chunks_checked
    assert all(c < sum(counts) for c in counts)
    with pytest.raises(VhdError):
        R.verify(repo, read_data=True, subset="4/3")


# ------------------------------------------------------------------ hostile content
def test_fuzzed_index_manifest_chunk_give_clear_errors(tmp_path, repo):
    w = make_chain(tmp_path / "c", "realistic", size=16 * MiB, layers=1)
    img = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    d = Path(repo) / "images" / "vm"
    ix, mf = d / f"{img.id}.index", d / f"{img.id}.json"
    good_ix, good_mf = ix.read_bytes(), mf.read_bytes()
    key = bytes.fromhex(json.loads((Path(repo) / "config").read_text())["key"])
    rnd = random.Random(7)
    ch = _one_chunk(repo)
    good_ch = ch.read_bytes()
    for _ in range(150):
        b = bytearray(good_ix)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(min(len(b), 200))] = rnd.randrange(256)
        if bytes(b) != good_ix:
            with pytest.raises(RepoFormatError):
                decode_index(bytes(b), key)
        m = bytearray(good_mf)
        m[rnd.randrange(len(m))] = rnd.randrange(32, 127)
        try:
            parse_manifest(bytes(m), "m")
        except RepoFormatError:
            pass
        c = bytearray(good_ch)
        c[rnd.randrange(min(len(c), 64))] ^= 1 << rnd.randrange(8)
        with pytest.raises(RepoFormatError):
            decode_chunk(bytes(c))
    for bad in (b"", b"{", b"[]", b'{"format": "vhdcore-repo-image"}', b"\xff" * 40,
                json.dumps({**json.loads(good_mf), "nchunks": 10**12}).encode(),
                json.dumps({**json.loads(good_mf), "virtual_size": "x"}).encode()):
        with pytest.raises(RepoFormatError):
            parse_manifest(bad, "m")
        mf.write_bytes(bad)
        with pytest.raises(VhdError):
            R.restore(repo, str(img), tmp_path / "o.raw")
        assert not (tmp_path / "o.raw").exists()
        assert run_cli("restore", "--repo", repo, str(img), str(tmp_path / "o"),
                       check=False).returncode == 1
    # hostile values the manifest's shape check lets through
    doc = json.loads(good_mf)
    for stream in ({"uuid": "zz", "timestamp": -1}, {"uuid": "00", "timestamp": 1 << 40}, [],
                   {"uuid": None}):
        mf.write_text(json.dumps({**doc, "stream": stream, "bytes": {"new": "x"},
                                  "verify": {"state": 5}, "parent": 7}))
        assert restored(repo, str(img), tmp_path, "vhd") == disk_bytes(w.paths[-1])
        assert R.list_images(repo)[0]["new_bytes"] == 0
        assert run_cli("ls", "--repo", repo).returncode == 0
    mf.write_bytes(good_mf)
    # hostile leases are skipped
    (Path(repo) / "leases").mkdir(exist_ok=True)
    for i, bad in enumerate((b"[]", b"{", b'{"expires": "x"}', b'{"expires": 1e20, "start": "y"}')):
        (Path(repo) / "leases" / f"bad{i}.json").write_bytes(bad)
    assert R.gc(repo, grace=0).deleted == 0
    (Path(repo) / "config").write_text("{}")
    with pytest.raises(RepoFormatError):
        R.open_repo(repo)


# ------------------------------------------------------------------ resume
def test_interrupted_image_resumes_without_reuploading(tmp_path, repo, monkeypatch):
    import vhdcore.repo.writer as W

    w = make_chain(tmp_path / "c", "full", size=64 * MiB, layers=1)
    leaf = w.paths[-1]
    calls = {"n": 0}
    real = W.iter_image_blocks

    def slow(*a, **k):
        for blk in real(*a, **k):
            calls["n"] += 1
            if calls["n"] == 10:
                time.sleep(0.6)
            yield blk

    monkeypatch.setattr(W, "iter_image_blocks", slow)
    with pytest.raises(VhdTimeoutError):
        R.create_image(leaf, repo, "vm", fs_aware=False, timeout=0.5)
    stored = [p for p in (Path(repo) / "chunks").rglob("*") if p.is_file()]
    assert stored and not list((Path(repo) / "images").rglob("*.json"))
    assert [p for p in (Path(repo) / "checkpoints").rglob("*") if p.is_file()]
    # a checkpoint is no proof: a chunk it names that is gone is stored again
    stored.pop().unlink()
    monkeypatch.setattr(W, "iter_image_blocks", real)
    img = R.create_image(leaf, repo, "vm", fs_aware=False)
    assert img.resumed
    # nothing stored by the interrupted run was written again
    assert img.counts["existing"] == 0
    assert img.counts["new"] == sum(1 for p in (Path(repo) / "chunks").rglob("*")
                                    if p.is_file()) - len(stored)
    assert img.counts["reused"] >= len(stored)
    assert not [p for p in (Path(repo) / "checkpoints").rglob("*") if p.is_file()]
    assert restored(repo, str(img), tmp_path, "raw") == disk_bytes(leaf)


# ------------------------------------------------------------------ concurrency
_IMAGE_SCRIPT = """
import sys, time
sys.path.insert(0, {src!r})
from vhdcore import repo as R
r = R.create_image(sys.argv[1], sys.argv[2], sys.argv[3], fs_aware=False)
print(r)
"""


def test_concurrent_writers_as_processes(tmp_path, repo):
    ws = [make_chain(tmp_path / f"vm{i}", "realistic", size=48 * MiB, layers=2, seed=i % 2)
          for i in range(3)]
    script = tmp_path / "img.py"
    script.write_text(_IMAGE_SCRIPT.format(src=SRC))
    procs = [subprocess.Popen([sys.executable, str(script), str(w.paths[-1]), repo,
                               f"vm{i % 2}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i, w in enumerate(ws)]
    refs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        refs.append(out.strip())
    for ref, w in zip(refs, ws):
        assert restored(repo, ref, tmp_path, "raw") == disk_bytes(w.paths[-1])
    assert R.verify(repo, read_data=True).ok


_SLOW_IMAGE = """
import sys, time
sys.path.insert(0, {src!r})
import vhdcore.repo.writer as W
real = W.iter_image_blocks
def slow(*a, **k):
    for b in real(*a, **k):
        time.sleep(0.03)
        yield b
W.iter_image_blocks = slow
from vhdcore import repo as R
print(R.create_image(sys.argv[1], sys.argv[2], sys.argv[3], fs_aware=False))
"""


def test_gc_during_image_and_forget_gc_during_restore(tmp_path, repo, monkeypatch):
    monkeypatch.setenv("VHDCORE_REPO_LEASE_TTL", "5")
    w = make_chain(tmp_path / "c", "full", size=64 * MiB, layers=2)
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_IMAGE.format(src=SRC))
    env = {**os.environ, "VHDCORE_REPO_LEASE_TTL": "5"}
    p = subprocess.Popen([sys.executable, str(script), str(w.paths[-1]), repo, "vm"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # gc with no grace while the writer is storing chunks nobody references yet
    deadline = time.time() + 60
    while not list((Path(repo) / "chunks").rglob("*")) and time.time() < deadline:
        time.sleep(0.05)
    runs = 0
    while p.poll() is None:
        g = R.gc(repo, grace=0)
        assert g.deleted == 0
        runs += 1
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert runs >= 1
    ref = out.strip()
    data = disk_bytes(w.paths[-1])
    assert restored(repo, ref, tmp_path, "raw") == data

    # forget + gc while a (slowed) restore of that image runs in another process
    slow_restore = tmp_path / "slow_restore.py"
    slow_restore.write_text(f"""
import sys, time
sys.path.insert(0, {SRC!r})
import vhdcore.repo.reader as RD
real = RD.fetch_chunk
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
RD.fetch_chunk = slow
RD.restore(sys.argv[1], sys.argv[2], sys.argv[3], format="raw")
print("ok")
""")
    out_path = tmp_path / "slow.raw"
    q = subprocess.Popen([sys.executable, str(slow_restore), repo, ref, str(out_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not list((Path(repo) / "leases").glob("*.json")) and time.time() < deadline:
        time.sleep(0.02)
    R.forget(repo, ref)
    g = R.gc(repo, grace=0)
    assert g.deleted == 0
    o, e = q.communicate(timeout=300)
    assert q.returncode == 0, e
    assert out_path.read_bytes() == data
    # once no lease is live, gc removes the forgotten image and its chunks
    g = R.gc(repo, grace=0)
    assert g.forgotten_purged == 1 and g.deleted > 0
    assert not [x for x in (Path(repo) / "chunks").rglob("*") if x.is_file()]


def test_expired_lease_counts_as_dead(tmp_path, repo):
    with R.open_repo(repo) as r:
        (Path(repo) / "leases").mkdir(exist_ok=True)
        (Path(repo) / "leases" / "old.json").write_text(json.dumps(
            {"kind": "image", "start": time.time() - 1000, "expires": time.time() - 1}))
        (Path(repo) / "leases" / "live.json").write_text(json.dumps(
            {"kind": "image", "start": time.time() - 10, "expires": time.time() + 100}))
        assert [x["key"] for x in r.leases()] == ["leases/live.json"]
        cut = R.gc(repo, grace=0).cutoff
        assert time.time() - 12 < cut < time.time() - 9


# ------------------------------------------------------------------ CLI
def test_cli_contract(tmp_path):
    w = make_chain(tmp_path / "c", "realistic", size=32 * MiB, layers=2)
    url = f"file://{tmp_path}/repo"
    run_cli("repo", "init", url, "--chunk-size", "1M")
    assert json.loads((tmp_path / "repo" / "config").read_text())["chunk_size"] == MiB
    assert run_cli("repo", "init", url, check=False).returncode == 1
    p = run_cli("image", str(w.paths[-1]), "--repo", url, "--name", "web", "--no-fs-aware")
    ref = p.stdout.strip()
    assert ref.startswith("web@")
    p = run_cli("image", str(w.paths[-1]), "--name", "web", "--json",
                env={"VHDCORE_REPO": url})
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines[-1]["event"] == "result" and lines[-1]["ref"].startswith("web@")
    assert any(x.get("event") == "progress" for x in lines)
    # timeout: exit 4, and the same command again resumes
    big = make_chain(tmp_path / "big", "full", size=64 * MiB, layers=1)
    p = run_cli("image", str(big.paths[-1]), "--repo", url, "--name", "big", "--timeout", "0",
                "--no-fs-aware", check=False)
    assert p.returncode == 4 and "resume" in p.stderr
    p = run_cli("image", str(big.paths[-1]), "--repo", url, "--name", "big", "--no-fs-aware",
                "--json")
    assert json.loads(p.stdout.splitlines()[-1])["resumed"] is True
    ls = run_cli("ls", "--repo", url)
    assert ref in ls.stdout and "unverified" in ls.stdout
    assert "big@" in ls.stdout
    js = json.loads(run_cli("ls", "web", "--json", env={"VHDCORE_REPO": url}).stdout)
    assert len(js) == 2
    run_cli("restore", "--repo", url, "web", str(tmp_path / "o.vhd"))
    assert disk_bytes(tmp_path / "o.vhd") == disk_bytes(w.paths[-1])
    run_cli("restore", "--repo", url, ref, str(tmp_path / "o.raw"), "--format", "raw")
    assert (tmp_path / "o.raw").read_bytes() == disk_bytes(w.paths[-1])
    run_cli("verify", "--repo", url, "--read-data", "--subset", "1/2")
    run_cli("export", "--repo", url, ref, "--to", f"file://{tmp_path}/exp")
    assert (tmp_path / "exp.manifest.json").exists()
    p = run_cli("forget", "--repo", url, "--keep-last", "1")
    assert ref in p.stdout
    run_cli("gc", "--repo", url, "--grace", "0")
    assert run_cli("restore", "--repo", url, ref, str(tmp_path / "x"), check=False
                   ).returncode == 1
    assert run_cli("image", str(w.paths[-1]), "--repo", url, check=False).returncode == 2
    assert run_cli("image", str(w.paths[-1]), check=False,
                   env={"VHDCORE_REPO": ""}).returncode == 2
    assert run_cli("forget", "--repo", url, check=False).returncode == 2


def test_chunk_sizes_other_than_the_block(tmp_path):
    w = make_chain(tmp_path / "c", "realistic", size=40 * MiB + 512 * 3, layers=2)
    for cs in (256 << 10, 8 * MiB):
        url = str(tmp_path / f"r{cs}")
        R.init_repo(url, chunk_size=cs).close()
        img = R.create_image(w.paths[-1], url, "vm", fs_aware=False)
        data = disk_bytes(w.paths[-1])
        assert restored(url, str(img), tmp_path, "raw") == data
        assert restored(url, str(img), tmp_path, "vhd") == data
        s = snapshot(w.paths[-1], tmp_path / "c" / f"s{cs}.vhd")
        write(s, 3 * MiB, b"\x01" * 4096)
        img2 = R.create_image(s, url, "vm", fs_aware=False)
        # the block written (2 MiB), or the allocated blocks of its 8 MiB chunk
        assert 2 * MiB <= img2.bytes["read"] <= max(cs, 2 * MiB)
        assert img2.bytes["read"] < 40 * MiB
        assert restored(url, str(img2), tmp_path, "raw") == disk_bytes(s)
        s.unlink()


def test_cancel_event_stops_like_a_timeout(tmp_path, repo):
    import threading

    w = make_chain(tmp_path / "c", "full", size=32 * MiB, layers=1)
    ev = threading.Event()
    ev.set()
    with pytest.raises(VhdTimeoutError, match="cancelled"):
        R.create_image(w.paths[-1], repo, "vm", fs_aware=False, cancel=ev)
    img = R.create_image(w.paths[-1], repo, "vm", fs_aware=False, resume=True)
    assert img.resumed and restored(repo, str(img), tmp_path, "raw") == disk_bytes(w.paths[-1])
    with pytest.raises(TypeError):
        R.create_image(w.paths[-1], repo, "vm", bogus=1)


def test_api_names():
    assert callable(R.create_image) and callable(R.restore) and callable(R.gc)
    sig = R.create_image.__code__.co_varnames[:3]
    assert sig == ("leaf", "repo_url", "name")
    _ = np


# ------------------------------------------------------------------ other stores and codecs
def _series_on(url: str, tmp_path: Path) -> None:
    w = make_chain(tmp_path / "c", "realistic", size=32 * MiB, layers=2, seed=11)
    leaf = w.paths[-1]
    R.init_repo(url).close()
    a = R.create_image(leaf, url, "vm", fs_aware=False)
    with R.open_repo(url) as r:
        ids = r.index(R.ImageRef("vm", a.id))
    c = int(np.nonzero(ids.any(axis=1))[0][0])  # a stored chunk of a
    s = snapshot(leaf, tmp_path / "c" / "s.vhd")
    write(s, c * 2 * MiB + 4096, b"\x07" * 65536)
    b = R.create_image(s, url, "vm", fs_aware=False)
    assert b.parent == a.id and b.counts["new"] == 1 and b.bytes["read"] == 2 * MiB
    assert restored(url, str(a), tmp_path, "raw") == disk_bytes(leaf)
    assert restored(url, str(b), tmp_path, "vhd") == disk_bytes(s)
    assert [x["ref"] for x in R.list_images(url)] == [str(a), str(b)]
    assert R.verify(url, read_data=True).ok
    R.forget(url, str(a))
    g = R.gc(url, grace=0)
    assert g.deleted == 1 and g.images == 1
    assert restored(url, "vm", tmp_path, "raw") == disk_bytes(s)
    with pytest.raises(VhdError, match="already exists"):
        R.init_repo(url)


def test_swift_repository(tmp_path):
    from _swift import require_swift, swift_connection, unique

    require_swift()
    container = unique("repo")
    _series_on(f"swift://{container}/pre", tmp_path)
    conn = swift_connection()
    # chunks are spread over containers by their first hex digit
    names = [c["name"] for c in conn.get_account()[1] if c["name"].startswith(container)]
    assert f"{container}_chunks_0" in names and len(names) == 17
    stored = sum(int(c["count"]) for c in conn.get_account()[1]
                 if c["name"].startswith(container + "_chunks_"))
    assert stored > 0
    # write-once: If-None-Match: * is honoured (412 on an existing chunk)
    from vhdcore.repo.backend import open_backend

    be = open_backend(f"swift://{container}/pre")
    key = next(k for k, _ in be.list("chunks/"))
    before = be.get(key)
    assert be.put_once(key, b"other bytes") is False
    assert be.get(key) == before
    be.close()
    # export to a Swift stream image, read back by the stream restore
    from vhdcore.store import restore as stream_restore

    conn.put_container(container + "-exp")
    meta = R.export(f"swift://{container}/pre", "vm", f"swift://{container}-exp/img")
    stream_restore(f"swift://{container}-exp/img", tmp_path / "exp.vhd")
    assert disk_bytes(tmp_path / "exp.vhd") == disk_bytes(tmp_path / "c" / "s.vhd")
    assert meta["repo-image"].startswith("vm@")


def test_s3_repository(tmp_path):
    from _swift import require_s3, unique

    require_s3()
    bucket = unique("repo")
    _series_on(f"s3://{bucket}/some/prefix", tmp_path)
    from vhdcore.repo.backend import open_backend

    be = open_backend(f"s3://{bucket}/some/prefix")
    key = next(k for k, _ in be.list("chunks/"))
    before = be.get(key)
    assert be.put_once(key, b"other bytes") is False
    assert be.get(key) == before
    be.close()


def test_zstd_codec(tmp_path):
    pytest.importorskip("zstandard")
    url = str(tmp_path / "z")
    R.init_repo(url, codec="zstd").close()
    w = make_chain(tmp_path / "c", "realistic", size=16 * MiB, layers=1)
    img = R.create_image(w.paths[-1], url, "vm", fs_aware=False)
    f = next(p for p in (Path(url) / "chunks").rglob("*") if p.is_file())
    assert f.read_bytes()[8] == 2  # codec byte: zstd
    assert restored(url, str(img), tmp_path, "raw") == disk_bytes(w.paths[-1])


def test_directory_write_once_never_rewrites(tmp_path):
    from vhdcore.repo.backend import DirectoryBackend

    be = DirectoryBackend(str(tmp_path / "d"))
    assert be.put_once("chunks/abcd/x", b"one") is True
    assert be.put_once("chunks/abcd/x", b"two") is False
    assert be.get("chunks/abcd/x") == b"one"
    assert not [p for p in (tmp_path / "d").rglob(".*")]
    with pytest.raises(VhdError):
        be.get("../etc/passwd")


def test_fs_aware_incremental_rereads_blocks_freed_by_the_filesystem(tmp_path):
    """Deleting files frees data in VHD blocks no new layer touches: their free
    mask changed, so they are read again (and their stale data dropped)."""
    from _fsimages import ext_rm, make_ext, need, random_files

    from test_fsaware_image import lay_down
    from vhdcore.imaging import create_image as image_to
    from vhdcore.store import restore as stream_restore

    need("mke2fs", "debugfs", "e2fsck")
    src = tmp_path / "src"
    shas = random_files(src, 12, 900 * 1024, 1100 * 1024, seed=4)
    full = tmp_path / "full.img"
    make_ext(full, 48 * MiB, ["-t", "ext4", "-b", "4096"], src)
    now = tmp_path / "now.img"
    shutil.copyfile(full, now)
    ext_rm(now, sorted(shas)[3:])
    chain_dir = tmp_path / "chain"
    leaf = lay_down([full, now], chain_dir)
    base = chain_dir / "layer0.vhd"
    url = str(tmp_path / "repo")
    R.init_repo(url).close()
    a = R.create_image(base, url, "vm", fs_aware=True)
    b = R.create_image(leaf, url, "vm", fs_aware=True)
    assert b.parent == a.id
    with VhdFileOpen(leaf) as child:
        owned = set(int(x) for x in child.allocated_blocks())
    # more blocks were read than the new layer owns: the freed ones
    assert b.bytes["read"] > len(owned) * 2 * MiB
    (tmp_path / "s").mkdir()
    image_to(leaf, f"file://{tmp_path}/s/img", fs_aware=True)
    stream_restore(f"file://{tmp_path}/s/img", tmp_path / "want.raw", format="raw")
    assert restored(url, str(b), tmp_path, "raw") == (tmp_path / "want.raw").read_bytes()
    # the same chain again: nothing changed, nothing read
    c = R.create_image(leaf, url, "vm", fs_aware=True)
    assert c.bytes["read"] == 0
    assert restored(url, str(c), tmp_path, "raw") == (tmp_path / "want.raw").read_bytes()


def VhdFileOpen(path):
    from vhdcore.disk import VhdFile

    return VhdFile.open(path)


def test_a_touched_parent_layer_is_not_trusted(tmp_path, repo):
    """Condition 1: every layer owning a sector must be provably unchanged
    (mtime, ctime, inode, size, UUID, header/BAT digest)."""
    w = make_chain(tmp_path / "c", "realistic", size=32 * MiB, layers=2)
    a = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    assert R.create_image(w.paths[-1], repo, "vm", fs_aware=False).bytes["read"] == 0
    st = w.paths[0].stat()
    os.utime(w.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    c = R.create_image(w.paths[-1], repo, "vm", fs_aware=False)
    with Chain.open(w.paths[-1]) as ch:
        allocated = len(ch.allocated_blocks())
    assert c.bytes["read"] == allocated * 2 * MiB
    assert c.counts["new"] == 0  # same content: every chunk already known
    man = json.loads((Path(repo) / "images" / "vm" / f"{c.id}.json").read_text())
    assert "not all unchanged" in man["reuse"]
    assert restored(repo, str(c), tmp_path, "raw") == disk_bytes(w.paths[-1])
    _ = a
