"""The imaging pipeline and its stages: lz4, the segmented upload, the
merge/scan stage, SHA-256 of the stream, each alone; the pipeline against
its slowest stage and against its CPU ceiling; ``image --to swift://``
against ``swift upload --use-slo`` of the same lz4 bytes."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import xxhash

from .._workloads import Workload, make_chain
from ..chain import Chain
from ..ops.stream import iter_image_blocks
from ..compress import FrameCompressor, compress_frame
from ..vhd.layout import DynamicLayout
from .context import DEFAULT_SIZE, SEGMENT, THREADS, BenchRun
from .machine import usable_cpus
from .report import GB, MiB
from .timing import alternate, median_op

__all__ = ["measure_imaging", "measure_vs_swift_upload"]

#: the stages measured alone, in CPU-seconds per GB of stream
_STAGES = ("scan", "lz4", "upload", "sha256")


class _Stages:
    """The stages measured alone: their seconds and CPU-seconds."""

    def __init__(self, b: BenchRun) -> None:
        self.b = b
        self.cpu: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.stream = 0

    def timed(self, key: str, fn: Callable[..., object], **kw: Any) -> float:
        got: list[float] = []
        t = median_op(fn, self.b.reps, cpu=got, **kw)
        self.cpu[key] = got[0]
        self.seconds[key] = t
        return t


def _scan(b: BenchRun, w: Workload, st: _Stages) -> list[bytes]:
    """The merge/scan stage alone; returns the stream's blocks (bitmap + data)."""
    with Chain.open(w.leaf) as chain:
        layout = DynamicLayout(chain.virtual_size, chain.block_size)

        def scan() -> int:
            n = 0
            for blk in iter_image_blocks(chain, threads=THREADS):
                fp = xxhash.xxh3_64(blk.bitmap)
                fp.update(blk.data)
                n += 1
            return n

        nstored = scan()
        t_scan = st.timed("scan", scan)
        raws = [b"".join((blk.bitmap[: layout.bitmap_size], blk.data))
                for blk in iter_image_blocks(chain, threads=THREADS)]
    stream = st.stream = sum(map(len, raws))
    assert len(raws) == nstored
    b.add("imaging.stage_scan", "stage alone: merge + zero scan + xxh3", "imaging",
          stream, t_scan, ratio=stream / t_scan / GB / b.memcpy, ratio_to="memcpy",
          note=f"iter_image_blocks, {THREADS} threads; bytes = image stream "
               f"({nstored} stored blocks)")
    return raws


def _lz4(b: BenchRun, raws: list[bytes], st: _Stages) -> list[bytes]:
    stream = st.stream
    t1 = st.timed("lz4-1", lambda: [compress_frame(r) for r in raws])
    b.add("lz4.1thread", "lz4 compress_frame, 1 thread", "lz4", stream, t1,
          ratio=stream / t1 / GB / b.memcpy, ratio_to="memcpy",
          note="realistic merged blocks (OS-disk-like pages)")
    fc = FrameCompressor(threads=THREADS)
    try:
        t2 = st.timed("lz4", lambda: sum(len(f) for f in fc.compress(raws)))
        frames = list(fc.compress(raws))
    finally:
        fc.close()
    compressed = sum(map(len, frames))
    b.add("lz4.2threads", f"lz4 compress_frame, {THREADS} threads (stage alone)", "lz4",
          stream, t2, ratio=t1 / t2, ratio_to="1 thread",
          note=f"compression ratio {stream / compressed:.2f}")
    return frames


def _upload(b: BenchRun, w: Workload, frames: list[bytes], st: _Stages) -> None:
    """The segmented upload of the compressed stream to a directory (no fsync)."""
    from ..store import DirectoryStore, image_metadata, upload_frames

    stream, compressed = st.stream, sum(map(len, frames))
    up_dir = b.work / "upload"
    up_dir.mkdir(exist_ok=True)
    meta = image_metadata(sha256="0" * 64, stream_size=stream, virtual_size=w.virtual_size)
    store = DirectoryStore(up_dir, "image", durable=False)

    def upload() -> None:
        upload_frames(store, frames, segment_size=SEGMENT, metadata=meta, concurrency=4)

    def fresh() -> tuple[Any, ...]:
        store.delete()  # or every segment would be skipped as already stored
        return ()

    t_up = st.timed("upload", upload, setup=fresh, cleanup=store.delete)
    b.add("upload.directory", "segmented upload to a directory", "upload", compressed,
          t_up, ratio=compressed / t_up / GB / b.memcpy, ratio_to="memcpy",
          note=f"bytes = compressed; {SEGMENT // MiB} MiB segments, 4 uploads at once, "
               "MD5 per segment, no fsync")
    b.add("imaging.stage_upload", "stage alone: directory upload", "imaging", stream,
          t_up, ratio=stream / t_up / GB / b.memcpy, ratio_to="memcpy",
          note="the upload above counted in image-stream bytes")


