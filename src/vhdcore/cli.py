"""The command line: ``python -m vhdcore ...`` (also installed as ``vhdcore``).

This module only parses arguments, calls the library and prints; it holds no
logic of its own.

Exit codes (a contract other tools script against):

* 0 — success (``check``: no problems found)
* 1 — bad input or an error (a ``VhdError``); ``check``: problems found
* 2 — wrong usage (argparse)
* 3 — the job failed (a target or the host failed; ``image`` can be resumed)
* 4 — the job stopped at its timeout or was interrupted; it can be resumed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._util import human_size, parse_size
from .errors import VhdError, VhdTimeoutError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_TIMEOUT = 4

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = fn
        return fn
    return deco


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _chain_options(ns: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(ns, "allow_dir", None):
        leaf_dir = os.path.dirname(os.path.abspath(ns.leaf if hasattr(ns, "leaf") else ns.file))
        opts["allowed_dirs"] = [leaf_dir, *ns.allow_dir]
    if getattr(ns, "max_depth", None):
        opts["max_depth"] = ns.max_depth
    if getattr(ns, "allow_absolute", False):
        opts["allow_absolute"] = True
    return opts


def _add_chain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-dir", action="append", metavar="DIR",
                   help="a directory parents may live in besides the leaf's own (repeatable)")
    p.add_argument("--max-depth", type=int, metavar="N",
                   help="the most disks a chain may have (default 256)")
    p.add_argument("--allow-absolute", action="store_true",
                   help="follow parent locators that hold absolute paths (still confined)")


# ------------------------------------------------------------------ info
@_command("info")
def _info(ns: argparse.Namespace) -> int:
    from .disk import VhdFile

    with VhdFile.open(ns.file) as vhd:
        d = vhd.describe()
    if ns.json:
        _print_json(d)
        return EXIT_OK
    for k, v in d.items():
        if k == "parent_locators":
            for loc in v:
                print(f"{'parent locator':20} {loc}")
        elif isinstance(v, int) and k.endswith("size") or k == "allocated_bytes":
            print(f"{k.replace('_', ' '):20} {v} ({human_size(int(v))})")
        else:
            print(f"{k.replace('_', ' '):20} {v}")
    return EXIT_OK


@_command("check")
def _check(ns: argparse.Namespace) -> int:
    from .check import check_chain, check_file

    if ns.chain:
        problems = check_chain(ns.file, **_chain_options(ns))
    else:
        problems = check_file(ns.file)
    errors = [p for p in problems if p.severity == "error"]
    if ns.json:
        _print_json({"ok": not errors, "problems": [p.to_json() for p in problems]})
    else:
        for p in problems:
            print(p)
        if not errors:
            print(f"{ns.file}: ok" + (" (whole chain)" if ns.chain else ""))
    return EXIT_OK if not errors else EXIT_ERROR


@_command("chain")
def _chain(ns: argparse.Namespace) -> int:
    from .chain import Chain

    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        rows: list[dict[str, Any]] = []
        for ly in chain.layers:
            rows.append({
                "path": ly.path, "type": ly.footer.type_name, "uuid": str(ly.uuid),
                "virtual_size": ly.virtual_size, "file_size": ly.file_size,
                "allocated_bytes": ly.allocated_bytes(),
            })
    if ns.json:
        _print_json({"leaf": ns.leaf, "depth": len(rows), "disks": rows})
        return EXIT_OK
    for i, r in enumerate(rows):
        print(f"{'leaf' if i == 0 else ('base' if i == len(rows) - 1 else 'parent'):6} "
              f"{r['path']}  {r['type']}  virtual {human_size(r['virtual_size'])}  "
              f"file {human_size(r['file_size'])}  allocated {human_size(r['allocated_bytes'])}")
    return EXIT_OK


@_command("create")
def _create(ns: argparse.Namespace) -> int:
    from .disk import create_dynamic, create_fixed

    size = parse_size(ns.size)
    if ns.type == "fixed":
        if ns.block_size:
            raise VhdError("--block-size applies to dynamic disks only")
        create_fixed(ns.out, size, exclusive=not ns.force).close()
    else:
        bs = parse_size(ns.block_size) if ns.block_size else 2 * 1024 * 1024
        create_dynamic(ns.out, size, block_size=bs, exclusive=not ns.force).close()
    print(f"created {ns.out}: {ns.type} {human_size(size)}")
    return EXIT_OK


@_command("snapshot")
def _snapshot(ns: argparse.Namespace) -> int:
    from .disk import create_differencing

    create_differencing(ns.child, ns.parent, exclusive=not ns.force).close()
    print(f"created {ns.child}: differencing disk over {ns.parent}")
    return EXIT_OK


@_command("cat")
def _cat(ns: argparse.Namespace) -> int:
    from .chain import Chain

    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        if ns.output and ns.output != "-":
            chain.copy_to_raw(ns.output)
            return EXIT_OK
        out = sys.stdout.buffer
        for view in chain.iter_raw(8 * 1024 * 1024):
            out.write(view)
        out.flush()
    return EXIT_OK


@_command("write")
def _write(ns: argparse.Namespace) -> int:
    from .chain import Chain

    offset = parse_size(ns.offset)
    with Chain.open(ns.file, writable=True, **_chain_options(ns)) as chain:
        src = sys.stdin.buffer if ns.source == "-" else open(ns.source, "rb")
        try:
            pos = offset
            while True:
                buf = src.read(4 * 1024 * 1024)
                if not buf:
                    break
                chain.write(pos, buf)
                pos += len(buf)
        finally:
            if src is not sys.stdin.buffer:
                src.close()
        chain.leaf.flush()
    print(f"wrote {pos - offset} bytes at offset {offset} into {ns.file}")
    return EXIT_OK


@_command("flatten")
def _flatten(ns: argparse.Namespace) -> int:
    from .coalesce import flatten

    res = flatten(ns.leaf, ns.out, ns.format, threads=ns.threads,
                  progress=_progress_pair("flatten", not ns.quiet),
                  chain_options=_chain_options(ns), fs_aware=ns.fs_aware)
    print(f"flattened {ns.leaf} -> {res.path} ({res.format}): {res.blocks_stored} blocks, "
          f"{human_size(res.sectors_stored * 512)} of data, {human_size(res.bytes_written)} written")
    return EXIT_OK


@_command("coalesce")
def _coalesce(ns: argparse.Namespace) -> int:
    from .coalesce import coalesce

    res = coalesce(ns.child, relink_children=ns.relink or (), siblings=ns.sibling or (),
                   timeout=ns.timeout, checkpoint_dir=ns.checkpoint_dir,
                   progress=_progress_pair("coalesce", not ns.quiet, unit="blocks"),
                   chain_options=_chain_options(ns))
    print(f"coalesced {res.child} into {res.parent}: {res.blocks_merged} blocks, "
          f"{human_size(res.sectors_written * 512)} written, "
          f"{human_size(res.sectors_skipped_equal * 512)} already equal"
          + (", parent grown" if res.grown else "") + (", resumed" if res.resumed else "")
          + (f"; relinked {', '.join(res.relinked)}" if res.relinked else "")
          + f" in {res.seconds:.2f} s. {res.child} can now be removed.")
    return EXIT_OK


@_command("compact")
def _compact(ns: argparse.Namespace) -> int:
    from .coalesce import compact

    res = compact(ns.input, ns.out, progress=_progress_pair("compact", not ns.quiet))
    print(f"compacted {ns.input} -> {res.path}: {res.blocks_stored} blocks kept, "
          f"{human_size(os.path.getsize(res.path))}")
    return EXIT_OK


@_command("repair")
def _repair(ns: argparse.Namespace) -> int:
    from .coalesce import repair

    if repair(ns.file):
        print(f"{ns.file}: primary footer restored from the copy at offset 0")
    else:
        print(f"{ns.file}: primary footer is fine; nothing written")
    return EXIT_OK


def _progress_pair(desc: str, enabled: bool, unit: str = "B") -> Callable[[int, int], None] | None:
    """A (done, total) callback that drives a tqdm bar on a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    state: dict[str, Any] = {}

    def cb(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit=unit,
                                      unit_scale=unit == "B", unit_divisor=1024,
                                      file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return cb


def _job_progress(ns: argparse.Namespace) -> Callable[[Any], None] | None:
    """--json: one JSON event per line on stdout; a terminal: a progress bar."""
    if getattr(ns, "json", False):
        def emit(ev: Any) -> None:
            sys.stdout.write(json.dumps({"event": "progress", **ev.to_json()}) + "\n")
            sys.stdout.flush()
        return emit
    if getattr(ns, "quiet", False) or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    state: dict[str, Any] = {}

    def bar_cb(ev: Any) -> None:
        bar = state.get("bar")
        if bar is None or state.get("stage") != ev.stage:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=max(1, ev.bytes_total), unit="B", unit_scale=True,
                                      unit_divisor=1024, file=sys.stderr, leave=False,
                                      desc=f"{ev.percent:3d}% {ev.stage}")
            state["stage"] = ev.stage
        bar.update(max(0, ev.bytes_done - bar.n))
        if ev.stage in ("done", "failed"):
            bar.close()
    return bar_cb


