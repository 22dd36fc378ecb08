"""Flatten and ``cat -o`` against ``qemu-img convert``, side by side, on a
disk of a few GiB: cold (the page cache dropped before each side; needs root)
and warm, with the output made durable inside the timing on both sides.

    PYTHONPATH=src python3 benchmarks/flatten_vs_qemu.py --dir DIR --size 4G
    PYTHONPATH=src python3 benchmarks/flatten_vs_qemu.py --dir DIR --only vpc --modes cold

The directory (on the file system to measure) receives a realistic
three-layer chain (``vhdcore._workloads.make_chain``) and that chain flattened
into one dynamic VHD, the input of both sides (qemu-img does not follow VHD
differencing chains).  Each side is a command: ``python -m vhdcore flatten
--no-fs-aware`` (fsync, rename, directory fsync) or ``cat -o``, and
``qemu-img convert -f vpc -O vpc|raw`` followed by ``sync -f`` of its output.
Process start is counted on both sides.  The sides run interleaved; the best
of ``--reps`` runs is reported (the machine is shared: the best run is the
least disturbed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from vhdcore._util import parse_size
from vhdcore._workloads import make_chain
from vhdcore.coalesce import flatten


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _timed(cmd: list[str], out: str) -> float:
    if os.path.exists(out):
        os.unlink(out)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sync", "-f", out], check=True)
    dt = time.perf_counter() - t
    os.unlink(out)
    os.sync()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="working directory (on the file system to measure)")
    ap.add_argument("--size", default="4G", help="virtual size of the disk (default 4G)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="vpc,raw,cat", help="comma-separated: vpc, raw, cat")
    ap.add_argument("--modes", default="cold,warm", help="comma-separated: cold, warm")
    a = ap.parse_args()
    qemu = shutil.which("qemu-img")
    if qemu is None:
        print("qemu-img is not installed (Debian: qemu-utils)", file=sys.stderr)
        return 1
    modes = a.modes.split(",")
    if "cold" in modes and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("cold runs need root (/proc/sys/vm/drop_caches): warm only", file=sys.stderr)
        modes = [m for m in modes if m != "cold"]
    d = os.path.abspath(a.dir)
    size = parse_size(a.size)
    inp = os.path.join(d, "flat.vhd")
    if not os.path.exists(inp):
        w = make_chain(os.path.join(d, "chain"), "realistic", size=size, layers=3, seed=1)
        flatten(w.leaf, inp, "vhd", durable=True, fs_aware=False)
    gib = size / 2**30
    py = [sys.executable, "-m", "vhdcore"]
    cases = {
        "vpc": ([*py, "flatten", "-q", "--no-fs-aware", inp, f"{d}/o.vhd"], f"{d}/o.vhd",
                [qemu, "convert", "-f", "vpc", "-O", "vpc", inp, f"{d}/q.vhd"], f"{d}/q.vhd"),
        "raw": ([*py, "flatten", "-q", "--no-fs-aware", "--format", "raw", inp, f"{d}/o.raw"],
                f"{d}/o.raw",
                [qemu, "convert", "-f", "vpc", "-O", "raw", inp, f"{d}/q.raw"], f"{d}/q.raw"),
        "cat": ([*py, "cat", inp, "-o", f"{d}/c.raw"], f"{d}/c.raw",
                [qemu, "convert", "-f", "vpc", "-O", "raw", inp, f"{d}/q.raw"], f"{d}/q.raw"),
    }
    for mode in modes:
        for key in a.only.split(","):
            ours, ours_out, peer, peer_out = cases[key]
            tv: list[float] = []
            tq: list[float] = []
            for i in range(a.reps + (1 if mode == "warm" else 0)):
                for side in ("vhdcore", "qemu"):
                    if mode == "cold":
                        _drop_caches()
                    dt = _timed(ours, ours_out) if side == "vhdcore" else _timed(peer, peer_out)
                    if mode == "warm" and i == 0:
                        continue  # the warm-up fills the page cache
                    (tv if side == "vhdcore" else tq).append(dt)
            bv, bq = min(tv), min(tq)
            print(f"{mode:4} {key:3}  vhdcore {bv:6.2f} s {gib / bv:5.2f} GiB/s   "
                  f"qemu-img {bq:6.2f} s {gib / bq:5.2f} GiB/s   ratio {bq / bv:4.2f}x   "
                  f"(all runs: vhdcore {[round(x, 2) for x in tv]}, "
                  f"qemu-img {[round(x, 2) for x in tq]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
