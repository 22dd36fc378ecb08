"""Subcommands around the engine rather than over a user's disks: ``demo``,
``fsmap`` (what a filesystem-aware run leaves out) and ``bench``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._args import new_subcommand as _new
from .._args import size_at_least as _size_at_least
from .._util import human_size
from ._common import EXIT_ERROR, EXIT_OK, Commands, UsageError, print_json
from ._options import POSITIVE, add_chain_options, chain_options
from .progress import display_for, job_progress

COMMANDS = Commands()


@COMMANDS.parser
def _p_demo(sub: Any) -> None:
    s = _new(sub, "demo", "image, restore and check a built-in demo chain (no server)",
             "Build a synthetic chain of three VHDs, image it to a local directory, restore "
             "it and check that the restored disk reads exactly like the chain.",
             ["demo", "demo --size 1G --workdir demo-files --json"])
    s.add_argument("--size", default=384 * 1024 * 1024, type=_size_at_least(1024 * 1024),
                   metavar="SIZE", help="virtual size of the demo disk (default 384M)")
    s.add_argument("--workdir", help="keep the files here instead of a temporary directory")
    s.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    s.add_argument("--json", action="store_true", help="JSON events on standard output")


@COMMANDS.handler("demo")
def _demo(ns: argparse.Namespace) -> int:
    from ..demo import run_demo

    from ..imaging import EVENT_VERSION

    say = (lambda msg: print(json.dumps({"event": "info", "version": EVENT_VERSION,
                                         "message": msg}))) if ns.json else print
    display = display_for(ns)
    figures = run_demo(ns.workdir, size=ns.size, progress=job_progress(ns, display),
                       say=say, keep=ns.keep)
    display.finish()
    if ns.json:
        print(json.dumps({"event": "result", "version": EVENT_VERSION, **figures}))
    return EXIT_OK


@COMMANDS.parser
def _p_fsmap(sub: Any) -> None:
    s = _new(sub, "fsmap", "show the disk's partitions, filesystems and their free space",
             "Read the partition table and filesystems of the virtual disk through the chain "
             "and show each one's state and free space: what a filesystem-aware image, "
             "flatten or estimate leaves out.",
             ["fsmap leaf.vhd", "fsmap leaf.vhd --json --ranges"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ranges", action="store_true", help="with --json: list the free ranges")
    add_chain_options(s)


@COMMANDS.handler("fsmap")
def _fsmap(ns: argparse.Namespace) -> int:
    from ..chain import Chain
    from ..fsmap import map_disk

    if ns.ranges and not ns.json:
        raise UsageError("--ranges needs --json")
    with Chain.open(ns.leaf, **chain_options(ns)) as chain:
        dmap = map_disk(chain.read, chain.virtual_size)
        vsize = chain.virtual_size
    if ns.json:
        print_json(dmap.to_json(include_ranges=ns.ranges))
        return EXIT_OK
    print(f"{ns.leaf}: {human_size(vsize)}, partition table: {dmap.table}")
    for p in dmap.partitions:
        print(f"  {p.index:2} {p.table:4} {human_size(p.start):>10} +{human_size(p.length):>10}  "
              f"{p.fs or p.type_hint or 'unknown':8} {p.state:16} used {human_size(p.used_bytes)}"
              f", free {human_size(p.free_bytes)}" + (f"  ({p.reason})" if p.reason else ""))
        for w in p.warnings:
            print(f"       warning: {w}")
    for w in dmap.warnings:
        print(f"  warning: {w}")
    print(f"skippable: {human_size(dmap.free_bytes)} of {human_size(vsize)}")
    return EXIT_OK


@COMMANDS.parser
def _p_bench(sub: Any) -> None:
    s = _new(sub, "bench", "measure throughput against this machine's limits (PASS/MISS)",
             "Generate chains in a temporary directory and measure the kernel, flatten, "
             "coalesce, lz4, upload and imaging against the memory copy bandwidth, qemu-img, "
             "the pure-Python twin and the slowest pipeline stage. Exit code 0 even when a "
             "target is missed (it is a report) unless --strict.",
             ["bench --quick", "bench --json --strict"])
    s.add_argument("--quick", action="store_true",
                   help="smaller workload (96M) and 5 repetitions: under two minutes")
    s.add_argument("--size", type=_size_at_least(1024 * 1024), metavar="SIZE",
                   help="virtual size of the workloads (default 256M, quick 96M)")
    s.add_argument("--reps", type=POSITIVE, metavar="N",
                   help="repetitions per figure, median reported (default 7, quick 5)")
    s.add_argument("--memory-size", type=_size_at_least(1024 * 1024), metavar="SIZE",
                   help="virtual size of the sparse chain of the memory check (default 8G)")
    s.add_argument("--no-memory", action="store_true", help="skip the memory check")
    s.add_argument("--workdir", help="make the temporary directory here")
    s.add_argument("--json", action="store_true", help="print every figure as JSON")
    s.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")


@COMMANDS.handler("bench")
def _bench(ns: argparse.Namespace) -> int:
    from .. import bench

    report = bench.run_bench(size=ns.size, quick=ns.quick, reps=ns.reps,
                             memory_size=ns.memory_size, memory=not ns.no_memory,
                             workdir=ns.workdir, say=lambda msg: print(msg, file=sys.stderr))
    if ns.json:
        print_json(report)
    else:
        print(bench.format_report(report))
    return EXIT_ERROR if ns.strict and report["summary"]["miss"] else EXIT_OK