def _image_exit(exc: BaseException) -> int:
    from .errors import StoreError

    if isinstance(exc, VhdTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, (StoreError, OSError)):
        return EXIT_FAILED
    return EXIT_ERROR


@_command("image")
def _image(ns: argparse.Namespace) -> int:
    from .imaging import create_image

    try:
        res = create_image(
            ns.leaf, ns.to, threads=ns.threads, concurrency=ns.concurrency,
            segment_size=parse_size(ns.segment_size) if ns.segment_size else None,
            timeout=ns.timeout, coalesce_timeout=ns.coalesce_timeout, resume=ns.resume,
            restart=ns.restart, state_dir=ns.state_dir, progress=_job_progress(ns),
            fs_aware=ns.fs_aware, chain_options=_chain_options(ns))
    except (VhdError, OSError) as exc:
        code = _image_exit(exc)
        if ns.json:
            print(json.dumps({"event": "error", "exit_code": code, "error": type(exc).__name__,
                              "message": str(exc)}))
        print(f"vhdcore: {'error: ' if code != EXIT_TIMEOUT else ''}{exc}", file=sys.stderr)
        if code == EXIT_FAILED:
            print("vhdcore: the job state was kept; run the same command with --resume to "
                  "continue once the target is reachable", file=sys.stderr)
        return code
    if ns.json:
        from dataclasses import asdict

        print(json.dumps({"event": "result", **asdict(res)}))
    else:
        print(f"image stored at {res.url}: {human_size(res.virtual_size)} virtual, "
              f"{res.blocks_stored} blocks, {human_size(res.stream_size)} stream -> "
              f"{human_size(res.compressed_size)} in {res.segments} segments "
              f"({res.segments_skipped} already there) in {res.seconds:.1f} s")
    return EXIT_OK


