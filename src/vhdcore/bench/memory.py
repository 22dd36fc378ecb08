"""Peak memory: flatten and imaging (to a directory, and to Swift where one
is configured) of a large sparse chain, each in a child process that
reports its peak resident set and samples its own and file-backed memory.
The child's sampler and launcher here are also those of the repository's
memory check (``bench/repo.py``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .._workloads import Workload, make_chain
from .context import BenchRun
from .report import GiB, MiB

__all__ = ["SAMPLER", "measure_memory", "measure_peak_memory", "run_child"]

#: the start of every memory child: ``status()`` (VmHWM, VmRSS, RssAnon,
#: RssFile of /proc/self/status, in bytes), ``start_sampling()`` (a thread
#: keeping the peaks of RssAnon and RssFile, every 5 ms, in ``peak``),
#: ``stop_sampling()`` and ``hwm()`` (the peak resident set)
SAMPLER = r"""
import json, os, resource, sys, threading, time

def status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out

peak = {"anon": 0, "file": 0}
_stop = threading.Event()

def _sample():
    while not _stop.is_set():
        s = status()
        peak["anon"] = max(peak["anon"], s.get("RssAnon", 0))
        peak["file"] = max(peak["file"], s.get("RssFile", 0))
        _stop.wait(0.005)

_th = threading.Thread(target=_sample, daemon=True)

def start_sampling():
    _th.start()

def stop_sampling():
    _stop.set()
    _th.join()

def hwm():
    h = status().get("VmHWM")
    if h is None:
        h = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        h *= 1 if sys.platform == "darwin" else 1024
    return h
"""

_CHILD = SAMPLER + r"""
from vhdcore.ops.flatten import flatten
from vhdcore.imaging import create_image
base = status().get("VmRSS", 0)
start_sampling()
what, leaf, dest = sys.argv[1:4]
seg = int(sys.argv[4]) if len(sys.argv) > 4 else None
t = time.perf_counter()
if what == "flatten":
    flatten(leaf, dest, "vhd", durable=False, fs_aware=False, overwrite=True)
else:
    opts = {"store_options": {"durable": False}} if dest.startswith("file:") else {}
    create_image(leaf, dest, fs_aware=False, replace=True, segment_size=seg, **opts)
seconds = time.perf_counter() - t
stop_sampling()
print(json.dumps({"seconds": seconds, "peak_rss": hwm(), "baseline_rss": base,
                  "peak_anon": peak["anon"], "peak_file": peak["file"]}))
"""


def run_child(script: str, *args: str, what: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter that imports this vhdcore, and
    return the JSON object it printed last."""
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory check of {what} failed: {proc.stderr.strip()[-2000:]}")
    rec: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rec


def measure_peak_memory(what: str, leaf: str | os.PathLike[str], dest: str,
                        segment_size: int | None = None) -> dict[str, Any]:
    """Run ``flatten`` (to the path ``dest``, sparse VHD) or ``imaging`` (to
    the URL ``dest``; a ``file://`` target without fsync; ``segment_size``
    as the job's, else its default) of ``leaf`` in a child process and return its
    figures: ``seconds``, ``peak_rss`` (VmHWM, or ``ru_maxrss`` where there is
    no /proc), ``baseline_rss`` (after imports), ``peak_anon`` and
    ``peak_file`` (RssAnon and RssFile sampled every 5 ms; 0 without /proc),
    all in bytes."""
    if what not in ("flatten", "imaging"):
        raise ValueError(f"what must be 'flatten' or 'imaging', not {what!r}")
    extra = () if segment_size is None else (str(segment_size),)
    return run_child(_CHILD, what, os.fspath(leaf), dest, *extra, what=what)