def _sha256(b: BenchRun, raws: list[bytes], st: _Stages) -> None:
    stream = st.stream
    t_sha = st.timed("sha256", lambda: [hashlib.sha256(r) for r in raws])
    b.add("imaging.sha256", "stage alone: SHA-256 of the stream (1 thread)", "imaging",
          stream, t_sha, ratio=stream / t_sha / GB / b.memcpy, ratio_to="memcpy",
          note="a stage of its own: the pipeline's hasher thread digests the "
               "uncompressed stream beside the compressor")


def _pipeline(b: BenchRun, w: Workload, st: _Stages) -> None:
    """The pipeline: its stages side by side, each on its own threads
    (merge, lz4, SHA-256 + xxh3 of the stream, upload + MD5)."""
    from ..imaging import create_image

    stream = st.stream
    rates = {k: stream / st.seconds[k] for k in _STAGES}
    slowest = min(rates, key=lambda k: rates[k])
    counter = {"i": 0}
    res_holder: list[Any] = []

    def setup() -> tuple[Any, ...]:
        counter["i"] += 1
        d = b.work / f"image-{counter['i']}"
        d.mkdir()
        return (f"file://{d}/image",)

    def run(url: str) -> None:
        res_holder.append(create_image(w.leaf, url, threads=THREADS, segment_size=SEGMENT,
                                       store_options={"durable": False}, fs_aware=False))

    def cleanup() -> None:
        shutil.rmtree(b.work / f"image-{counter['i']}", ignore_errors=True)

    t_img = st.timed("pipeline", run, setup=setup, cleanup=cleanup)
    res = res_holder[-1]
    ncpu = usable_cpus()
    # CPU seconds per GB of stream: what the pipeline spent and what its
    # parts cost alone (it merges once; the plan's probe reads a little)
    per_gb = {k: st.cpu[k] / (stream / GB) for k in _STAGES}
    parts = sum(per_gb.values())
    used = st.cpu["pipeline"] / (res.stream_size / GB)
    b.add("imaging.pipeline", "imaging to a directory, stored data", "imaging",
          res.stream_size, t_img, ratio=res.stream_size / t_img / rates[slowest],
          ratio_to=f"slowest ({slowest})",
          note=f"create_image to file://, {THREADS} merge + {THREADS} lz4 threads, "
               f"{SEGMENT // MiB} MiB segments, no fsync; bytes = image stream. It used "
               f"{used:.2f} CPU-s per GB ({st.cpu['pipeline'] / t_img / ncpu:.0%} of "
               f"{ncpu} CPUs); its parts alone cost {parts:.2f} CPU-s per GB (merge "
               f"{per_gb['scan']:.2f}, lz4 {per_gb['lz4']:.2f}, upload+MD5 "
               f"{per_gb['upload']:.2f}, SHA-256 {per_gb['sha256']:.2f}), so "
               f"{ncpu} CPUs cap it at {ncpu / parts:.2f} GB/s")
    b.add("imaging.cpu_bound", "imaging vs what its CPU work allows", "imaging",
          res.stream_size, t_img, ratio=res.stream_size / t_img / GB / (ncpu / parts),
          ratio_to=f"{ncpu} CPUs' ceiling",
          note="ceiling = CPUs / (CPU-seconds per GB of the pipeline's parts measured "
               "alone)")
    b.add("imaging.virtual", "imaging to a directory, virtual disk", "imaging",
          res.virtual_size, t_img, ratio=None, ratio_to="",
          note=f"compressed to {res.compressed_size / MiB:.1f} MiB in {res.segments} "
               "segments")