@_command("restore")
def _restore(ns: argparse.Namespace) -> int:
    from .store import restore

    try:
        man = restore(ns.url, ns.out, format=ns.format, concurrency=ns.concurrency)
    except (VhdError, OSError) as exc:
        code = _image_exit(exc)
        print(f"vhdcore: error: {exc}", file=sys.stderr)
        return code if code != EXIT_ERROR else EXIT_ERROR
    if ns.json:
        print(json.dumps({"event": "result", "out": ns.out, "format": ns.format,
                          "segments": len(man.segments), "metadata": dict(man.metadata)}))
    else:
        print(f"restored {ns.url} -> {ns.out} ({ns.format}), sha256 verified")
    return EXIT_OK


@_command("estimate")
def _estimate(ns: argparse.Namespace) -> int:
    from .estimate import estimate

    est = estimate(ns.leaf, threads=ns.threads, fs_aware=ns.fs_aware,
                   upload_rate=parse_size(ns.upload_rate) if ns.upload_rate else None,
                   chain_options=_chain_options(ns))
    if ns.json:
        _print_json(est)
        return EXIT_OK
    for ly in est["layers"]:
        print(f"  {ly['type']:13} {ly['path']}: file {human_size(ly['file_size'])}, "
              f"allocated {human_size(ly['allocated_bytes'])}")
    print(f"virtual size            {human_size(est['virtual_size'])}")
    print(f"VHD files               {human_size(est['vhd_bytes'])} in {est['depth']} disks")
    print(f"after coalescing        {human_size(est['data_bytes'])} of data in "
          f"{est['blocks_stored']} blocks ({human_size(est['stream_bytes'])} image stream)")
    print(f"expected compressed     {human_size(est['expected_compressed_bytes'])} "
          f"(ratio {est['compression_ratio']}, from {est['sample_blocks']} sampled blocks)")
    for p in est.get("filesystems", {}).get("partitions", []):
        print(f"  partition {p.get('index')}: {p.get('fs') or 'unknown'} {p.get('state')}, "
              f"used {human_size(p.get('used_bytes') or 0)}, free "
              f"{human_size(p.get('free_bytes') or 0)}")
    wo = est.get("without_fs_aware")
    if wo:
        print(f"without --fs-aware      {human_size(wo['data_bytes'])} of data in "
              f"{wo['blocks_stored']} blocks, expected compressed "
              f"{human_size(wo['expected_compressed_bytes'])}")
    print(f"time, 2 minutes per GB  {est['rule_of_thumb_seconds']:.0f} s")
    print(f"time, vhdcore predicted {est['predicted_seconds']:.1f} s (measured on this machine)")
    return EXIT_OK


