"""Subcommands over one disk or chain, without an image: ``info``, ``check``,
``chain``, ``create``, ``snapshot``, ``cat`` and ``write``."""
from __future__ import annotations

import argparse
import datetime
import os
import stat
import sys
from typing import Any

from .._args import new_subcommand as _new
from .._util import human_size
from ..errors import VhdError
from ._common import EXIT_ERROR, EXIT_OK, Commands, UsageError, print_json
from ._options import (OFFSET, SIZE, add_chain_options, add_force, chain_options,
                       power_of_two_size, refuse_existing)

COMMANDS = Commands()


# ------------------------------------------------------------------ info
_LOCATOR_PLATFORMS = {
    "W2ru": "Windows, relative path",
    "W2ku": "Windows, absolute path",
    "Wi2r": "Windows, relative (deprecated)",
    "Wi2k": "Windows, absolute (deprecated)",
    "MacX": "Mac OS X, file URL",
    "Mac ": "Mac OS alias",
}
_VHD_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_INFO_SIZES = ("file_size", "virtual_size", "original_size", "block_size", "allocated_bytes")


def vhd_time_iso(seconds: int) -> str:
    """A VHD time stamp (seconds since 2000-01-01 UTC) as ISO 8601 UTC."""
    return (_VHD_EPOCH + datetime.timedelta(seconds=int(seconds))).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_info(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``VhdFile.describe()`` as the ``--json`` document (time stamps ISO 8601
    UTC, raw values kept as ``*_vhd``; sizes exact bytes) and as the text
    lines of ``vhdcore info`` (human sizes with the exact bytes, one line per
    parent locator: platform code, meaning, path).  The one place both forms
    are made, so new fields show in both."""
    doc = dict(d)
    for key in ("timestamp", "parent_timestamp"):
        if isinstance(doc.get(key), int):
            doc[key + "_vhd"] = doc[key]
            doc[key] = vhd_time_iso(doc[key])
    lines: list[str] = []
    for k, v in doc.items():
        if k.endswith("_vhd"):
            continue
        label = k.replace("_", " ")
        if k == "parent_locators":
            if not v:
                lines.append(f"{'parent locators':20} none")
            for loc in v:
                if "error" in loc:
                    lines.append(f"{'parent locator':20} damaged: {loc['error']}")
                    continue
                meaning = _LOCATOR_PLATFORMS.get(loc.get("code", ""), "unknown platform")
                lines.append(f"{'parent locator':20} {loc.get('code')!s:4} ({meaning}): "
                             f"{loc.get('path')}")
        elif k in _INFO_SIZES and isinstance(v, int):
            lines.append(f"{label:20} {human_size(v)} ({v} bytes)")
        elif isinstance(v, bool):
            lines.append(f"{label:20} {'yes' if v else 'no'}")
        elif k == "geometry" and isinstance(v, list):
            lines.append(f"{label:20} {'/'.join(str(x) for x in v)} (cylinders/heads/sectors)")
        else:
            lines.append(f"{label:20} {v}")
    return doc, lines


@COMMANDS.parser
def _p_info(sub: Any) -> None:
    s = _new(sub, "info", "show the footer, header and BAT facts of one VHD file",
             "Print what one VHD file says about itself: type, sizes, UUID, time stamps "
             "(ISO 8601, UTC), block table and, for a differencing disk, its parent and "
             "parent locators. The file is only read; its parents are not opened.",
             ["info disk.vhd", "info child.vhd --json"])
    s.add_argument("file", help="the VHD file")
    s.add_argument("--json", action="store_true",
                   help="print JSON (sizes as exact bytes, time stamps ISO 8601)")


@COMMANDS.handler("info")
def _info(ns: argparse.Namespace) -> int:
    from ..vhd.file import VhdFile

    try:
        with VhdFile.open(ns.file) as vhd:
            doc, lines = format_info(vhd.describe())
    except VhdError as exc:
        return _info_damaged(ns, exc)
    if ns.json:
        print_json(doc)
    else:
        print("\n".join(lines))
    return EXIT_OK


def _info_damaged(ns: argparse.Namespace, exc: VhdError) -> int:
    """``info`` on a file that does not open: every field that can be read,
    and which checksum failed (stored vs computed).  Exit code 1."""
    from ..vhd.inspect import inspect_damaged

    try:
        d = inspect_damaged(ns.file)
    except (OSError, VhdError):
        raise exc from None
    d = {"error": str(exc), **d}
    if ns.json:
        print_json(d)
        raise exc
    print(f"{'error':20} {exc}")
    for k, v in d.items():
        if k in ("error", "checksum_failures"):
            continue
        if isinstance(v, dict):
            print(f"{k.replace('_', ' ')} at offset {v.get('offset')}:")
            for kk, vv in v.items():
                if kk != "offset":
                    print(f"  {kk.replace('_', ' '):20} {vv}")
        else:
            print(f"{k.replace('_', ' '):20} {v}")
    for bad in d["checksum_failures"]:
        print(f"BAD {bad}")
    # and the one-line error on standard error (exit 1), as for every command
    raise exc


# ------------------------------------------------------------------ check / chain
@COMMANDS.parser
def _p_check(sub: Any) -> None:
    s = _new(sub, "check", "check a VHD file (or its whole chain) for damage",
             "Check the footer, header, block table and bitmaps of a VHD file; with "
             "--chain, also every parent and each link. Exit 1 and one line per problem "
             "(file, offset, block) when something is wrong.",
             ["check disk.vhd", "check leaf.vhd --chain --json"])
    s.add_argument("file", help="the VHD file")
    s.add_argument("--chain", action="store_true", help="also check every parent and each link")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_chain_options(s)


@COMMANDS.handler("check")
def _check(ns: argparse.Namespace) -> int:
    from ..check import check_chain, check_file

    if ns.chain:
        problems = check_chain(ns.file, **chain_options(ns))
    else:
        problems = check_file(ns.file)
    errors = [p for p in problems if p.severity == "error"]
    if ns.json:
        print_json({"ok": not errors, "problems": [p.to_json() for p in problems]})
    else:
        for p in problems:
            print(p)
        if not errors:
            print(f"{ns.file}: ok" + (" (whole chain)" if ns.chain else ""))
    return EXIT_OK if not errors else EXIT_ERROR


@COMMANDS.parser
def _p_chain(sub: Any) -> None:
    s = _new(sub, "chain", "list the chain from leaf to base",
             "Resolve the parents of a differencing disk (confined to the leaf's directory "
             "unless --allow-dir) and list every disk from leaf to base with its sizes.",
             ["chain leaf.vhd", "chain leaf.vhd --allow-dir /srv/bases --json"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_chain_options(s)


@COMMANDS.handler("chain")
def _chain(ns: argparse.Namespace) -> int:
    from ..chain import Chain

    with Chain.open(ns.leaf, **chain_options(ns)) as chain:
        rows: list[dict[str, Any]] = []
        for ly in chain.layers:
            rows.append({
                "path": ly.path, "type": ly.footer.type_name, "uuid": str(ly.uuid),
                "virtual_size": ly.virtual_size, "file_size": ly.file_size,
                "allocated_bytes": ly.allocated_bytes(),
            })
    if ns.json:
        print_json({"leaf": ns.leaf, "depth": len(rows), "disks": rows})
        return EXIT_OK
    for i, r in enumerate(rows):
        print(f"{'leaf' if i == 0 else ('base' if i == len(rows) - 1 else 'parent'):6} "
              f"{r['path']}  {r['type']}  virtual {human_size(r['virtual_size'])}  "
              f"file {human_size(r['file_size'])}  allocated {human_size(r['allocated_bytes'])}")
    return EXIT_OK


# ------------------------------------------------------------------ create / snapshot
@COMMANDS.parser
def _p_create(sub: Any) -> None:
    s = _new(sub, "create", "create an empty fixed or dynamic VHD",
             "Create an empty VHD. An existing file is refused unless --force.",
             ["create base.vhd --size 10G", "create disk.vhd --size 1.5T --block-size 512K",
              "create fixed.vhd --size 512M --type fixed"])
    s.add_argument("out", help="the new VHD file")
    s.add_argument("--size", required=True, type=SIZE, metavar="SIZE",
                   help="virtual size, e.g. 10G, 512M or 1.5T")
    s.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic")
    s.add_argument("--block-size", type=power_of_two_size, metavar="SIZE",
                   help="block size of a dynamic disk (default 2M)")
    add_force(s)


@COMMANDS.handler("create")
def _create(ns: argparse.Namespace) -> int:
    from ..vhd.create import create_dynamic, create_fixed

    if ns.type == "fixed" and ns.block_size:
        raise UsageError("--block-size applies to dynamic disks only, not --type fixed")
    refuse_existing(ns.out, ns.force)
    if ns.type == "fixed":
        create_fixed(ns.out, ns.size, exclusive=not ns.force).close()
    else:
        create_dynamic(ns.out, ns.size, block_size=ns.block_size or 2 * 1024 * 1024,
                       exclusive=not ns.force).close()
    print(f"created {ns.out}: {ns.type} {human_size(ns.size)}")
    return EXIT_OK


@COMMANDS.parser
def _p_snapshot(sub: Any) -> None:
    s = _new(sub, "snapshot", "create a differencing disk over a parent",
             "Create a differencing disk whose parent is --parent (recorded with a relative "
             "locator). An existing file is refused unless --force.",
             ["snapshot child.vhd --parent base.vhd"])
    s.add_argument("child", help="the new differencing disk")
    s.add_argument("--parent", required=True, help="the disk it records changes against")
    add_force(s)


@COMMANDS.handler("snapshot")
def _snapshot(ns: argparse.Namespace) -> int:
    from ..vhd.create import create_differencing

    refuse_existing(ns.child, ns.force)
    create_differencing(ns.child, ns.parent, exclusive=not ns.force).close()
    print(f"created {ns.child}: differencing disk over {ns.parent}")
    return EXIT_OK


# ------------------------------------------------------------------ cat / write
@COMMANDS.parser
def _p_cat(sub: Any) -> None:
    s = _new(sub, "cat", "write the whole virtual disk through the chain as raw bytes",
             "Read the virtual disk through the chain and write it raw: to a sparse file "
             "with -o (refused if it exists, unless --force), or to standard output, which "
             "must not be a terminal.",
             ["cat leaf.vhd -o disk.raw", "cat leaf.vhd --stdout | sha256sum"])
    out = s.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="output file (sparse)")
    out.add_argument("--stdout", action="store_true",
                     help="write to standard output (the default without -o)")
    s.add_argument("leaf", help="the newest disk of the chain")
    add_force(s)
    add_chain_options(s)


@COMMANDS.handler("cat")
def _cat(ns: argparse.Namespace) -> int:
    from ..chain import Chain

    to_file = ns.output and ns.output != "-"
    if to_file:
        refuse_existing(ns.output, ns.force)
    elif sys.stdout.isatty():
        raise UsageError("refusing to write a raw disk to a terminal; use -o FILE or "
                         "redirect standard output")
    with Chain.open(ns.leaf, **chain_options(ns)) as chain:
        if to_file:
            chain.copy_to_raw(ns.output)
            return EXIT_OK
        out = sys.stdout.buffer
        for view in chain.iter_raw(8 * 1024 * 1024):
            out.write(view)
        out.flush()
    return EXIT_OK


@COMMANDS.parser
def _p_write(sub: Any) -> None:
    s = _new(sub, "write", "write a file's bytes into a VHD at a virtual offset",
             "Write the bytes of a file (or standard input) into a VHD at a virtual byte "
             "offset, allocating blocks as needed. With --sparse, runs of zero sectors "
             "that already read as zero are not written, so unallocated blocks stay "
             "unallocated.",
             ["write child.vhd --offset 1M --from data.bin",
              "write disk.vhd --offset 0 --from disk.raw --sparse"])
    s.add_argument("file", help="the VHD to write into (the leaf of its chain)")
    s.add_argument("--offset", required=True, type=OFFSET, metavar="OFFSET",
                   help="virtual byte offset (K/M/G suffixes)")
    s.add_argument("--from", dest="source", required=True, metavar="FILE",
                   help="source file, or - for standard input")
    s.add_argument("--sparse", action="store_true",
                   help="skip zero sectors where the disk already reads zero")
    add_chain_options(s)


def _write_sparse(chain: Any, pos: int, view: memoryview) -> int:
    """Write ``view`` at ``pos`` except the runs of whole zero sectors (and a
    zero head or tail) where the disk already reads zero; returns the bytes
    left out."""
    import numpy as np

    skipped = 0

    def put(lo: int, piece: memoryview, zero: bool) -> None:
        nonlocal skipped
        if zero:
            # zeros: write only where the disk does not already read zero
            cur = chain.read(lo, len(piece))
            if cur.count(0) == len(cur):
                skipped += len(piece)
                return
        chain.write(lo, piece)

    head = min(len(view), (-pos) % 512)
    if head:
        put(pos, view[:head], not any(view[:head]))
    body_len = (len(view) - head) // 512 * 512
    body = np.frombuffer(view[head:head + body_len], dtype=np.uint8).reshape(-1, 512)
    flags: Any = body.any(axis=1)
    nonzero: list[bool] = [bool(x) for x in flags] if len(body) else []
    i = 0
    base = pos + head
    while i < len(nonzero):
        j = i
        while j < len(nonzero) and nonzero[j] == nonzero[i]:
            j += 1
        put(base + i * 512, view[head + i * 512: head + j * 512], not nonzero[i])
        i = j
    tail = view[head + body_len:]
    if len(tail):
        put(base + body_len, tail, not any(tail))
    return skipped


def _write_stream(chain: Any, src: Any, offset: int, sparse: bool) -> tuple[int, int]:
    """Copy ``src`` into the chain at ``offset``; with ``sparse``, leave out
    whole zero sectors where the disk already reads zero.  Returns (bytes
    consumed, bytes skipped)."""
    pos = offset
    skipped = 0
    chunk = 4 * 1024 * 1024
    try:
        st = os.fstat(src.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
    except (OSError, AttributeError, ValueError):
        size = None
    if size is not None and offset + size > chain.virtual_size:
        # a regular file is checked before anything is written
        raise VhdError(f"{chain.leaf.path}: {size} bytes at offset {offset} do not fit in the "
                       f"virtual size of {chain.virtual_size} bytes; nothing was written")
    while True:
        buf = src.read(chunk)
        if not buf:
            break
        if pos + len(buf) > chain.virtual_size:
            raise VhdError(f"{chain.leaf.path}: the input runs past the virtual size of "
                           f"{chain.virtual_size} bytes; {pos - offset} bytes were written")
        if sparse:
            skipped += _write_sparse(chain, pos, memoryview(buf))
        else:
            chain.write(pos, buf)
        pos += len(buf)
    return pos - offset, skipped


@COMMANDS.handler("write")
def _write(ns: argparse.Namespace) -> int:
    from ..chain import Chain

    src = sys.stdin.buffer if ns.source == "-" else open(ns.source, "rb")
    try:
        with Chain.open(ns.file, writable=True, **chain_options(ns)) as chain:
            n, skipped = _write_stream(chain, src, ns.offset, ns.sparse)
            chain.leaf.flush()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    extra = f" ({skipped} bytes of zeros skipped)" if ns.sparse else ""
    print(f"wrote {n - skipped} bytes at offset {ns.offset} into {ns.file}{extra}")
    return EXIT_OK