def measure_imaging(b: BenchRun, wl: dict[str, Workload]) -> None:
    b.say("measuring lz4, directory upload, the stages and the imaging pipeline ...")
    w = wl["realistic"]
    st = _Stages(b)
    raws = _scan(b, w, st)
    frames = _lz4(b, raws, st)
    _upload(b, w, frames, st)
    _sha256(b, raws, st)
    raws.clear()  # free the copies before the pipeline runs
    frames.clear()
    _pipeline(b, w, st)
    measure_vs_swift_upload(b, w)


#: the smallest image stream of the Swift comparison on a full run: process
#: start-up (about 0.3-0.8 s on both sides) must not dominate
SWIFT_MIN_VIRTUAL = 384 * MiB


def _swift_workload(b: BenchRun, w: Workload) -> Workload:
    """The chain of the Swift comparison: the realistic workload, or on a
    full run (``--size`` at least the default) one of at least 384 MiB
    (an image stream of about 280 MiB), so that start-up does not dominate."""
    if b.size < DEFAULT_SIZE or b.size >= SWIFT_MIN_VIRTUAL:
        return w
    big = make_chain(b.work / "chains" / "swift", "realistic", size=SWIFT_MIN_VIRTUAL,
                     layers=3, seed=1, fill=0.6)
    b.settle(big.paths)
    return big


def measure_vs_swift_upload(b: BenchRun, w: Workload) -> None:
    """``image`` to Swift against ``swift upload --use-slo`` (the peer a
    user would pick) of the same lz4 bytes with the same segment size, in
    the same run; only where a Swift is configured (``ST_AUTH``,
    ``ST_USER``, ``ST_KEY``) and the ``swift`` command is installed.  Both
    are commands started afresh (interpreter start-up counted on both
    sides), interleaved so that they share the machine's moods."""
    from ..imaging import create_image

    swift = shutil.which("swift")
    if swift is None or not all(os.environ.get(k) for k in ("ST_AUTH", "ST_USER", "ST_KEY")):
        b.say("no Swift configured (ST_AUTH/ST_USER/ST_KEY) or no swift command: "
              "imaging vs swift upload skipped")
        return
    b.say("measuring image to Swift vs swift upload --use-slo ...")
    w = _swift_workload(b, w)
    container = f"vhdcore-bench-{os.getpid()}-{int(time.time())}"
    d = b.work / "swift-stream"
    d.mkdir(exist_ok=True)
    # the same lz4 bytes: the compressed stream of this chain's image
    res = create_image(w.leaf, f"file://{d}/image", threads=THREADS, segment_size=SEGMENT,
                       store_options={"durable": False}, fs_aware=False)
    stream_file = d / "stream.lz4"
    with open(stream_file, "wb") as out:
        for seg in sorted(d.glob("image.segments/**/*.lz4")):
            out.write(seg.read_bytes())
    nbytes = stream_file.stat().st_size
    counter = {"i": 0}

    def peer() -> None:
        counter["i"] += 1
        subprocess.run([swift, "upload", "--use-slo", "-S", str(SEGMENT), "--object-name",
                        f"obj-{counter['i']}", container, str(stream_file)], check=True,
                       capture_output=True)

    def ours() -> None:
        counter["i"] += 1
        subprocess.run([sys.executable, "-m", "vhdcore", "image", str(w.leaf), "--to",
                        f"swift://{container}/obj-{counter['i']}", "--segment-size",
                        str(SEGMENT), "--threads", str(THREADS), "--no-fs-aware",
                        "--state-dir", str(d), "-q"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    try:
        med = alternate({"peer": peer, "ours": ours}, b.reps, warmup=True)
    finally:
        subprocess.run([swift, "delete", container], capture_output=True, check=False)
        subprocess.run([swift, "delete", f"{container}_segments"], capture_output=True,
                       check=False)
    t_peer, t_ours = med["peer"], med["ours"]
    ratio = t_peer / t_ours
    r = b.add("imaging.vs_swift_upload", "image to Swift vs swift upload --use-slo",
              "imaging", res.stream_size, t_ours, ratio=ratio, ratio_to="swift upload",
              note=f"create_image (merge + lz4 + upload) vs `swift upload --use-slo -S "
                   f"{SEGMENT // MiB}M` of the same {nbytes / MiB:.1f} MiB of lz4 bytes "
                   f"({t_peer:.2f} s vs {t_ours:.2f} s, both as commands, page cache "
                   f"warm; image stream {res.stream_size / MiB:.0f} MiB); bytes = image "
                   "stream")
    r.target, r.passed = ">= 0.85x swift upload", ratio >= 0.85