@_command("demo")
def _demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    say = (lambda msg: print(json.dumps({"event": "info", "message": msg}))) if ns.json \
        else print
    figures = run_demo(ns.workdir, size=parse_size(ns.size), progress=_job_progress(ns),
                       say=say, keep=ns.keep)
    if ns.json:
        print(json.dumps({"event": "result", **figures}))
    return EXIT_OK


@_command("fsmap")
def _fsmap(ns: argparse.Namespace) -> int:
    from .chain import Chain
    from .fsmap import map_disk

    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        dmap = map_disk(chain.read, chain.virtual_size)
        vsize = chain.virtual_size
    if ns.json:
        _print_json(dmap.to_json(include_ranges=ns.ranges))
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


@_command("bench")
def _bench(ns: argparse.Namespace) -> int:
    from . import bench

    report = bench.run_bench(size=parse_size(ns.size) if ns.size else None, quick=ns.quick,
                             reps=ns.reps, memory_size=parse_size(ns.memory_size)
                             if ns.memory_size else None, memory=not ns.no_memory,
                             workdir=ns.workdir, say=lambda msg: print(msg, file=sys.stderr))
    if ns.json:
        _print_json(report)
    else:
        print(bench.format_report(report))
    return EXIT_ERROR if ns.strict and report["summary"]["miss"] else EXIT_OK


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``vhdcore`` argument parser with every subcommand (the CLI reference
    in the documentation is generated from it)."""
    p = argparse.ArgumentParser(
        prog="vhdcore",
        description="Read, check, coalesce, flatten and image Microsoft VHD chains.",
        epilog="Sizes accept K/M/G/T suffixes (binary). Exit codes: 0 ok, 1 bad input or "
               "problems found, 2 usage, 3 job failed (resumable), 4 timed out or interrupted "
               "(resumable).",
    )
    p.add_argument("--version", action="version", version=f"vhdcore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="show the footer, header and BAT facts of one VHD file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("check", help="check a VHD file (or its whole chain) for damage")
    s.add_argument("file")
    s.add_argument("--chain", action="store_true", help="also check every parent and each link")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)

    s = sub.add_parser("chain", help="list the chain from leaf to base")
    s.add_argument("leaf")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)

    s = sub.add_parser("create", help="create an empty fixed or dynamic VHD")
    s.add_argument("out")
    s.add_argument("--size", required=True, help="virtual size, e.g. 10G")
    s.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic")
    s.add_argument("--block-size", help="block size of a dynamic disk (default 2M)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")

    s = sub.add_parser("snapshot", help="create a differencing disk over a parent")
    s.add_argument("child")
    s.add_argument("--parent", required=True)
    s.add_argument("--force", action="store_true", help="overwrite an existing file")

    s = sub.add_parser("cat", help="write the whole virtual disk through the chain as raw bytes")
    s.add_argument("leaf")
    s.add_argument("-o", "--output", help="output file (sparse); default: standard output")
    _add_chain_options(s)

    s = sub.add_parser("write", help="write a file's bytes into a VHD at a virtual offset")
    s.add_argument("file")
    s.add_argument("--offset", required=True, help="virtual byte offset (K/M/G suffixes)")
    s.add_argument("--from", dest="source", required=True, help="source file, or - for stdin")
    _add_chain_options(s)

    s = sub.add_parser("flatten", help="write the chain as one standalone image (read once)")
    s.add_argument("leaf")
    s.add_argument("out")
    s.add_argument("--format", choices=("vhd", "fixed", "raw"), default="vhd",
                   help="vhd: sparse dynamic VHD without zero blocks (default)")
    s.add_argument("--threads", type=int, default=2, help="merge threads (default 2)")
    s.add_argument("--fs-aware", action="store_true",
                   help="skip what the guest's filesystems mark free (free sectors read as zero)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_chain_options(s)

    s = sub.add_parser("coalesce", help="merge a differencing disk into its parent, in place")
    s.add_argument("child")
    s.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop with a checkpoint after this long (exit 4; run again to resume)")
    s.add_argument("--relink", nargs="+", metavar="GRANDCHILD",
                   help="the child's own children, re-pointed to the parent afterwards")
    s.add_argument("--sibling", action="append", metavar="VHD",
                   help="another disk to treat as a child of the parent (refuses if it is)")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where the checkpoint lives (default: beside the child)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_chain_options(s)

    s = sub.add_parser("compact", help="rewrite one VHD without its empty blocks")
    s.add_argument("input")
    s.add_argument("out")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("repair", help="restore a damaged primary footer from the copy at offset 0")
    s.add_argument("file")

    s = sub.add_parser("image", help="image a chain to a target: coalesce, compress, upload")
    s.add_argument("leaf")
    s.add_argument("--to", required=True, metavar="URL",
                   help="file:///dir/name, swift://container/name or s3://bucket/key")
    s.add_argument("--timeout", type=float, metavar="S",
                   help="stop after S seconds with a resumable state (exit 4)")
    s.add_argument("--coalesce-timeout", type=float, metavar="S",
                   help="stop if the coalescing stage takes longer than S seconds (exit 4)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted job")
    s.add_argument("--restart", action="store_true", help="discard an interrupted job's state")
    s.add_argument("--state-dir", metavar="DIR",
                   help="where the job state lives (default: beside a file:// output, else "
                        "$XDG_STATE_HOME/vhdcore/jobs)")
    s.add_argument("--threads", type=int, default=2, help="merge and compression threads")
    s.add_argument("--concurrency", type=int, default=4, help="parallel segment uploads")
    s.add_argument("--segment-size", metavar="SIZE", help="segment size (default: from the "
                   "image size and the target's limits)")
    fs = s.add_mutually_exclusive_group()
    fs.add_argument("--fs-aware", dest="fs_aware", action="store_true", default=True,
                    help="skip what the guest's filesystems mark free (default)")
    fs.add_argument("--no-fs-aware", dest="fs_aware", action="store_false",
                    help="store every non-zero block")
    s.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_chain_options(s)

    s = sub.add_parser("restore", help="download an image, verify it, write a VHD or raw file")
    s.add_argument("url")
    s.add_argument("out")
    s.add_argument("--format", choices=("vhd", "raw"), default="vhd")
    s.add_argument("--concurrency", type=int, default=4, help="parallel segment downloads")
    s.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("estimate", help="what imaging this chain will cost, before running it")
    s.add_argument("leaf")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--upload-rate", metavar="SIZE",
                   help="bytes per second the target accepts (e.g. 100M); default: unlimited")
    s.add_argument("--fs-aware", action="store_true",
                   help="also read the guest's filesystems and report their used bytes")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)

    s = sub.add_parser("demo", help="image a built-in synthetic chain to a local directory, "
                                    "restore it and check it (no server needed)")
    s.add_argument("--size", default="384M", help="virtual size of the demo disk")
    s.add_argument("--workdir", help="keep the files here instead of a temporary directory")
    s.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    s.add_argument("--json", action="store_true", help="JSON events on stdout")

    s = sub.add_parser("fsmap", help="partitions and filesystems of the virtual disk, their "
                                     "state and free space")
    s.add_argument("leaf")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ranges", action="store_true", help="with --json: list the free ranges")
    _add_chain_options(s)

    s = sub.add_parser("bench", help="measure throughput on generated chains against this "
                                     "machine's own limits (PASS/MISS per target)",
                       description="Generate chains in a temporary directory and measure the "
                                   "kernel, flatten, coalesce, lz4, upload and imaging against "
                                   "the memory copy bandwidth, qemu-img, the pure-Python twin "
                                   "and the slowest pipeline stage. Exit code 0 even when a "
                                   "target is missed (it is a report) unless --strict.")
    s.add_argument("--quick", action="store_true",
                   help="smaller workload (96M) and 5 repetitions: under two minutes")
    s.add_argument("--size", help="virtual size of the workloads (default 256M, quick 96M)")
    s.add_argument("--reps", type=int, help="repetitions per figure, median reported "
                   "(default 7, quick 5)")
    s.add_argument("--memory-size", help="virtual size of the sparse chain of the memory "
                   "check (default 8G)")
    s.add_argument("--no-memory", action="store_true", help="skip the memory check")
    s.add_argument("--workdir", help="make the temporary directory here")
    s.add_argument("--json", action="store_true", help="print every figure as JSON")
    s.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")

    for extra in _EXTRA_PARSERS:
        extra(sub)
    return p


#: functions that add subcommands defined in other modules of this file's
#: second half (kept apart for readability)
_EXTRA_PARSERS: list[Callable[[Any], None]] = []


def _add_fleet_parsers(sub: Any) -> None:
    """``worker``, ``submit``, ``jobs``, ``cancel``: the fleet (vhdcore[fleet]);
    the handlers import Celery and redis-py only when they run."""
    from .fleet.cli import add_parsers

    add_parsers(sub, _COMMANDS)


_EXTRA_PARSERS.append(_add_fleet_parsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and
    return the exit code (see this module's docstring)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _COMMANDS[ns.command](ns)
    except VhdTimeoutError as exc:
        print(f"vhdcore: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except VhdError as exc:
        print(f"vhdcore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print("vhdcore: interrupted", file=sys.stderr)
        return EXIT_TIMEOUT
    except OSError as exc:
        print(f"vhdcore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