def measure_memory(b: BenchRun) -> None:
    vsize = b.memory_size
    b.say(f"measuring peak memory of flatten and imaging on a {vsize / GiB:.0f} GiB "
          "sparse chain ...")
    w = make_chain(b.work / "memory", "sparse", size=vsize, layers=3, seed=5)
    b.settle(w.paths)
    out = b.work / "memory-out"
    out.mkdir(exist_ok=True)
    for what, limit in (("flatten", 256), ("imaging", 256)):
        dest = str(out / "flat.vhd") if what == "flatten" else f"file://{out}/image"
        rec = measure_peak_memory(what, w.leaf, dest)
        peak = rec["peak_rss"]
        note = (f"peak resident set (VmHWM) of a child process; after imports "
                f"{rec['baseline_rss'] / MiB:.0f} MiB; own allocations peaked at about "
                f"{rec['peak_anon'] / MiB:.0f} MiB (RssAnon, sampled), the rest is pages "
                f"of the mapped VHD files (clean page cache, {rec['peak_file'] / MiB:.0f} "
                "MiB at the sampled peak)")
        b.add(f"memory.{what}", f"peak RSS, {what} of {vsize / GiB:.0f} GiB sparse",
              "memory", vsize, rec["seconds"], ratio=peak / (limit * MiB),
              ratio_to=f"{limit} MiB", note=note, peak_bytes=peak, reps=1)
        b.add(f"memory.{what}_anon", f"peak anonymous memory, {what}", "memory", vsize,
              rec["seconds"], ratio=rec["peak_anon"] / (limit * MiB),
              ratio_to=f"{limit} MiB", peak_bytes=rec["peak_anon"], reps=1,
              note="sampled every 5 ms: what the process allocated itself")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
    _memory_large_segments(b, w, vsize, out)
    _memory_swift(b, w, vsize)
    shutil.rmtree(b.work / "memory", ignore_errors=True)


#: the segment size of the large-segment memory check: as a target allowing
#: few segments (Swift's 1000 per manifest) makes them for a large image
LARGE_SEGMENT = 256 * MiB


def _memory_large_segments(b: BenchRun, w: Workload, vsize: int, out: Path) -> None:
    """Peak RSS of ``image`` with 256 MiB segments: segments above the job's
    memory budget are packed into scratch files, so memory does not grow
    with the segment size (it was about two segments' worth before)."""
    rec = measure_peak_memory("imaging", w.leaf, f"file://{out}/image", LARGE_SEGMENT)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    peak = rec["peak_rss"]
    b.add("memory.imaging_large_segments", f"peak RSS, imaging of {vsize / GiB:.0f} GiB "
              f"sparse, {LARGE_SEGMENT // MiB} MiB segments", "memory", vsize, rec["seconds"],
              ratio=peak / (256 * MiB), ratio_to="256 MiB", peak_bytes=peak, reps=1,
              note=f"to a directory; segments above 32 MiB are packed in scratch files "
                   f"(SpillSegment), not in memory; own allocations peaked at about "
                   f"{rec['peak_anon'] / MiB:.0f} MiB (RssAnon, sampled)")


def _memory_swift(b: BenchRun, w: Workload, vsize: int) -> None:
    """Peak RSS of ``image`` to Swift (default options), where a Swift
    is configured (``ST_AUTH``, ``ST_USER``, ``ST_KEY``)."""
    if not all(os.environ.get(k) for k in ("ST_AUTH", "ST_USER", "ST_KEY")):
        return
    container = f"vhdcore-bench-mem-{os.getpid()}-{int(time.time())}"
    try:
        rec = measure_peak_memory("imaging", w.leaf, f"swift://{container}/image")
    finally:
        swift = shutil.which("swift")
        if swift is not None:
            for c in (container, f"{container}_segments"):
                subprocess.run([swift, "delete", c], capture_output=True, check=False)
    peak = rec["peak_rss"]
    r = b.add("memory.imaging_swift", f"peak RSS, imaging of {vsize / GiB:.0f} GiB sparse "
              "to Swift", "memory", vsize, rec["seconds"], ratio=peak / (256 * MiB),
              ratio_to="256 MiB", peak_bytes=peak, reps=1,
              note=f"default options (segment size, 4 uploads at once); own allocations "
                   f"peaked at about {rec['peak_anon'] / MiB:.0f} MiB (RssAnon, sampled)")
    r.target, r.passed = "< 256 MiB", peak < 256 * MiB
